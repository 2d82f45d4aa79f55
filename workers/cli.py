"""`embedq worker`: one worker process per device (one per GPU)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import subprocess
import sys

from embedq.server.cli import add_metrics_options

from embedq.settings import RedisSettings, WorkerSettings, env, env_int

log = logging.getLogger(__name__)

# Mirrors embedq.workers.backends.BACKENDS (not imported here: that would load torch for --help).
BACKEND_CHOICES = ("torch", "torch-int8", "onnx", "onnx-int8", "bench-zero", "bench-sim")


def parse_devices(spec: str) -> list[str]:
    """'auto' -> every visible GPU, else the CPU; '0,1' -> cuda:0, cuda:1; 'cpu'."""
    spec = spec.strip().lower()
    if spec == "auto":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    devices = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "cpu" or part.startswith("cuda"):
            devices.append(part)
        elif part.isdigit():
            devices.append(f"cuda:{part}")
        else:
            raise argparse.ArgumentTypeError(f"bad device {part!r}: use cpu, auto, 0,1 or cuda:N")
    return devices or ["cpu"]


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `embedq worker` and `embedq serve` (--model differs: one
    model per worker process, several for serve)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=env_int("THREADS", 0),
        help="CPU threads per worker process; several CPU workers on one machine should split "
        "the cores between them [EMBEDQ_THREADS; torch's default, or cores/N for serve "
        "--workers N on CPU]",
    )
    parser.add_argument(
        "--devices",
        default=env("DEVICES", "auto"),
        help="'auto' (every GPU, else CPU), 'cpu', or GPU indices like 0,1: one process each "
        "[EMBEDQ_DEVICES; %(default)s]",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        default=env("FP16", "") == "1",
        help="run the encoder in float16 on CUDA [EMBEDQ_FP16]",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default=env("BACKEND", "torch"),
        help="what runs the encoder: torch (exact float32); or, opt-in and CPU only, faster "
        "torch-int8, onnx or onnx-int8 whose vectors differ slightly (onnx*: pip install "
        "'embedq[fast]'); bench-zero, bench-sim: benchmarks only, no model, meaningless "
        "vectors (need --allow-bench-backend or EMBEDQ_ALLOW_BENCH_BACKEND=1) "
        "[EMBEDQ_BACKEND; %(default)s]",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=env_int("MAX_BATCH_TOKENS", 0),
        help="padded tokens per forward pass [EMBEDQ_MAX_BATCH_TOKENS; 2048 on CPU, 16384 on GPU]",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=env_int("MAX_BATCH_SIZE", 256),
        help="texts per forward pass [EMBEDQ_MAX_BATCH_SIZE; %(default)s]",
    )
    parser.add_argument(
        "--cache-ttl",
        type=int,
        default=env_int("CACHE_TTL", 7 * 24 * 3600),
        help="seconds a cached vector lives [EMBEDQ_CACHE_TTL; %(default)s]",
    )


def add_worker_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run model workers that take jobs from Redis",
        description="Run embedq workers: each reads jobs from the model's Redis stream through "
        "a consumer group, encodes them in token-budget batches and writes the cache.",
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
    parser.add_argument(
        "--model",
        default=env("MODEL"),
        help="model folder, NAME=FOLDER, or a model id in the local Hugging Face cache "
        "[EMBEDQ_MODEL; the bundled all-MiniLM-L6-v2]",
    )
    add_worker_options(parser)
    parser.add_argument(
        "--claim-idle-ms",
        type=int,
        default=env_int("CLAIM_IDLE_MS", 30000),
        help="claim jobs another worker left pending this long [EMBEDQ_CLAIM_IDLE_MS; %(default)s]",
    )
    parser.add_argument(
        "--max-deliveries",
        type=int,
        default=env_int("MAX_DELIVERIES", 3),
        help="deliveries before a job is dead-lettered [EMBEDQ_MAX_DELIVERIES; %(default)s]",
    )
    parser.add_argument(
        "--dead-after",
        type=float,
        default=float(env("DEAD_AFTER_S", "3.0")),
        help="seconds without a heartbeat after which a worker counts as dead and another "
        "takes over its pending jobs at once [EMBEDQ_DEAD_AFTER_S; %(default)s]",
    )
    add_bench_backend_options(parser)
    add_metrics_options(parser, "several devices: device i on PORT+i")
    parser.set_defaults(func=run_worker_command)


def add_bench_backend_options(parser: argparse.ArgumentParser) -> None:
    """The benchmark-only backends' flags (embedq worker; serve passes the env variables on)."""
    parser.add_argument(
        "--allow-bench-backend",
        action="store_true",
        default=env("ALLOW_BENCH_BACKEND", "") == "1",
        help="allow --backend bench-zero / bench-sim: no model, vectors from a hash of the "
        "token ids, own fingerprint; for benchmarks only [EMBEDQ_ALLOW_BENCH_BACKEND=1]",
    )
    parser.add_argument(
        "--sim-forward-ms",
        type=float,
        default=float(env("SIM_FORWARD_MS", "4.0")),
        help="bench-sim: sleep per forward pass, ms [EMBEDQ_SIM_FORWARD_MS; %(default)s]",
    )
    parser.add_argument(
        "--sim-token-us",
        type=float,
        default=float(env("SIM_TOKEN_US", "1.0")),
        help="bench-sim: sleep per padded token, us [EMBEDQ_SIM_TOKEN_US; %(default)s]",
    )


def worker_settings(args: argparse.Namespace, device: str) -> WorkerSettings:
    return WorkerSettings(
        redis=RedisSettings.from_env(url=args.redis_url, namespace=args.namespace),
        model=args.model,
        device=device,
        fp16=args.fp16,
        backend=args.backend,
        allow_bench_backend=getattr(args, "allow_bench_backend", False),
        sim_forward_ms=getattr(args, "sim_forward_ms", 4.0),
        sim_token_us=getattr(args, "sim_token_us", 1.0),
        max_batch_tokens=args.max_batch_tokens or None,
        max_batch_size=args.max_batch_size,
        cache_ttl_s=args.cache_ttl,
    )


def run_worker_command(args: argparse.Namespace) -> int:
    devices = parse_devices(args.devices)
    if args.dead_after < 2:
        # Heartbeats come every second: less would count live workers as dead.
        print("embedq worker: --dead-after must be at least 2 seconds", file=sys.stderr)
        return 2
    from .backends import BackendUnavailableError, check_backend

    try:  # before loading any weights: a missing package or a GPU fails right here
        for device in devices:
            check_backend(args.backend, device, allow_bench=args.allow_bench_backend)
    except BackendUnavailableError as exc:
        print(f"embedq worker: {exc}", file=sys.stderr)
        return 2
    if len(devices) == 1:
        import torch
        from transformers.utils import logging as hf_logging

        if args.threads > 0:
            torch.set_num_threads(args.threads)  # two workers on two cores: one each, no thrash

        from .metrics import start_metrics_server
        from .worker import Worker

        hf_logging.disable_progress_bar()  # a progress bar is noise in a service log
        if args.metrics_port:
            start_metrics_server(args.metrics_port, args.metrics_host)
        settings = dataclasses.replace(
            worker_settings(args, devices[0]),
            claim_idle_ms=args.claim_idle_ms,
            max_deliveries=args.max_deliveries,
            dead_after_s=args.dead_after,
            # serve's supervisor names its workers, to hand over their jobs when they exit.
            worker_id=env("WORKER_ID", "") or "",
        )
        try:
            worker = Worker(settings, encoder=bench_encoder(settings))
        except ValueError as exc:  # an unknown or unsupported model: say which, no traceback
            print(f"embedq worker: {exc}", file=sys.stderr)
            return 2
        worker.install_signal_handlers()
        worker.run()
        return 0
    return supervise_devices(devices, args.metrics_port)


def bench_encoder(settings: WorkerSettings) -> object | None:
    """bench-zero / bench-sim's encoder (with --sim-* costs); None for a real backend."""
    if settings.backend not in ("bench-zero", "bench-sim"):
        return None
    from .backends.simulated import SimCost, load_bench_encoder

    cost = SimCost(settings.sim_forward_ms, settings.sim_token_us)
    return load_bench_encoder(settings.model, settings.backend, settings.device, cost)


def supervise_devices(devices: list[str], metrics_port: int = 0) -> int:
    """One child process per device (device i's metrics on metrics_port + i);
    signals are passed on to all of them."""
    base = [a for a in sys.argv[1:]]
    children = []
    for index, device in enumerate(devices):
        argv = _replace_flag(base, "--devices", device)
        port = metrics_port + index if metrics_port else 0
        argv = _replace_flag(argv, "--metrics-port", str(port))
        children.append(subprocess.Popen([sys.executable, "-m", "embedq.cli", *argv]))
        log.info("started worker on %s (pid %d)", device, children[-1].pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


def _replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return [*out, flag, value]
