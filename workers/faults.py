"""Fault injection for the reliability tests; inert unless configured.

EMBEDQ_FAULT_INJECT="raise:<marker>" makes the encoder batch holding a text
that contains <marker> raise; "crash:<marker>" kills the worker process
outright (as an out-of-memory kill or a segfault in a native kernel would).
Tests use it to prove that callers get an error, not silence.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

ENV = "EMBEDQ_FAULT_INJECT"
CRASH_EXIT_CODE = 70


def _marked(mode: str, texts: Iterable[str]) -> str | None:
    spec = os.environ.get(ENV, "")
    wanted, _, marker = spec.partition(":")
    if wanted != mode or not marker:
        return None
    return marker if any(marker in text for text in texts) else None


def crash_if_marked(texts: Iterable[str]) -> None:
    if _marked("crash", texts):
        os._exit(CRASH_EXIT_CODE)


def raise_if_marked(texts: Iterable[str]) -> None:
    marker = _marked("raise", texts)
    if marker:
        raise RuntimeError(f"injected fault on a text containing {marker!r}")
