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


def check(texts: Iterable[str]) -> None:
    spec = os.environ.get(ENV)
    if not spec or ":" not in spec:
        return
    mode, marker = spec.split(":", 1)
    if not any(marker in text for text in texts):
        return
    if mode == "crash":
        os._exit(CRASH_EXIT_CODE)
    if mode == "raise":
        raise RuntimeError(f"injected fault on a text containing {marker!r}")
