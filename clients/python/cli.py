"""Client subcommands of the `embedq` command line.

``add_client_commands(subparsers)`` registers encode, similarity, rank, info,
lookup and tokenize; each sets ``func`` to a callable(args) -> exit code.
``python -m embedq.client`` runs them on their own.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

import grpc

from ._common import DEFAULT_TARGET
from ._convert import (
    CALIBRATED,
    METRICS,
    PRECISIONS,
    Info,
    numpy_dtype,
    quantize_int8,
    row_width,
)
from ._errors import EmbedqError
from ._io import CalibratingWriter, Writer, open_input, open_output, read_batches
from .sync import Client

ENV_TARGET = "EMBEDQ_TARGET"
ENV_TOKEN = "EMBEDQ_TOKEN"
Command = Callable[[argparse.Namespace], int]


def _run_safely(command: Command) -> Command:
    """Errors become one "error: ..." line on stderr and exit code 1, never a traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except EmbedqError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, and keep Python's
            # exit-time flush of stdout from raising again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
        except KeyboardInterrupt:
            return 130
        return 1

    return run


def _connection_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get(ENV_TARGET) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"embedq server address (default: ${ENV_TARGET}, else {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="deadline of each call to the server (default: %(default)s)",
    )
    group.add_argument(
        "--no-retry",
        dest="retry",
        action="store_false",
        help="fail at the first UNAVAILABLE or RESOURCE_EXHAUSTED instead of retrying "
        "with backoff within --timeout (default: retry, up to 5 attempts)",
    )
    security = parser.add_argument_group("security")
    security.add_argument(
        "--tls",
        action="store_true",
        default=os.environ.get("EMBEDQ_TLS", "") == "1",
        help="connect over TLS, verified with the system's roots (implied by --tls-ca) "
        "(default: $EMBEDQ_TLS=1, else plaintext)",
    )
    security.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=os.environ.get("EMBEDQ_TLS_CA") or None,
        help="PEM CA bundle that verifies the server: connect over TLS (default: $EMBEDQ_TLS_CA)",
    )
    security.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=os.environ.get("EMBEDQ_CLIENT_CERT") or None,
        help="PEM client certificate, for a server that requires one (mutual TLS) "
        "(default: $EMBEDQ_CLIENT_CERT)",
    )
    security.add_argument(
        "--tls-key",
        metavar="FILE",
        default=os.environ.get("EMBEDQ_CLIENT_KEY") or None,
        help="PEM private key of --tls-cert (default: $EMBEDQ_CLIENT_KEY)",
    )
    security.add_argument(
        "--token",
        default=os.environ.get(ENV_TOKEN) or None,
        help=f"bearer token sent with every call; other users can see a command line, so "
        f"prefer ${ENV_TOKEN} or --token-file (default: ${ENV_TOKEN})",
    )
    security.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help="read the bearer token from FILE (its first line that is not blank or a # comment)",
    )
    return parser


def read_token_file(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            token = line.strip()
            if token and not token.startswith("#"):
                return token
    raise ValueError(f"--token-file {path!r} holds no token")


def _model_parser(*, normalize: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="", help="served model name (default: the server's)")
    if normalize:
        group.add_argument(
            "--normalize",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="L2-normalise the vectors (default: as the model says)",
        )
    group.add_argument(
        "--no-truncate",
        dest="truncate",
        action="store_false",
        help="refuse texts longer than the model's max sequence length instead of cutting them",
    )
    return parser


def _prompt_parser() -> argparse.ArgumentParser:
    """--dimension, --prompt, --prompt-name: what every embedding command takes."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("output and prompts")
    group.add_argument(
        "--dimension",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="keep the first N dimensions (Matryoshka), re-normalised when normalising "
        "(default: the model's dimension)",
    )
    prompts = group.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompt",
        default=None,
        metavar="TEXT",
        help="prepend TEXT to every text; '' turns off the model's default prompt",
    )
    prompts.add_argument(
        "--prompt-name",
        default=None,
        metavar="NAME",
        help="use the model's named prompt NAME (see `embedq info`)",
    )
    return parser


def _precision_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--precision",
        default="float32",
        choices=list(PRECISIONS),
        help="element type of the vectors, as sentence-transformers' quantize_embeddings; "
        "binary/ubinary rows are ceil(dimension / 8) packed bytes; int8/uint8 are "
        "calibrated on all of the input's vectors (default: %(default)s)",
    )
    return parser


def _prompt_args(args: argparse.Namespace) -> dict:
    return {"dimension": args.dimension, "prompt": args.prompt, "prompt_name": args.prompt_name}


def _client(args: argparse.Namespace, chunk_size: int = 256) -> Client:
    token = read_token_file(args.token_file) if args.token_file else args.token
    return Client(
        args.target,
        timeout=args.timeout,
        chunk_size=chunk_size,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=token,
        retry=getattr(args, "retry", True),
    )


def _add(
    subparsers: argparse._SubParsersAction,
    name: str,
    command: Command,
    summary: str,
    description: str,
    parents: Sequence[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=description,
        parents=list(parents),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=_run_safely(command))
    return parser


# ---- encode ----------------------------------------------------------------

ENCODE_DESCRIPTION = """\
Embed one text per input line (only the line ending is removed; empty lines
are empty texts) and write one vector per line, in input order.

The input is read and sent in batches, so big files stream. Output formats:
  FILE.npy     array (lines, dimension), as numpy.save writes it; its dtype is
               the precision's: float32, float16, int8, uint8 (binary: int8 and
               ubinary: uint8, with ceil(dimension / 8) packed bytes a row)
  FILE.jsonl   one {"index": i, "text": ..., "embedding": [...]} per line
  -            JSON lines on stdout (the default)
--precision int8/uint8 calibrate on the vectors of the whole input (as
quantize_embeddings does without ranges): those rows are written at the end.
A progress bar (texts/s) goes to stderr when it is a terminal.

examples:
  embedq encode --input sentences.txt --output vectors.npy
  embedq encode --input docs.txt --output bits.npy --precision ubinary --dimension 256
  printf 'hello\\nworld\\n' | embedq encode --target 10.0.0.5:50051 --prompt 'query: '
"""


def _encode(args: argparse.Namespace) -> int:
    precision = PRECISIONS[args.precision]
    with _client(args, chunk_size=args.batch_size) as client, open_input(args.input) as source:
        writer = open_output(args.output, numpy_dtype(precision))
        sent = args.precision
        if precision in CALIBRATED:
            # Every block would calibrate on its own rows: ask for float32 and
            # quantise once, over all of the input, at the end.
            writer = CalibratingWriter(
                writer, lambda rows, low, high: quantize_int8(rows, low, high, precision)
            )
            sent = "float32"
        try:
            _encode_into(client, source, writer, args, sent)
        finally:
            writer.close()
    return 0


class _NoProgress:
    """Stands in for a tqdm bar where tqdm is not installed."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _progress() -> Any:
    """A progress bar on a terminal's stderr: tqdm when installed, else nothing.

    tqdm is optional so that the base install (`pip install embedq`) stays
    grpcio, protobuf and numpy; the bar is cosmetic and never on a pipe anyway.
    """
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(unit=" texts", file=sys.stderr, disable=not sys.stderr.isatty())


def _encode_into(
    client: Client, source: IO[str], writer: Writer, args: argparse.Namespace, precision: str
) -> None:
    # One read block feeds max_in_flight concurrent requests of batch_size texts.
    block = args.batch_size * client.max_in_flight
    done = 0
    with _progress() as bar:
        for batch in read_batches(source, block):
            vectors = client.encode(
                batch,
                normalize=args.normalize,
                truncate=args.truncate,
                model=args.model,
                precision=precision,
                **_prompt_args(args),
            )
            writer.write(done, batch, vectors)
            done += len(batch)
            bar.update(len(batch))

    def width() -> int:
        dimension = args.dimension or _model_dimension(client, args.model)
        return row_width(PRECISIONS[args.precision], dimension)

    writer.finish(width)


def _model_dimension(client: Client, model: str) -> int:
    try:
        return client.info().model(model).dimension
    except KeyError:
        raise EmbedqError(grpc.StatusCode.NOT_FOUND, f"model {model!r} is not served") from None


def _add_encode(subparsers: argparse._SubParsersAction, parents: list) -> None:
    parents = [*parents, _precision_parser()]
    parser = _add(
        subparsers, "encode", _encode, "embed the lines of a file", ENCODE_DESCRIPTION, parents
    )
    parser.add_argument(
        "--input",
        default="-",
        metavar="FILE|-",
        help="UTF-8 text, one text per line (default: stdin)",
    )
    parser.add_argument(
        "--output",
        default="-",
        metavar="FILE.npy|FILE.jsonl|-",
        help="where the vectors go; the format follows the extension "
        "(default: JSON lines on stdout)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        metavar="N",
        help="texts per request (default: %(default)s)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


# ---- similarity / rank ------------------------------------------------------


def _similarity(args: argparse.Namespace) -> int:
    with _client(args) as client:
        score = client.similarity(
            args.text_a,
            args.text_b,
            metric=args.metric,
            normalize=args.normalize,
            truncate=args.truncate,
            model=args.model,
            **_prompt_args(args),
        )
    # As rank prints scores: 6 decimals (float32 carries about 7 digits).
    print(f"{score:.6f}")
    return 0


def _rank(args: argparse.Namespace) -> int:
    with _client(args) as client:
        matches = client.rank(
            args.query,
            args.candidates,
            top_k=args.top_k,
            metric=args.metric,
            normalize=args.normalize,
            truncate=args.truncate,
            model=args.model,
            **_prompt_args(args),
        )
    for index, score in matches:
        print(f"{score:.6f}\t{index}\t{args.candidates[index]}")
    return 0


def _metric_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--metric",
        default="cosine",
        choices=list(METRICS),
        help="similarity function; higher is always more similar, distances come "
        "negated (default: %(default)s)",
    )
    return parser


def _add_similarity(subparsers: argparse._SubParsersAction, parents: list) -> None:
    parents = [*parents, _metric_parser()]
    parser = _add(
        subparsers,
        "similarity",
        _similarity,
        "score two texts",
        "Print the similarity score of TEXT_A and TEXT_B.\n\n"
        "example:\n  embedq similarity 'A man is eating.' 'Someone eats food.'",
        parents,
    )
    parser.add_argument("text_a", metavar="TEXT_A")
    parser.add_argument("text_b", metavar="TEXT_B")
    parser = _add(
        subparsers,
        "rank",
        _rank,
        "rank candidates against a query",
        "Print the candidates best first, one 'score<TAB>index<TAB>text' per line.\n\n"
        "example:\n  embedq rank --top-k 2 'fruit' 'apple' 'car' 'banana'",
        parents,
    )
    parser.add_argument("query", metavar="QUERY")
    parser.add_argument("candidates", metavar="CANDIDATE", nargs="+")
    parser.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="keep the best K only (default: all)"
    )


# ---- info -------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.info()
    print(json.dumps(info.to_dict(), indent=2) if args.json else _describe(info, args.target))
    return 0


def _describe(info: Info, target: str) -> str:
    lines = [f"embedq {info.version or '?'} at {target}"]
    for m in info.models:
        default = " (default)" if m.name == info.default_model else ""
        lines += [
            f"model {m.name}{default}",
            f"  dimension        {m.dimension}",
            f"  pooling          {m.pooling}",
            f"  max_seq_length   {m.max_seq_length}",
            f"  normalize        {str(m.normalize).lower()}",
            f"  workers alive    {m.workers_alive}",
            f"  fingerprint      {m.fingerprint}",
            f"  source           {m.source}",
        ]
        for name, prompt in m.prompts.items():
            default = " (default)" if name == m.default_prompt_name else ""
            lines.append(f"  prompt {name!r}{default}: {prompt!r}")
    limits = info.limits
    lines += [
        "limits",
        f"  max_batch_texts   {limits.max_batch_texts}",
        f"  max_text_bytes    {limits.max_text_bytes}",
        f"  max_message_bytes {limits.max_message_bytes}",
        f"  max_candidates    {limits.max_candidates}",
    ]
    return "\n".join(lines)


def _add_info(subparsers: argparse._SubParsersAction, parents: list) -> None:
    parser = _add(
        subparsers,
        "info",
        _info,
        "describe the served models and limits",
        "Print each served model (name, dimension, pooling, max sequence length,\n"
        "default normalisation, live workers, fingerprint, source, named prompts) and the\n"
        "request limits.",
        parents,
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


# ---- lookup -----------------------------------------------------------------


def _lookup(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.lookup(
            args.texts,
            sha256=args.sha256,
            normalize=args.normalize,
            truncate=args.truncate,
            model=args.model,
            precision=args.precision,
            **_prompt_args(args),
        )
    keys = [("text", t) for t in args.texts] + [("sha256", h.lower()) for h in args.sha256]
    for index, ((kind, key), found) in enumerate(zip(keys, result.found.tolist(), strict=True)):
        vector = result.vectors[index].tolist() if found else None
        record = {"index": index, kind: key, "found": found, "embedding": vector}
        print(json.dumps(record, ensure_ascii=False))
    return 0


def _add_lookup(subparsers: argparse._SubParsersAction, parents: list) -> None:
    parents = [*parents, _precision_parser()]
    parser = _add(
        subparsers,
        "lookup",
        _lookup,
        "read cached vectors (never computes)",
        "Look texts or SHA-256 digests up in the cache; print one JSON line per item\n"
        '(texts first): {"index", "text"|"sha256", "found", "embedding" or null}.\n'
        "--normalize/--no-truncate/--model/--prompt/--prompt-name select the cache variant;\n"
        "--dimension/--precision shape the answer (int8/uint8: calibrated on the hits).\n\n"
        "example:\n  embedq lookup 'hello world' --sha256 $(printf %s hi | sha256sum | cut -c1-64)",
        parents,
    )
    parser.add_argument("texts", metavar="TEXT", nargs="*", help="texts to look up")
    parser.add_argument(
        "--sha256",
        action="append",
        default=[],
        metavar="HEX",
        help="hex SHA-256 of a text's UTF-8 bytes (repeatable)",
    )


# ---- tokenize ---------------------------------------------------------------


def _tokenize(args: argparse.Namespace) -> int:
    with _client(args) as client:
        results = client.tokenize(args.texts, truncate=args.truncate, model=args.model)
    for index, (text, tokenized) in enumerate(zip(args.texts, results, strict=True)):
        if args.json:
            record = {"index": index, "text": text, **vars(tokenized)}
            print(json.dumps(record, ensure_ascii=False))
            continue
        cut = f", truncated from {tokenized.full_length}" if tokenized.truncated else ""
        print(f"{' '.join(tokenized.tokens)}\t({len(tokenized.ids)} tokens{cut})")
    return 0


def _add_tokenize(subparsers: argparse._SubParsersAction, parents: list) -> None:
    parser = _add(
        subparsers,
        "tokenize",
        _tokenize,
        "show how the model tokenizes texts",
        "Print each text's tokens (special tokens included) as the model sees them.",
        parents,
    )
    parser.add_argument("texts", metavar="TEXT", nargs="+")
    parser.add_argument(
        "--json",
        action="store_true",
        help='one JSON line per text: {"index", "text", "ids", "tokens", "truncated", '
        '"full_length"}',
    )


# ---- registration -----------------------------------------------------------


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the client subcommands on an argparse subparsers object."""
    connection = _connection_parser()
    with_model = [connection, _model_parser(), _prompt_parser()]
    _add_encode(subparsers, with_model)
    _add_similarity(subparsers, with_model)
    _add_info(subparsers, [connection])
    _add_lookup(subparsers, with_model)
    _add_tokenize(subparsers, [connection, _model_parser(normalize=False)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m embedq.client", description="embedq client commands"
    )
    add_client_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
