"""Logging setup shared by every embedq process."""

from __future__ import annotations

import logging
import os


def configure_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("EMBEDQ_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    # Third-party chatter is not what an operator is looking for.
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
