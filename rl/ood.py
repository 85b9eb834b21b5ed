"""Out-of-domain multiple choice (the paper's Table 2): HellaSwag, ARC and MMLU, scored by teacher-forced
likelihood. For each problem and each choice, the NLL of the choice's continuation given the context; the
accuracy is the fraction of problems whose lowest per-token NLL choice is the correct one, and the NLL metric is
the per-token NLL of the correct answer. The paper's finding this serves: soft / fuzzy training keeps the base
model's out-of-domain NLL, hard training moves it ("a softer touch"), so a base model and its trained versions
are scored side by side (`scripts/evaluate_ood.py`).

Shape legend: `B` sequences (problem × choice) in a forward, `T` padded positions, `K` the longest continuation
of the batch, `V` vocabulary.

How this relates to the paper and to lm-eval-harness (whose conventions it follows unless said):

1. No chain of thought. The paper calls its Table 2 accuracy "hard greedy"; for multiple choice we read that as
   the likelihood ranking of the choices (greedy over choices), which is how these benchmarks are scored. The
   model is fed hard tokens only.
2. Prompt format (cloze, no chat template by default, like the harness): ARC and MMLU are
   `"Question: {question}\\nAnswer:"` continued by `" {choice}"`; HellaSwag is `"{activity_label}: {ctx}"`
   continued by `" {ending}"`, both cleaned of the WikiHow markup (`[title]`, `[header]`...) by the harness's
   `preprocess`. The harness rebuilds the context from `ctx_a` and a capitalised `ctx_b`; we take the hub's
   `ctx` as it is (one key fewer to require). MMLU is scored in this cloze form (the harness's
   `mmlu_continuation`), not as letters: the per-token NLL of a letter says little about the answer text.
   `chat_template=True` sends the context as the user message of the tokenizer's chat template and scores the
   bare choice as the assistant's reply.
3. Tokens: the scored sequence is `encode(context + continuation)`; its continuation is what follows the first
   `len(encode(context))` tokens (the harness's rule, which lets a tokenizer merge across the boundary the way
   it would in running text). No bos by default (the harness's default; `add_bos=True` prepends the tokenizer's
   bos id). A sequence longer than the model's `max_position_embeddings` loses context tokens from the left (the
   continuation is kept whole) and the problem is counted as truncated.
4. Normalisation: the accuracy ranks choices by per-token NLL (summed NLL / continuation tokens). This is the
   length normalisation the NLL metric itself uses, so "the model prefers the correct answer" and "the correct
   answer's per-token NLL is low" are statements about one quantity. The harness's `acc_norm` divides by bytes
   instead, which only matters when comparing models with different tokenizers; its unnormalised `acc` (summed
   NLL, which favours short choices) is reported too, as `accuracy_sum`. Ties go to the lower choice index.
5. NLL is in nats, computed in float32 from the model's logits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rl.data import BadRow, jsonl_rows, row_text, row_value
from rl.model import DTYPES

# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class OodConfig:
    """`scripts/evaluate_ood.py`: each of `models` on each of `benchmarks`, side by side.

    `models`: model recipe names (`recipes/model/<name>.yaml`: tiny, smollm2-135m, ...), local model directories
    (a run's `final/`) or hub ids. `labels`: their column names in the table (default: the entries themselves;
    needed when one model appears twice). `path`: a local JSONL file per benchmark in the hub's row shape, with
    `{benchmark}` replaced by the benchmark's name; None = the hub (`BENCHMARKS`)."""

    models: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    benchmarks: list[str] = field(default_factory=lambda: ["hellaswag", "arc", "mmlu"])
    path: str | None = None
    split: str | None = None  # None = each benchmark's usual evaluation split (`BENCHMARKS`)
    limit: int | None = None  # the first `limit` problems of each benchmark (None = all)
    batch_size: int = 32  # sequences (problem × choice) per forward; a problem's choices share one forward
    chat_template: bool = False
    add_bos: bool = False
    dtype: str | None = None  # None = each model's own (its recipe's, else float32)
    device: str = "auto"  # auto = cuda when available, else cpu
    output_dir: str = "outputs/ood"

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models=[]: name at least one model, e.g. models=[tiny,runs/soft/final]")
        if self.labels and len(self.labels) != len(self.models):
            raise ValueError(f"labels={self.labels}: need one per model ({len(self.models)}: {self.models})")
        if len(set(self.model_labels)) != len(self.models):
            raise ValueError(
                f"labels={self.model_labels}: repeat (models={self.models}); give distinct labels=[...]"
            )
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown or not self.benchmarks:
            raise ValueError(f"benchmarks={self.benchmarks}: expected some of {sorted(BENCHMARKS)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"benchmarks={self.benchmarks}: a benchmark is named twice")
        if self.path is not None and "{benchmark}" not in self.path and len(self.benchmarks) > 1:
            raise ValueError(
                f"path={self.path!r} has no {{benchmark}} but benchmarks={self.benchmarks}: one file cannot "
                "hold several benchmarks"
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: must be >= 1 or None (all)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected None or one of {sorted(DTYPES)}")
        for model in self.models:
            if Path(self.output_dir).resolve() == Path(model).expanduser().resolve():
                raise ValueError(
                    f"output_dir={self.output_dir!r} is a model path: a model directory is read-only"
                )

    @property
    def model_labels(self) -> list[str]:
        return list(self.labels) if self.labels else list(self.models)


# ---------------------------------------------------------------------------------------------------------------
# loading: hub rows -> ChoiceProblem


@dataclass(frozen=True)
class ChoiceProblem:
    """One multiple-choice problem, formatted: the model continues `context` with `" " + choices[i]`."""

    uid: str
    context: str
    choices: list[str]
    correct: int


def _texts(value: Any, key: str) -> list[str]:
    """A list of at least two non-empty strings, stripped."""
    if not isinstance(value, list | tuple) or len(value) < 2:
        raise BadRow(key, f"expected a list of at least 2 strings, got {value!r:.120}")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise BadRow(key, f"expected non-empty strings, got {value!r:.120}")
    return [v.strip() for v in value]


def _index(value: int, n: int, key: str) -> int:
    if not 0 <= value < n:
        raise BadRow(key, f"{value} is not a choice index (0..{n - 1})")
    return value


def hellaswag_preprocess(text: str) -> str:
    """lm-eval-harness's HellaSwag cleaning of WikiHow markup, and a final strip (the harness leaves a leading
    space on an ending that starts with a tag, which the space before the continuation then doubles).

    >>> hellaswag_preprocess(" Making a cake [title] Preheat the oven. [step] Grease the pan.")
    'Making a cake. Preheat the oven. Grease the pan.'
    >>> hellaswag_preprocess("[title] Grease the pan.")
    'Grease the pan.'
    """
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


# Row parsers: raw row (the hub's shape) -> (context, choices, correct index, the row's own id or None).
RowParser = Callable[[Mapping[str, Any]], tuple[str, list[str], int, str | None]]


def _parse_hellaswag(row: Mapping[str, Any]) -> tuple[str, list[str], int, str | None]:
    ctx = row_text(row, "ctx")
    label = row.get("activity_label")  # optional: the harness prefixes it, and the hub always has it
    context = hellaswag_preprocess(f"{label}: {ctx}" if isinstance(label, str) and label.strip() else ctx)
    endings = [hellaswag_preprocess(e) for e in _texts(row_value(row, "endings"), "endings")]
    raw = row_value(row, "label")
    if isinstance(raw, str) and not raw.strip():
        raise BadRow("label", "empty (HellaSwag's test split is unlabelled: use split=validation)")
    if isinstance(raw, bool) or not (
        isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit())
    ):
        raise BadRow("label", f"expected a digit string like '2', got {raw!r:.80}")
    own_id = row.get("ind")
    return context, endings, _index(int(raw), len(endings), "label"), None if own_id is None else str(own_id)


def _parse_arc(row: Mapping[str, Any]) -> tuple[str, list[str], int, str | None]:
    question = row_text(row, "question")
    choices = row_value(row, "choices")
    if not isinstance(choices, Mapping) or "text" not in choices or "label" not in choices:
        raise BadRow("choices", f"expected {{'text': [...], 'label': [...]}}, got {choices!r:.120}")
    texts = _texts(choices["text"], "choices.text")
    labels = _texts(choices["label"], "choices.label")
    if len(labels) != len(texts):
        raise BadRow("choices", f"{len(texts)} texts but {len(labels)} labels")
    answer = row_text(row, "answerKey")
    if answer not in labels:  # letters (A-E) on most rows, digits (1-5) on some
        raise BadRow("answerKey", f"{answer!r} is not one of the choice labels {labels}")
    own_id = row.get("id")
    return (
        f"Question: {question}\nAnswer:",
        texts,
        labels.index(answer),
        None if own_id is None else str(own_id),
    )


def _parse_mmlu(row: Mapping[str, Any]) -> tuple[str, list[str], int, str | None]:
    question = row_text(row, "question")
    choices = _texts(row_value(row, "choices"), "choices")
    answer = row_value(row, "answer")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise BadRow("answer", f"expected an int choice index, got {answer!r:.80}")
    return f"Question: {question}\nAnswer:", choices, _index(answer, len(choices), "answer"), None


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives on the hub and how to read one row."""

    parse: RowParser
    hub_id: str
    hub_config: str | None
    split: str  # its usual evaluation split (the one with labels)


BENCHMARKS: dict[str, Benchmark] = {
    "hellaswag": Benchmark(_parse_hellaswag, "Rowan/hellaswag", None, "validation"),
    "arc": Benchmark(_parse_arc, "allenai/ai2_arc", "ARC-Challenge", "test"),
    "arc_easy": Benchmark(_parse_arc, "allenai/ai2_arc", "ARC-Easy", "test"),
    "mmlu": Benchmark(_parse_mmlu, "cais/mmlu", "all", "test"),
}


def benchmark_path(cfg: OodConfig, name: str) -> Path | None:
    """The local file of benchmark `name` (`cfg.path` with `{benchmark}` replaced), None = the hub."""
    return None if cfg.path is None else Path(cfg.path.replace("{benchmark}", name))


def load_benchmark(
    name: str, path: Path | None = None, split: str | None = None, limit: int | None = None
) -> list[ChoiceProblem]:
    """The problems of benchmark `name`, in order, the first `limit` of them: from the JSONL file `path` (rows in
    the hub's shape) or, when `path` is None, from the hub (`split`, default the benchmark's usual one).

    Raises ValueError for an unknown name, a missing file, invalid JSON or UTF-8, and a malformed row, naming the
    file and line (or hub id and row) and the key."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    rows = _file_rows(path) if path is not None else _hub_rows(bench, split or bench.split)
    problems = []
    for index, (where, row) in enumerate(rows):
        if limit is not None and index >= limit:
            break
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        try:
            context, choices, correct, own_id = bench.parse(row)
        except BadRow as err:
            raise ValueError(f"{where}: {err}") from None
        uid = f"{name}-{own_id}" if own_id is not None else f"{name}-{index}"
        problems.append(ChoiceProblem(uid, context, choices, correct))
    return problems


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for each non-blank line of a JSONL file; `where` names the file, line and row."""
    if not path.is_file():
        raise ValueError(f"benchmark file {path} does not exist")
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"benchmark file {path}: expected a .jsonl file (one hub-shaped row per line)")
    return jsonl_rows(path)


def _hub_rows(bench: Benchmark, split: str) -> Iterable[tuple[str, Any]]:
    import datasets  # lazy: importing datasets costs seconds and local files never need it

    dataset = datasets.load_dataset(bench.hub_id, bench.hub_config, split=split)
    origin = f"{bench.hub_id} ({bench.hub_config or 'default'}, split {split})"
    return ((f"{origin}: row {i}", row) for i, row in enumerate(dataset))


# ---------------------------------------------------------------------------------------------------------------
# scoring


@dataclass(frozen=True)
class EncodedProblem:
    """The token ids of each choice's sequence (context then continuation) and its continuation length."""

    sequences: list[list[int]]
    continuation_lengths: list[int]
    truncated: bool


@dataclass(frozen=True)
class ChoiceScores:
    """One problem's scores under one model: summed NLL (nats) and token count of each choice's continuation."""

    uid: str
    correct: int
    nll: list[float]
    tokens: list[int]
    truncated: bool

    @property
    def per_token(self) -> list[float]:
        return [n / t for n, t in zip(self.nll, self.tokens, strict=True)]

    @property
    def predicted(self) -> int:
        """The lowest per-token NLL choice (the first of a tie)."""
        per_token = self.per_token
        return per_token.index(min(per_token))

    @property
    def predicted_sum(self) -> int:
        """The lowest summed NLL choice (the first of a tie)."""
        return self.nll.index(min(self.nll))


def encode_problem(
    tokenizer: Any,
    problem: ChoiceProblem,
    chat_template: bool = False,
    add_bos: bool = False,
    max_length: int | None = None,
) -> EncodedProblem:
    """Each choice's sequence, by the rules of the module docstring (3), cut to `max_length` from the left."""
    if chat_template:
        messages = [{"role": "user", "content": problem.context}]
        context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        continuations = list(problem.choices)
        prefix: list[int] = []  # the template writes its own special tokens
    else:
        context = problem.context
        continuations = [f" {c}" for c in problem.choices]
        bos = getattr(tokenizer, "bos_token_id", None)
        prefix = [bos] if add_bos and bos is not None else []
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    wholes = tokenizer([context + c for c in continuations], add_special_tokens=False)["input_ids"]
    sequences, lengths, truncated = [], [], False
    for choice, whole in zip(problem.choices, wholes, strict=True):
        sequence = prefix + list(whole)
        n = len(whole) - n_context
        if n < 1:
            raise ValueError(f"{problem.uid}: choice {choice!r} adds no token to the context")
        if max_length is not None and len(sequence) > max_length:
            if n >= max_length:
                raise ValueError(
                    f"{problem.uid}: choice {choice!r:.60} is {n} tokens, leaving no context within the "
                    f"model's {max_length} positions"
                )
            sequence, truncated = sequence[-max_length:], True
        sequences.append(sequence)
        lengths.append(n)
    return EncodedProblem(sequences, lengths, truncated)


def continuation_nll(
    model: Any, sequences: Sequence[list[int]], lengths: Sequence[int], pad_id: int
) -> list[float]:
    """Summed NLL of the last `lengths[b]` tokens of each sequence given the tokens before them, in one forward:
    left-padded (so every continuation ends at the last position and only the last K + 1 logits are needed),
    with the attention mask hiding the pads and positions counted from each row's first real token."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)  # T
    k = max(lengths)  # K
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros_like(ids)  # [B, T]
    for b, seq in enumerate(sequences):
        ids[b, width - len(seq) :] = torch.tensor(seq)
        mask[b, width - len(seq) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),  # [B, T]
        logits_to_keep=k + 1,
        use_cache=False,
    )
    logp = F.log_softmax(out.logits[:, :-1].float(), dim=-1)  # [B, K, V]: predicts positions T-K .. T-1
    targets = ids[:, width - k :]  # [B, K]
    token_logp = logp.gather(-1, targets[..., None]).squeeze(-1)  # [B, K]
    n = torch.tensor(list(lengths), device=device)
    scored = torch.arange(k, device=device)[None, :] >= (k - n)[:, None]  # [B, K]: this row's continuation
    # masked_fill, not a product: a pad position's logits may be NaN where its query row attends to nothing
    return (-token_logp.masked_fill(~scored, 0.0).sum(dim=1)).tolist()


def reference_nll(model: Any, sequence: list[int], length: int) -> float:
    """The plain reference for `continuation_nll`: one sequence, one forward, no padding, no mask, all logits."""
    device = next(model.parameters()).device
    ids = torch.tensor([sequence], device=device)  # [1, T]
    logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)  # [T, V]
    return -sum(logp[t - 1, sequence[t]].item() for t in range(len(sequence) - length, len(sequence)))


def score_problems(
    model: Any,
    tokenizer: Any,
    problems: Sequence[ChoiceProblem],
    batch_size: int = 32,
    chat_template: bool = False,
    add_bos: bool = False,
    progress: bool = True,
    desc: str = "ood",
) -> list[ChoiceScores]:
    """Every choice of every problem scored under `model`, in problem order. Problems are batched whole, longest
    first (less padding; at least one problem per forward, however many choices it has)."""
    if model.training:
        raise ValueError("score_problems: the model is in training mode (dropout would make NLLs random)")
    max_length = getattr(model.config, "max_position_embeddings", None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id will do
    encoded = [encode_problem(tokenizer, p, chat_template, add_bos, max_length) for p in problems]
    order = sorted(range(len(problems)), key=lambda i: -max(map(len, encoded[i].sequences)))
    nll: list[list[float]] = [[] for _ in problems]
    bar = tqdm(total=len(problems), desc=desc, unit="problem", disable=not progress, leave=False)
    start = 0
    with torch.inference_mode():
        while start < len(order):
            stop, size = start, 0
            while stop < len(order) and (
                stop == start or size + len(problems[order[stop]].choices) <= batch_size
            ):
                size += len(problems[order[stop]].choices)
                stop += 1
            batch = order[start:stop]
            sequences = [s for i in batch for s in encoded[i].sequences]
            lengths = [n for i in batch for n in encoded[i].continuation_lengths]
            flat = iter(continuation_nll(model, sequences, lengths, pad_id))
            for i in batch:
                nll[i] = [next(flat) for _ in problems[i].choices]
            bar.update(len(batch))
            start = stop
    bar.close()
    return [
        ChoiceScores(p.uid, p.correct, nll[i], list(encoded[i].continuation_lengths), encoded[i].truncated)
        for i, p in enumerate(problems)
    ]


# ---------------------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class OodResult:
    """One model on one benchmark. `accuracy`: lowest per-token NLL choice is correct; `accuracy_sum`: lowest
    summed NLL (the harness's `acc`); `nll_per_token`: mean over problems of the correct continuation's NLL over
    its token count (nats); `truncated`: problems whose context lost tokens to the model's length."""

    benchmark: str
    model: str
    problems: int
    accuracy: float
    accuracy_sum: float
    nll_per_token: float
    truncated: int


def summarise(benchmark: str, model: str, scores: Sequence[ChoiceScores]) -> OodResult:
    """The benchmark-level numbers of `scores` (see `OodResult`).

    >>> s = [ChoiceScores("a", 0, [2.0, 1.5], [2, 1], False), ChoiceScores("b", 1, [4.0, 1.0], [4, 2], True)]
    >>> summarise("arc", "base", s)  # per token [1, 1.5] and [1, .5]: both right; summed: a wrong, b right
    OodResult(benchmark='arc', model='base', problems=2, accuracy=1.0, accuracy_sum=0.5, nll_per_token=0.75, truncated=1)
    """
    if not scores:
        raise ValueError(f"{benchmark} / {model}: no problems to summarise")
    n = len(scores)
    return OodResult(
        benchmark=benchmark,
        model=model,
        problems=n,
        accuracy=sum(s.predicted == s.correct for s in scores) / n,
        accuracy_sum=sum(s.predicted_sum == s.correct for s in scores) / n,
        nll_per_token=sum(s.per_token[s.correct] for s in scores) / n,
        truncated=sum(s.truncated for s in scores),
    )


def side_by_side(results: Sequence[OodResult], models: Sequence[str], benchmarks: Sequence[str]) -> str:
    """A markdown table: one row per benchmark, accuracy and per-token NLL of the correct answer per model.

    >>> r = [OodResult("arc", m, 5, a, a, l, 0) for m, a, l in [("base", 0.4, 1.25), ("soft", 0.6, 1.5)]]
    >>> print(side_by_side(r, ["base", "soft"], ["arc"]))
    | benchmark | n | base acc | base NLL/token | soft acc | soft NLL/token |
    |---|---|---|---|---|---|
    | arc | 5 | 0.400 | 1.250 | 0.600 | 1.500 |
    """
    cell = {(r.benchmark, r.model): r for r in results}
    head = ["benchmark", "n"] + [f"{m} {what}" for m in models for what in ("acc", "NLL/token")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bench in benchmarks:
        row = [bench, str(cell[bench, models[0]].problems)]
        for m in models:
            row += [f"{cell[bench, m].accuracy:.3f}", f"{cell[bench, m].nll_per_token:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
