"""`embedq status`: what a deployment looks like from its Redis.

Per registered model: jobs waiting in the stream (XLEN), jobs read but not
yet acknowledged (XPENDING), dead letters (XLEN), workers with a heartbeat
in the last 15 s and their ids, and the model's fingerprint and dimension;
plus the number of cached vectors (a bounded SCAN: it stops at
--cache-scan-limit and reports "≥N"). An aligned table, or JSON with --json.
Read-only: it never writes a key.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from google.protobuf.message import DecodeError
from redis.exceptions import RedisError, ResponseError

from embedq.keys import CONSUMER_GROUP, Keys, decode_registration
from embedq.settings import RedisSettings, ServerSettings, env, env_int

# Same window as the server's: a worker silent for longer counts as gone.
WORKER_WINDOW_S = ServerSettings.worker_stale_s
DEFAULT_SCAN_LIMIT = 100_000
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
    parser.add_argument(
        "--redis-url",
        default=env("REDIS_URL"),
        required=env("REDIS_URL") is None,
        help="redis:// or rediss:// URL; password via EMBEDQ_REDIS_PASSWORD [EMBEDQ_REDIS_URL]",
    )
    parser.add_argument(
        "--namespace", default=None, help="prefix of every Redis key [EMBEDQ_NAMESPACE; embedq]"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--cache-scan-limit",
        type=int,
        default=env_int("STATUS_SCAN_LIMIT", DEFAULT_SCAN_LIMIT),
        metavar="N",
        help="stop counting cache keys at N and report '≥N' (SCAN walks the whole keyspace) "
        "[EMBEDQ_STATUS_SCAN_LIMIT; %(default)s]",
    )
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
    results = pipe.execute(raise_on_error=False) if registrations else []
    models = []
    for index, (name, reg) in enumerate(registrations):
        queued, pending, dead, workers = results[4 * index : 4 * index + 4]
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
        header = ("MODEL", "DIM", "FINGERPRINT", "QUEUED", "PENDING", "DEAD", "WORKERS")
        rows = [
            (
                m["name"],
                str(m["dimension"]),
                m["fingerprint"][:12],
                str(m["queue_depth"]),
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


def run_status_command(args: argparse.Namespace) -> int:
    settings = RedisSettings.from_env(url=args.redis_url, namespace=args.namespace)
    keys = Keys(settings.namespace)
    client = settings.connect()
    try:
        status = collect(client, keys, args.cache_scan_limit)
    except (RedisError, OSError) as exc:
        print(
            f"embedq status: redis at {settings.safe_url}: {settings.describe_error(exc)}",
            file=sys.stderr,
        )
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps({"redis": settings.safe_url, **status}, indent=2))
    else:
        print(format_table(status, settings.safe_url))
    return 0
