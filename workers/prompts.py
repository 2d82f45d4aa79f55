"""The model's named prompts, from its config_sentence_transformers.json.

Workers publish them with the model registration, so that servers resolve
`prompt_name` (and the model's default prompt) without the model folder.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_prompts(folder: str | Path) -> tuple[dict[str, str], str]:
    """(name -> prompt text, default prompt name or "")."""
    path = Path(folder) / "config_sentence_transformers.json"
    if not path.is_file():
        return {}, ""
    config = json.loads(path.read_text(encoding="utf-8"))
    prompts = {str(k): str(v) for k, v in (config.get("prompts") or {}).items()}
    default = config.get("default_prompt_name") or ""
    if default and default not in prompts:
        raise ValueError(f"{path}: default_prompt_name {default!r} is not among its prompts")
    return prompts, default
