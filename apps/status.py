"""`embedq status`: what a deployment looks like from its Redis.

Per registered model: jobs waiting in the stream (XLEN), the texts they hold
(queued or being encoded: the backlog counter admission reads), jobs read but not
yet acknowledged (XPENDING), dead letters (XLEN), workers with a heartbeat
in the last 15 s and their ids, and the model's fingerprint and dimension;
plus the number of cached vectors (a bounded SCAN: it stops at
--cache-scan-limit and reports "≥N"). An aligned table, or JSON with --json.
Read-only: it never writes a key.

Exit status: 0 healthy; 1 unhealthy (one line on stderr says why: no model
registered, a model with no live worker, dead letters growing) or Redis
unreachable; 2 no Redis to ask (no --redis-url and not exactly one running
`embedq serve`). Dead letters are "growing" when the count is higher than at
the previous sample: with --interval S, a second sample S seconds later; else
the count the previous `embedq status` run stored for the same Redis and
namespace (a small JSON file in the state directory; the first run has
nothing to compare with).

Without --redis-url (or EMBEDQ_REDIS_URL), it finds a running `embedq serve`
through the state file that serve writes (serve-<port>.json in the state
directory: $EMBEDQ_STATE_DIR, else $XDG_RUNTIME_DIR/embedq, else
~/.cache/embedq; mode 0600, removed on exit; never holds a password).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from google.protobuf.message import DecodeError
from redis.exceptions import ResponseError

from embedq.flags import add_flags
from embedq.keys import CONSUMER_GROUP, Keys, decode_registration
from embedq.settings import SETTINGS, STATUS, RedisSettings, ServerSettings
from embedq.trouble import REDIS_TROUBLE

# Same window as the server's: a worker silent for longer counts as gone.
WORKER_WINDOW_S = ServerSettings.worker_stale_s
DEFAULT_SCAN_LIMIT = SETTINGS["cache_scan_limit"].default
SCAN_BATCH = 1000


def add_status_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="queue depth, pending and dead jobs, live workers and cache size, from Redis",
        description="Show a deployment's state as its Redis holds it: per model the queued, "
        "pending and dead-lettered jobs, the workers seen in the last "
        f"{WORKER_WINDOW_S:.0f}s, the model fingerprint and dimension; and the number of cached "
        "vectors. Read-only.",
    )
    add_flags(parser, STATUS)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_status_command)


def _number(result: object) -> int:
    """A count from a pipeline result; a missing stream or group counts 0."""
    if isinstance(result, ResponseError):
        return 0  # NOGROUP: no worker ever created the group
    if isinstance(result, Exception):
        raise result
    if isinstance(result, dict):  # XPENDING summary
        return int(result.get("pending", 0))
    return int(result)


def count_cache_keys(client, keys: Keys, limit: int) -> tuple[int, bool]:
    """(keys counted, complete): SCAN MATCH the namespace's cache keys, stopping at `limit`."""
    count = 0
    for _key in client.scan_iter(match=keys.cache_pattern(), count=SCAN_BATCH):
        count += 1
        if limit and count >= limit:
            return count, False
    return count, True


def collect(client, keys: Keys, scan_limit: int = DEFAULT_SCAN_LIMIT) -> dict:
    """The status as a JSON-ready dict (what --json prints)."""
    now = time.time()
    registrations = []
    problems = []
    for raw_name, raw in sorted(client.hgetall(keys.models()).items()):
        name = raw_name.decode("utf-8", "replace")
        try:
            registrations.append((name, decode_registration(raw)))
        except DecodeError:
            problems.append(f"registration of {name!r} is not a ModelRegistration")
    pipe = client.pipeline(transaction=False)
    for name, _reg in registrations:
        pipe.xlen(keys.jobs(name))
        pipe.xpending(keys.jobs(name), CONSUMER_GROUP)
        pipe.xlen(keys.dead_letters(name))
        pipe.zrangebyscore(keys.workers(name), now - WORKER_WINDOW_S, "+inf", withscores=True)
        pipe.get(keys.backlog(name))
    results = pipe.execute(raise_on_error=False) if registrations else []
    models = []
    for index, (name, reg) in enumerate(registrations):
        queued, pending, dead, workers, texts = results[5 * index : 5 * index + 5]
        if isinstance(workers, Exception):
            raise workers
        models.append(
            {
                "name": name,
                "fingerprint": reg.fingerprint,
                "dimension": reg.dimension,
                "pooling": reg.pooling,
                "max_seq_length": reg.max_seq_length,
                "normalize": reg.normalize,
                "queue_depth": _number(queued),
                "texts_queued": max(0, _number(texts or 0)),
                "pending": _number(pending),
                "dead_letters": _number(dead),
                "workers_alive": len(workers),
                "workers": [
                    {"id": wid.decode("utf-8", "replace"), "seen_s_ago": round(now - seen, 1)}
                    for wid, seen in workers
                ],
            }
        )
    cache_keys, complete = count_cache_keys(client, keys, scan_limit)
    return {
        "namespace": keys.namespace,
        "models": models,
        "cache_keys": cache_keys,
        "cache_keys_complete": complete,
        "worker_window_s": WORKER_WINDOW_S,
        "problems": problems,
    }


def format_table(status: dict, redis_url: str) -> str:
    lines = [f"namespace {status['namespace']} on {redis_url}"]
    if status["models"]:
        header = ("MODEL", "DIM", "FINGERPRINT", "QUEUED", "TEXTS", "PENDING", "DEAD", "WORKERS")
        rows = [
            (
                m["name"],
                str(m["dimension"]),
                m["fingerprint"][:12],
                str(m["queue_depth"]),
                str(m["texts_queued"]),
                str(m["pending"]),
                str(m["dead_letters"]),
                str(m["workers_alive"]),
            )
            for m in status["models"]
        ]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            cells = [
                cell.ljust(width) if i < 3 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        window = status["worker_window_s"]
        for m in status["models"]:
            seen = ", ".join(f"{w['id']} ({w['seen_s_ago']:.0f}s ago)" for w in m["workers"])
            lines.append(f"workers of {m['name']} (last {window:.0f}s): {seen or 'none'}")
    else:
        lines.append("no model registered (start a worker: embedq worker)")
    count = status["cache_keys"]
    shown = f"{count}" if status["cache_keys_complete"] else f"≥{count} (scan stopped)"
    lines.append(f"cached vectors: {shown}")
    lines.extend(f"warning: {problem}" for problem in status["problems"])
    return "\n".join(lines)


# -- state files: how `embedq status` finds `embedq serve` -------------------------------


def state_dir() -> Path:
    """Where serve's state files and status' stored counts live."""
    explicit = SETTINGS["state_dir"].raw()
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "embedq"
    return Path.home() / ".cache" / "embedq"


def url_without_password(url: str) -> str:
    """The URL with any password removed (the user name stays)."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    netloc = f"{userinfo.split(':', 1)[0]}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _write_private(path: Path, data: dict) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    os.replace(temporary, path)


def write_serve_state(port: int, redis_url: str, namespace: str, **extra: object) -> Path:
    """Record a running `embedq serve` (mode 0600; the caller removes it on exit)."""
    path = state_dir() / f"serve-{port}.json"
    state = {
        "pid": os.getpid(),
        "port": port,
        "redis_url": url_without_password(redis_url),
        "namespace": namespace,
        "started_unix": round(time.time(), 3),
        **extra,
    }
    _write_private(path, state)
    return path


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_serves() -> list[dict]:
    """State of every `embedq serve` whose process is alive, by port."""
    found = []
    for path in sorted(state_dir().glob("serve-*.json")):
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(path.read_text())
            if isinstance(state, dict) and _alive(state.get("pid")) and state.get("redis_url"):
                found.append(state)
    return sorted(found, key=lambda state: state.get("port", 0))


class NoTarget(Exception):
    """No Redis to ask: the one-line reason."""


def pick_serve(port: int | None) -> dict:
    serves = running_serves()
    if port is not None:
        serves = [state for state in serves if state.get("port") == port]
        if not serves:
            raise NoTarget(
                f"no running `embedq serve` on port {port} (state files in {state_dir()})"
            )
    if not serves:
        raise NoTarget(
            f"no --redis-url given and no running `embedq serve` found (state files in "
            f"{state_dir()}): pass --redis-url or set EMBEDQ_REDIS_URL"
        )
    if len(serves) > 1:
        listed = ", ".join(f"port {s.get('port')} (pid {s.get('pid')})" for s in serves)
        raise NoTarget(f"several `embedq serve` are running: {listed}; pick one with --port")
    return serves[0]


# -- health verdict -------------------------------------------------------------------


def _dead_letter_store(safe_url: str, namespace: str) -> Path:
    digest = hashlib.sha256(f"{safe_url}|{namespace}".encode()).hexdigest()[:16]
    return state_dir() / f"status-{digest}.json"


def _stored_dead_letters(path: Path) -> dict[str, int] | None:
    try:
        counts = json.loads(path.read_text()).get("dead_letters")
    except (OSError, ValueError, AttributeError):
        return None
    return counts if isinstance(counts, dict) else None


def verdict(status: dict, dead_before: dict[str, int] | None) -> list[str]:
    """Why the deployment is unhealthy (empty: healthy)."""
    reasons = []
    if not status["models"]:
        reasons.append("no model registered (no worker has started)")
    for model in status["models"]:
        if model["workers_alive"] == 0:
            reasons.append(
                f"model {model['name']!r} has no live worker "
                f"(no heartbeat in {status['worker_window_s']:.0f}s)"
            )
        before = (dead_before or {}).get(model["name"])
        if isinstance(before, int) and model["dead_letters"] > before:
            reasons.append(
                f"model {model['name']!r}: dead letters grew from {before} to "
                f"{model['dead_letters']}"
            )
    return reasons


def run_status_command(args: argparse.Namespace) -> int:
    namespace = args.namespace
    redis_url = args.redis_url
    if not redis_url:
        try:
            serve = pick_serve(args.serve_port)
        except NoTarget as exc:
            print(f"embedq status: {exc}", file=sys.stderr)
            return 2
        redis_url = serve["redis_url"]
        namespace = namespace or serve.get("namespace")
    settings = RedisSettings.from_env(url=redis_url, namespace=namespace)
    keys = Keys(settings.namespace)
    client = settings.connect()
    store = _dead_letter_store(settings.safe_url, settings.namespace)
    try:
        if args.interval > 0:
            first = collect(client, keys, args.cache_scan_limit)
            dead_before = {m["name"]: m["dead_letters"] for m in first["models"]}
            time.sleep(args.interval)
        else:
            dead_before = _stored_dead_letters(store)
        status = collect(client, keys, args.cache_scan_limit)
    except REDIS_TROUBLE as exc:
        print(
            f"embedq status: redis at {settings.safe_url}: {settings.describe_error(exc)}",
            file=sys.stderr,
        )
        return 1
    finally:
        client.close()
    with contextlib.suppress(OSError):  # a read-only home only loses the comparison
        dead = {m["name"]: m["dead_letters"] for m in status["models"]}
        _write_private(store, {"dead_letters": dead, "at_unix": round(time.time(), 3)})
    reasons = verdict(status, dead_before)
    if args.json:
        print(json.dumps({"redis": settings.safe_url, **status, "unhealthy": reasons}, indent=2))
    else:
        print(format_table(status, settings.safe_url))
    if reasons:
        print(f"embedq status: unhealthy: {'; '.join(reasons)}", file=sys.stderr)
        return 1
    return 0
