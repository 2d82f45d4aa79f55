"""`embedq bridge`: the command line.

``add_bridge_command(subparsers)`` registers it on the `embedq` command;
``python -m embedq.bridge`` runs it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from embedq.client.cli import (
    _connection_parser,
    _model_parser,
    _positive_int,
    _precision_parser,
    _prompt_parser,
    read_token_file,
)

from .brokers.base import BridgeError, ConfigError, scrub

log = logging.getLogger("embedq.bridge")

DESCRIPTION = """\
Consume messages from a broker (--from), embed their texts with an embedq
server (--target), publish one result per input to a broker (--to), in input
order. Each input is acknowledged only after its result is published and
confirmed (at least once: after a crash some results may be published twice,
none is lost). Runs until SIGTERM / Ctrl-C, then finishes what it holds.

Broker URLs (any source to any sink):
  redis://[user:pass@]HOST:PORT/DB?stream=NAME&group=GROUP   Redis Streams source
        [&claim_idle_ms=MS&start=0|$]                      (consumer group)
  redis://HOST:PORT/DB?stream=NAME[&maxlen=N]               Redis Streams sink (XADD)
  nats://[user:pass@]HOST:PORT/SUBJECT[?durable=NAME&stream=NAME]
                                   NATS JetStream: durable pull consumer / publish
                                   with ack; the stream must exist
  amqp://USER:PASS@HOST:PORT/VHOST?queue=NAME               RabbitMQ source
  amqp://USER:PASS@HOST:PORT/VHOST?exchange=X&routing_key=K RabbitMQ sink
                                   (or ?queue=Q: the default exchange)
  mqtt://[user:pass@]HOST:PORT/TOPIC[?client_id=ID]         MQTT 5, QoS 1
(rediss://, amqps://, mqtts://, tls:// for TLS.) Kafka is not supported yet.

Messages: a JSON object with the text at --text-field (dotted path) and the id
at --id-field (else the broker's id), or --input-format text (the body is the
text); a Redis stream entry's field map is the object. Results: the input
object plus "embedding", "model", "dimension" (--output-format json), or the
packed little-endian vector with id/model/dimension/dtype headers (binary).

Poison messages (not UTF-8, not JSON, no text, over the server's limits,
refused by the server with INVALID_ARGUMENT) go to --dead-letter with the
original body and the reason in headers (embedq-reason); without it they are
logged and rejected the broker's way. Server trouble (UNAVAILABLE,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) is retried with backoff; nothing is
acknowledged meanwhile; a stream with no answer for --timeout seconds is
restarted.

Exit status: 0 after a clean stop, 2 for a setting that cannot work (bad URL,
missing stream/queue/exchange, unknown model), 1 when a broker or the server
fails for good.

examples:
  embedq bridge --from 'redis://127.0.0.1:6379/0?stream=events&group=embedq' \\
                --to 'redis://127.0.0.1:6379/0?stream=vectors'
  embedq bridge --from nats://127.0.0.1:4222/events.in --to nats://127.0.0.1:4222/events.out \\
                --dead-letter nats://127.0.0.1:4222/events.dead --text-field body.text
  embedq bridge --from 'amqp://guest:guest@127.0.0.1:5672/%2F?queue=texts' \\
                --to 'mqtt://127.0.0.1:1883/vectors' --output-format binary
See docs/bridge.md.
"""


def _bridge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    brokers = parser.add_argument_group("brokers")
    brokers.add_argument(
        "--from", dest="source", required=True, metavar="URL", help="where messages come from"
    )
    brokers.add_argument(
        "--to", dest="sink", required=True, metavar="URL", help="where results are published"
    )
    brokers.add_argument(
        "--dead-letter",
        metavar="URL",
        default=None,
        help="where poison messages go, with the reason (any sink URL; default: log and "
        "reject them the broker's way)",
    )
    brokers.add_argument(
        "--consumer",
        metavar="NAME",
        default=None,
        help="consumer name: Redis consumer (default: unique per process), NATS durable "
        "(default: embedq-bridge-<subject>), MQTT client id (default: embedq-bridge-<hash>)",
    )
    brokers.add_argument(
        "--claim-idle",
        type=_positive_int,
        default=60_000,
        metavar="MS",
        help="Redis Streams: take over entries another consumer has held this long "
        "(its bridge died) (default: %(default)s)",
    )
    formats = parser.add_argument_group("message formats")
    formats.add_argument(
        "--input-format",
        choices=("json", "text"),
        default="json",
        help="JSON objects, or the raw UTF-8 body as the text (default: json)",
    )
    formats.add_argument(
        "--text-field",
        default="text",
        metavar="PATH",
        help="where the text is in a JSON object; dotted path (default: text)",
    )
    formats.add_argument(
        "--id-field",
        default="id",
        metavar="PATH",
        help="where the id is; absent: the broker's message id (default: id)",
    )
    formats.add_argument(
        "--output-format",
        choices=("json", "binary"),
        default="json",
        help="the input object with the vector added, or the packed vector "
        "with headers (default: json)",
    )
    flow = parser.add_argument_group("flow")
    flow.add_argument(
        "--max-in-flight",
        type=_positive_int,
        default=512,
        metavar="N",
        help="most messages held at once (taken, not yet acknowledged); the broker keeps "
        "the rest (default: %(default)s)",
    )
    flow.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM / Ctrl-C, time to finish what is held (default: 30)",
    )
    flow.add_argument(
        "--max-backoff",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="longest wait between retries while the server is in trouble (default: 10)",
    )
    flow.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=5,
        metavar="N",
        help="tries of a message the server fails with an unexpected error "
        "(INTERNAL, ...) before it is dead-lettered (default: 5)",
    )
    flow.add_argument(
        "--broker-grace",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a failing broker call is retried before the bridge "
        "stops with status 1 (default: 60)",
    )
    observe = parser.add_argument_group("observability")
    observe.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve embedq_bridge_* Prometheus metrics on PORT (default: off)",
    )
    observe.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address of the metrics endpoint (default: %(default)s)",
    )
    return parser


def add_bridge_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bridge",
        help="message brokers in, vectors out (Redis Streams, NATS, RabbitMQ, MQTT)",
        description=DESCRIPTION,
        parents=[
            _bridge_parser(),
            _connection_parser(),
            _model_parser(),
            _prompt_parser(),
            _precision_parser(),
        ],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run_bridge)
    return parser


class _Scrub(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def run_bridge(args: argparse.Namespace) -> int:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Scrub())
    try:
        return asyncio.run(_main(args))
    except BridgeError as error:
        print(f"embedq bridge: error: {scrub(str(error))}", file=sys.stderr)
        return error.code
    except (ValueError, OSError) as error:
        print(f"embedq bridge: error: {scrub(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build(args: argparse.Namespace):
    """The Bridge for parsed arguments (ConfigError / ValueError for settings that cannot work)."""
    from embedq.client import AsyncClient
    from embedq.client._convert import encode_options, output_options
    from embedq.client.stream import check_output

    from .brokers import make_sink, make_source
    from .brokers.base import Options
    from .core import Bridge, Settings
    from .formats import InputFormat

    output = output_options(
        dimension=args.dimension,
        precision=args.precision,
        prompt=args.prompt,
        prompt_name=args.prompt_name,
    )
    try:
        check_output(output)
    except ValueError:
        raise ConfigError(
            f"--precision {args.precision} calibrates on the vectors of one request, and the "
            "bridge sends one text per request: use float32, float16, binary or ubinary"
        ) from None
    options = encode_options(
        model=args.model, normalize=args.normalize, truncate=args.truncate, output=output
    )
    broker_options = Options(
        max_in_flight=args.max_in_flight, consumer=args.consumer, claim_idle_ms=args.claim_idle
    )
    source = make_source(args.source, broker_options)
    sink = make_sink(args.sink, broker_options)
    dead_letter = make_sink(args.dead_letter, broker_options) if args.dead_letter else None
    token = read_token_file(args.token_file) if args.token_file else args.token
    client = AsyncClient(
        args.target,
        timeout=args.timeout,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=token,
    )
    settings = Settings(
        input=InputFormat(args.input_format, args.text_field, args.id_field),
        output_format=args.output_format,
        options=options,
        max_in_flight=args.max_in_flight,
        drain_timeout=args.drain_timeout,
        backoff_max=max(0.1, args.max_backoff),
        max_attempts=args.max_attempts,
        answer_timeout=args.timeout,
        broker_grace=args.broker_grace,
    )
    return Bridge(source, sink, client, settings, dead_letter=dead_letter)


async def _main(args: argparse.Namespace) -> int:
    bridge = build(args)
    if args.metrics_port:
        bridge.metrics.serve(args.metrics_port, args.metrics_host)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: draining (again to stop at once)", signal.Signals(signum).name)
            stop.set()
        else:
            log.warning("second signal: stopping without draining")
            for task in asyncio.all_tasks(loop):
                task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await bridge.run(stop)
    except asyncio.CancelledError:
        return 130
    finally:
        await bridge.client.close()


def main(argv: Sequence[str] | None = None) -> int:
    from embedq.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m embedq.bridge")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_bridge_command(sub)
    args = parser.parse_args(["bridge", *(argv if argv is not None else sys.argv[1:])])
    configure_logging("INFO", "text")
    return args.func(args)
