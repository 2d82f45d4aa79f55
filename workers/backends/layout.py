"""Reads a sentence-transformers folder's ``modules.json`` into the pipeline it describes.

We accept exactly Transformer -> Pooling -> (optional) Normalize, the shape of nearly every
Sentence-BERT model. Anything else (Dense, Router, custom modules) is refused rather than
served with silently different vectors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .source import UnsupportedModelError

MODULES_FILE = "modules.json"
# The class name is the last dotted part of a module "type"; it is stable across
# sentence-transformers versions while the module path moved (models.X -> base.modules.X).
_KNOWN = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class ModuleLayout:
    """Where each stage's files live. pooling_dir None means "no Pooling module folder":
    a plain Hugging Face model, pooled the way sentence-transformers pools it by default."""

    transformer_dir: Path
    pooling_dir: Path | None
    normalize: bool


def read_layout(folder: Path) -> ModuleLayout:
    """The module pipeline of ``folder``.

    Without modules.json the folder is a plain Hugging Face model: sentence-transformers then
    builds Transformer + default Pooling (mean; lasttoken for causal LMs) and no Normalize,
    and so do we (see pooling.default_modes).
    """
    path = folder / MODULES_FILE
    if not path.is_file():
        return ModuleLayout(transformer_dir=folder, pooling_dir=None, normalize=False)
    entries = json.loads(path.read_text(encoding="utf-8"))
    kinds = [_kind(entry) for entry in entries]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise UnsupportedModelError(
            f"{path}: modules {kinds} are not supported; expected Transformer, Pooling "
            "and optionally Normalize"
        )
    # The Normalize module has no files of its own, so its folder may be missing: fine.
    return ModuleLayout(
        transformer_dir=_subfolder(folder, entries[0]),
        pooling_dir=_subfolder(folder, entries[1]),
        normalize=len(kinds) == 3,
    )


def _kind(entry: dict[str, Any]) -> str:
    """Class name of a modules.json entry: 'Pooling' for 'sentence_transformers.models.Pooling'."""
    name = str(entry.get("type", "")).rsplit(".", 1)[-1]
    return name if name in _KNOWN else f"unsupported:{entry.get('type')}"


def _subfolder(folder: Path, entry: dict[str, Any]) -> Path:
    """The entry's folder; like sentence-transformers, refuse paths escaping the model folder."""
    relative = str(entry.get("path", ""))
    target = (folder / relative).resolve()
    if folder.resolve() not in (target, *target.parents):
        raise UnsupportedModelError(f"{folder / MODULES_FILE}: module path {relative!r} escapes it")
    return target
