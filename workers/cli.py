"""`embedq worker`: one worker process per device (one per GPU).

Its flags come from the declarations in embedq.settings (embedq.flags makes them);
with several devices it supervises one child per device with the same policy as
`embedq serve` (embedq.workerpool).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, MutableMapping

from embedq.flags import add_flags
from embedq.settings import BACKEND_CHOICES, WORKER, RedisSettings, WorkerSettings

log = logging.getLogger(__name__)

__all__ = [
    "BACKEND_CHOICES",
    "add_worker_command",
    "limit_openmp_spin",
    "lower_cpu_priority",
    "parse_devices",
    "run_worker_command",
]

# libgomp, the OpenMP runtime of torch's Linux CPU builds, keeps its threads spinning for
# 300,000 iterations after every parallel region before they sleep: about 13 ms of a core,
# measured on an AMD EPYC. A worker shares its machine with the server, Redis and the
# callers, and in the gap between two passes for waiting consumers that spin takes a core
# from the very processes that carry the answers out and the next texts in (16 waiting
# streams on 2 cores: about 6 % more texts/s, docs/benchmarks.md). 20,000 iterations (~1 ms)
# still spans the gaps between one pass's own operations (2,000 made a one-text pass ~8 ms
# slower: its threads slept and woke per operation).
OPENMP_SPIN_COUNT = "20000"


def limit_openmp_spin(
    environ: MutableMapping[str, str] = os.environ, loaded: Mapping[str, object] = sys.modules
) -> bool:
    """Shorten OpenMP's spin after each parallel region (see OPENMP_SPIN_COUNT), unless the
    user chose: GOMP_SPINCOUNT or OMP_WAIT_POLICY already set. Only before torch is loaded
    (libgomp reads it once, at load) and in this process's children. Returns whether it set it."""
    if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return False
    if "torch" in loaded:
        log.debug("torch already loaded: OpenMP keeps its default spin")
        return False
    environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    return True


def lower_cpu_priority(increment: int, tasks: str = "/proc/self/task") -> int:
    """Add `increment` to the niceness of every thread of this process (threads started
    later inherit it from the one that starts them); the niceness now, or -1 if the system
    would not have it. Why: a worker on the CPU shares its cores with the server, Redis and
    the callers, whose short tasks should not queue behind a forward pass (measured: the
    first wave of a 64-client burst refused in 67-80 ms at the median instead of 76-106)."""
    if increment <= 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    try:
        threads = [int(name) for name in os.listdir(tasks)]
    except OSError:  # not Linux: the process's niceness, which its threads share
        threads = [0]
    try:
        for thread in threads:
            now = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, min(19, now + increment))
    except OSError as exc:
        log.warning("could not lower the worker's CPU priority (%s)", exc)
        return -1
    return os.getpriority(os.PRIO_PROCESS, 0)


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


def add_worker_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run model workers that take jobs from Redis",
        description="Run embedq workers: each reads jobs from the model's Redis stream through "
        "a consumer group, encodes them in token-budget batches and writes the cache. With "
        "several devices: one process each, restarted when it dies.",
    )
    add_flags(parser, WORKER)
    parser.set_defaults(func=run_worker_command)


def run_worker_command(args: argparse.Namespace) -> int:
    limit_openmp_spin()  # first: parse_devices("auto") loads torch
    devices = parse_devices(args.devices)
    if args.dead_after_s < 2:
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
        return run_one_worker(args, devices[0])
    return supervise_devices(args, devices)


def run_one_worker(args: argparse.Namespace, device: str) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    if device == "cpu":
        lower_cpu_priority(args.cpu_nice)
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # two workers on two cores: one each, no thrash

    from .metrics import start_metrics_server
    from .worker import Worker

    hf_logging.disable_progress_bar()  # a progress bar is noise in a service log
    if args.metrics_port:
        start_metrics_server(args.metrics_port, args.metrics_host)
    # worker_id: EMBEDQ_WORKER_ID, set by a supervisor to hand over our jobs when we exit.
    settings = WorkerSettings.from_args(args, device=device)
    try:
        worker = Worker(settings, encoder=bench_encoder(settings))
    except ValueError as exc:  # an unknown or unsupported model: say which, no traceback
        print(f"embedq worker: {exc}", file=sys.stderr)
        return 2
    worker.install_signal_handlers()
    worker.run()
    return 0


def bench_encoder(settings: WorkerSettings) -> object | None:
    """bench-zero / bench-sim's encoder (with --sim-* costs); None for a real backend."""
    if settings.backend not in ("bench-zero", "bench-sim"):
        return None
    from .backends.simulated import SimCost, load_bench_encoder

    cost = SimCost(settings.sim_forward_ms, settings.sim_token_us)
    return load_bench_encoder(settings.model, settings.backend, settings.device, cost)


def supervise_devices(args: argparse.Namespace, devices: list[str]) -> int:
    """One child process per device (device i's metrics on --metrics-port + i),
    kept running by embedq.workerpool until SIGTERM / Ctrl-C; exit 2 when a child
    refused its configuration (raised as SettingsError: one line)."""
    from embedq.workerpool import WorkerPool, forget_worker

    argvs = [
        device_argv(sys.argv[1:], device, index, args.metrics_port)
        for index, device in enumerate(devices)
    ]
    forget = functools.partial(forget_worker, RedisSettings.from_args(args))
    labels = [f"worker on {device}" for device in devices]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    pool = WorkerPool(argvs, on_exit=forget, labels=labels, id_prefix="worker")
    try:
        pool.run(stop)
    finally:
        codes = pool.stop()
    return 0 if all(code == 0 for code in codes) else 1


def device_argv(argv: list[str], device: str, index: int, metrics_port: int) -> list[str]:
    """Our command line for one device's child."""
    argv = _replace_flag(argv, "--devices", device)
    port = metrics_port + index if metrics_port else 0
    return [sys.executable, "-m", "embedq.cli", *_replace_flag(argv, "--metrics-port", str(port))]


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
