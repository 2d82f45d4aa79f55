"""Logging setup shared by every embedq process.

Two formats: ``text`` (one human-readable line per record) and ``json`` (one
JSON object per line: time, level, logger, message, plus any ``extra=``
fields). Every record logged while a gRPC call is being handled carries the
call's request id (:data:`REQUEST_ID`, set by the server's interceptor), in
both formats. Texts and secrets are never put in a log record by embedq.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

from embedq.settings import LOG_FORMATS as FORMATS
from embedq.settings import SETTINGS

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"

# The id of the request being handled in this context (asyncio task), if any.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "embedq_request_id", default=None
)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
}


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (None outside a request) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """The classic line, with `` request_id=…`` appended inside a request."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id:
            first, newline, rest = line.partition("\n")
            line = f"{first} request_id={request_id}{newline}{rest}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message,
    process, request_id (inside a request), extra fields, exception text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Root handler on stderr; `level` and `fmt` default to the declared settings
    log_level / log_format (EMBEDQ_LOG_LEVEL / EMBEDQ_LOG_FORMAT, else INFO / text)."""
    level = (level or SETTINGS["log_level"].from_env()).upper()
    fmt = (fmt or SETTINGS["log_format"].from_env()).lower()
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level, handlers=[handler])
    # Third-party chatter is not what an operator is looking for.
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


# Repeats of one message are logged at most this often.
LOG_EVERY_S = 10.0


class Throttled:
    """A logger that says the same thing (by key) at most once per `every_s`,
    with the number of repeats it kept quiet about."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self._log = logger
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, *args: object, **kwargs: object) -> bool:
        """Log unless `key` was logged less than `every_s` ago; True when logged."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._every_s:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return False
        quiet = self._quiet.pop(key, 0)
        if quiet:
            message += f" ({quiet} more like it in the last {now - last:.0f}s)"
        self._last[key] = now
        self._log.log(level, message, *args, **kwargs)
        return True

    def warning(self, key: str, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, message, *args)

    def error(self, key: str, message: str, *args: object, exc_info: bool = False) -> bool:
        return self.log(logging.ERROR, key, message, *args, exc_info=exc_info)
