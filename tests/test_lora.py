"""LoRA through peft (rl/lora.py): adapters injected into the policy itself, only they train, a fresh adapter is
the base model, the merged plain model computes exactly what the adapted one does, and plain weights load back."""

from __future__ import annotations

import pytest
import torch

from rl.lora import LoraConfig, apply_lora, has_lora, load_plain, plain_model, trainable_parameters
from rollouts.engine import input_embedding_matrix
from tests.arch import tiny_causal_lm

IDS = torch.tensor([[5, 17, 3, 40, 22, 9, 61, 2]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_only_the_adapters_train_and_a_fresh_adapter_is_the_base(arch: str) -> None:
    model = tiny_causal_lm(arch, tied=False)
    base = logits(model)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    assert has_lora(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # per adapted linear layer (in x out): A is r x in, B is out x r; 2 layers x 7 targets
    h, inter, kv = 48, 96, 24  # hidden, intermediate, 2 kv heads x head_dim 12
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    assert trainable_parameters(model) == 2 * sum(4 * (i + o) for i, o in shapes)
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)  # B = 0 at init
    # the input embedding (E, hence σ and μ = p E) and the output head are never adapted
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad
    assert input_embedding_matrix(model).shape == (96, 48)


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_the_merged_plain_model_computes_what_the_adapted_one_does() -> None:
    model = apply_lora(tiny_causal_lm("qwen2", tied=True), LoraConfig(rank=4, alpha=8))
    _perturb(model)
    adapted = logits(model)
    plain = plain_model(model)
    assert plain is not model and not has_lora(plain) and has_lora(model)  # the policy is left as it was
    assert set(plain.state_dict()) == set(tiny_causal_lm("qwen2", tied=True).state_dict())
    torch.testing.assert_close(logits(plain), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=0)
    # and back: a fresh adapted model given the plain weights computes them (its B zeroed)
    other = apply_lora(tiny_causal_lm("qwen2", tied=True, seed=5), LoraConfig(rank=4, alpha=8))
    _perturb(other)
    missing, unexpected = load_plain(other, plain.state_dict())
    assert missing == [] and unexpected == []
    torch.testing.assert_close(logits(other), adapted, rtol=1e-5, atol=1e-5)


def test_a_model_without_adapters_is_its_own_plain_model() -> None:
    model = tiny_causal_lm("llama", tied=True)
    assert apply_lora(model, LoraConfig(rank=0)) is model and not has_lora(model)
    assert plain_model(model) is model


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"\['nope'\] match no linear layer"):
        apply_lora(tiny_causal_lm("llama", tied=True), LoraConfig(rank=2, target_modules=["q_proj", "nope"]))
    with pytest.raises(ValueError, match="rl.lora.rank=-1"):
        LoraConfig(rank=-1)
    with pytest.raises(ValueError, match="rl.lora.target_modules is empty"):
        LoraConfig(rank=2, target_modules=[])


def test_a_lora_run_resumes_exactly_and_leaves_a_plain_merged_model(tiny_base, tmp_path) -> None:
    """rl.lora.rank > 0 through the whole loop: 3 steps straight == 1 step, a kill, a resume, 2 more (adapter and
    base tensors alike); only adapters move; final/ is a plain model (no adapter keys) whose logits are the live
    adapted policy's; and under select_best the merged best/ loads back into the adapted policy."""
    import json

    from rl.model import ModelConfig, load_policy
    from tests.conftest import die_after_step
    from tests.test_trainer import make_trainer, params, small_run

    lora = ("rl.lora.rank=4", "rl.lora.alpha=8", "rl.optim.lr=1e-2", "trainer.max_steps=3")
    straight = make_trainer(small_run(tiny_base, tmp_path / "a", *lora, "trainer.save_every=100"))
    start = params(straight.model)
    straight.run()
    end = params(straight.model)
    moved = [k for k in start if not torch.equal(start[k], end[k])]
    assert moved and all("lora_" in k for k in moved), moved
    final = tmp_path / "a" / "final"
    saved = load_policy(ModelConfig(path=str(final)), "cpu")[0]
    assert not any("lora" in k for k in saved.state_dict())
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, straight.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip

    run_b = small_run(tiny_base, tmp_path / "b", *lora, "trainer.save_every=1")
    first = make_trainer(run_b)
    die_after_step(first, 1)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    ckpt = (
        tmp_path / "b" / "checkpoints" / "step_000001" / "model"
    )  # a deployable plain model, not adapter keys
    assert not any("lora" in k for k in load_policy(ModelConfig(path=str(ckpt)), "cpu")[0].state_dict())
    second = make_trainer(run_b)
    assert second.state.step == 1
    second.run()
    for name, value in params(second.model).items():
        torch.testing.assert_close(value, end[name], rtol=0, atol=0, msg=name)

    best = make_trainer(small_run(tiny_base, tmp_path / "c", *lora, "trainer.save_every=100",
                                  "trainer.eval_modes=[hard_greedy]", "trainer.eval_primary=hard_greedy",
                                  "trainer.eval_every=1", "trainer.eval_problems=4", "trainer.eval_n=1",
                                  "trainer.select_best=true"))  # fmt: skip
    best.run()
    selected = json.loads((tmp_path / "c" / "best" / "selected.json").read_text())["step"]
    chosen = load_policy(ModelConfig(path=str(tmp_path / "c" / "best")), "cpu")[0]
    with torch.no_grad():  # the policy after training is best/'s weights, whichever step they are
        torch.testing.assert_close(chosen(input_ids=ids).logits, best.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5, msg=f"selected step {selected}")  # fmt: skip


def test_lora_runs_only_where_every_process_holds_the_whole_model() -> None:
    """scripts/train.py refuses rl.lora.rank > 0 under a strategy whose processes hold shards (fsdp2, zero2/3):
    adapters cannot be merged or saved from a shard."""
    from rl.parallel import FSDP2, DataParallel, Single, Zero

    assert Single.whole_model and DataParallel.whole_model
    assert not FSDP2.whole_model and not Zero.whole_model
