"""Every recipe under recipes/ composes and validates against its schema; typos and wrong types fail at
start naming the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from rl.config import RECIPES_DIR, EvaluateConfig, TrainConfig, load_infer_recipe, register_configs, to_object
from rl.tiny_base import TinyBaseConfig

# Primary configs (recipes/<name>.yaml) and the schema each resolves to.
PRIMARIES = {"evaluate": EvaluateConfig, "tiny_base": TinyBaseConfig, "train": TrainConfig}
# Folders that hold files for other tools (accelerate launch configs), not Hydra groups.
NOT_HYDRA = {"accelerate"}
# Groups that model recipes pull in through their own defaults list (`- /prompt@prompt: paper`), not a primary.
NESTED = {"prompt"}


def _groups_of(primary: str) -> set[str]:
    text = OmegaConf.load(RECIPES_DIR / f"{primary}.yaml")
    groups = set()
    for entry in text.get("defaults", []):
        if isinstance(entry, (dict, type(OmegaConf.create({})))):
            groups.update(str(k).removeprefix("optional ").split("@")[0] for k in entry)
    return groups


def _group_files() -> list[tuple[str, str]]:
    return sorted(
        (p.parent.name, p.stem)
        for p in RECIPES_DIR.glob("*/*.yaml")
        if p.parent.name not in NOT_HYDRA and p.parent.name != "experiment"
    )


def test_every_primary_config_composes() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        for primary, schema in PRIMARIES.items():
            to_object(compose(config_name=primary), schema)
    # every top-level yaml is a primary we know the schema of: a new one must be added above
    assert {p.stem for p in RECIPES_DIR.glob("*.yaml")} == set(PRIMARIES)


@pytest.mark.parametrize(("group", "option"), _group_files())
def test_every_group_recipe_validates(group: str, option: str) -> None:
    register_configs()
    if group in NESTED:  # validated through every model recipe that uses it, in every primary with a model
        users = [p.stem for p in (RECIPES_DIR / "model").glob("*.yaml") if f"/{group}@" in p.read_text()
                 and f": {option}" in p.read_text()]  # fmt: skip
        assert users, f"recipes/{group}/{option}.yaml is used by no model recipe"
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            for primary in ("train", "evaluate"):
                for model in users:
                    cfg = compose(config_name=primary, overrides=[f"model={model}"])
                    to_object(cfg, PRIMARIES[primary])
                    assert cfg.model[group] == OmegaConf.merge(cfg.model[group], OmegaConf.load(
                        RECIPES_DIR / group / f"{option}.yaml"))  # fmt: skip
        return
    hosts = [p for p in PRIMARIES if group in _groups_of(p)]
    assert hosts, f"recipes/{group}/{option}.yaml is used by no primary config in {sorted(PRIMARIES)}"
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        for primary in hosts:
            cfg = compose(config_name=primary, overrides=[f"{group}={option}"])
            to_object(cfg, PRIMARIES[primary])  # runs each dataclass's __post_init__ checks


def test_per_model_experiment_defaults_match_a_model_and_validate() -> None:
    """recipes/experiment/<m>.yaml is applied by train.yaml when model=<m>: each must name a real model recipe
    and compose (the model-group test above composes train with each model, so each experiment file too)."""
    models = {p.stem for p in (RECIPES_DIR / "model").glob("*.yaml")}
    experiments = {p.stem for p in (RECIPES_DIR / "experiment").glob("*.yaml")} - {"paper"}  # any model's
    assert experiments <= models, f"experiment recipes without a model recipe: {sorted(experiments - models)}"
    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        tiny = to_object(compose(config_name="train"), TrainConfig)
        big = to_object(compose(config_name="train", overrides=["model=qwen2.5-3b"]), TrainConfig)
        paper_on_tiny = to_object(compose(config_name="train", overrides=["experiment=paper"]), TrainConfig)
    # the per-model files really are applied: the dataclass default lr is 1e-6, the tiny file sets 1e-4, the
    # Qwen2.5-3B one the paper's 8e-6 on top of the paper protocol (CoT cap 128 in training, 512 in evaluation)
    assert tiny.rl.optim.lr == 1.0e-4 and big.rl.optim.lr == 8.0e-6
    assert big.cot.max_think_tokens == 128 and big.trainer.eval_max_think_tokens == 512
    assert tiny.cot.max_think_tokens == 48
    assert (big.rl.group_size, big.trainer.prompts_per_step, big.reward.scheme) == (32, 2, "paper")
    assert big.model.prompt.stop_on == "text" and big.reward.think_end == "The final answer is:"
    # experiment=paper on any model: the protocol with the 3B Llama's lr; the prompt stays the model's
    assert paper_on_tiny.rl.optim.lr == 6.0e-6 and paper_on_tiny.model.prompt.stop_on == "ids"


@pytest.mark.parametrize("cot", ["hard", "soft", "fuzzy", "multiplex", "gumbel"])
def test_the_primary_mode_is_the_training_mode_sampled_unless_a_recipe_names_one(cot: str) -> None:
    """trainer.eval_primary follows cot (the default run, hard CoT, is judged by hard_sample; cot=soft by
    soft_sample, ...); the paper protocol names hard_greedy, its greedy validation, and a key override wins."""
    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        assert compose(config_name="train").trainer.eval_primary == "hard_sample"
        assert compose(config_name="train", overrides=[f"cot={cot}"]).trainer.eval_primary == f"{cot}_sample"
        paper = compose(config_name="train", overrides=[f"cot={cot}", "model=smollm2-135m"])
        assert paper.trainer.eval_primary == "hard_greedy"
        named = compose(config_name="train", overrides=[f"cot={cot}", "trainer.eval_primary=hard_greedy"])
        assert named.trainer.eval_primary == "hard_greedy"


def test_infer_recipes_inherit_training_lengths() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        train = to_object(compose(config_name="train"), TrainConfig)
    mode = load_infer_recipe("fuzzy_greedy", train.cot)
    assert (mode.mode, mode.temperature, mode.noise_scale) == ("fuzzy", 1e-4, 0.0)
    assert mode.max_think_tokens == train.cot.max_think_tokens == 48
    with pytest.raises(FileNotFoundError, match="lukewarm"):
        load_infer_recipe("lukewarm", train.cot)


def test_unknown_key_in_a_recipe_is_named(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES_DIR, recipes)
    (recipes / "model" / "typo.yaml").write_text("path: x\ndtpye: bfloat16\n")
    register_configs()
    with initialize_config_dir(config_dir=str(recipes), version_base="1.3"):
        with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
            compose(config_name="evaluate", overrides=["model=typo"])
    assert "dtpye" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_and_unknown_override_are_named() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as err:
            compose(config_name="evaluate", overrides=["n=many"])
        assert isinstance(err.value.__cause__, ValidationError) and "n" in str(err.value.__cause__)
        with pytest.raises(ConfigCompositionException, match="infer.temprature"):
            compose(config_name="evaluate", overrides=["infer.temprature=0.3"])


def test_invalid_value_fails_in_post_init() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["infer.mode=lukewarm"])
    with pytest.raises(ValueError, match="cot.mode='lukewarm'"):
        to_object(cfg, EvaluateConfig)


def test_tiny_model_prompt_has_one_home() -> None:
    """The tiny model is built and evaluated with the prompt of recipes/model/tiny.yaml."""
    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        build = to_object(compose(config_name="tiny_base"), TinyBaseConfig)
        run = to_object(compose(config_name="evaluate"), EvaluateConfig)
    assert build.model.prompt == run.model.prompt
    assert build.output_dir == run.model.path
