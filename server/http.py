"""HTTP/JSON beside gRPC: an OpenAI-compatible `/v1/embeddings` and friends.

Served by aiohttp on the gRPC server's own asyncio loop (`--http-port`), with
the same EmbedderService, hence the same dispatcher, cache, queue, limits and
models as gRPC: an HTTP request is a direct call of the gRPC handler, never a
hop through gRPC. Also the same bearer tokens (the same TokenSet), the same
TLS files and the same `embedq_requests_total{method,code}` metrics, with the
route as the method (`POST /v1/embeddings`) and the gRPC status name that the
HTTP status stands for as the code.

Routes (ROUTES below is the list; docs/api.md is generated from it):

- OpenAI's: `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{model}`,
  with OpenAI's JSON shapes and OpenAI's error shape
  ``{"error": {"message", "type", "param", "code"}}``;
- embedq's unary RPCs in the .proto's JSON mapping: `POST /v1/encode`,
  `/v1/similarity`, `/v1/lookup`, `/v1/tokenize`, `/v1/info`;
- `GET /health`, `/healthz`, `/readyz`: the gRPC health service's own state
  (no token needed, as for gRPC health).

`usage.prompt_tokens` counts the tokens the model reads (special tokens and
prompt included, after truncation), as the worker's Tokenize reports them.
The server reads the model's `tokenizer.json` (the tokenizer only, never the
model) when the worker's model folder is on this machine, and uses it only
after its counts matched the worker's on a real request; otherwise every
request asks the workers (a Tokenize job alongside the Encode).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2

from embedq.keys import RETRY_AFTER_MS_KEY, ErrorKind
from embedq.logs import REQUEST_ID, Throttled
from embedq.settings import ServerSettings, SettingsError
from embedq.v1 import embedq_pb2 as pb

from . import metrics, validation
from .auth import MISSING, TokenSet, bearer_token
from .errors import RequestError, as_request_error, grpc_status, http_status, kind_of_status
from .registry import ServedModel
from .router import EmbedderService

try:  # about 10x faster than json for vectors (and it writes float32 as float32)
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; json still works
    orjson = None

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name

# HTTP errors aiohttp raises itself -> the kind they are answered and counted as.
KIND_OF_HTTP = {
    400: ErrorKind.INVALID_INPUT,
    401: ErrorKind.UNAUTHENTICATED,
    403: ErrorKind.PERMISSION,
    404: ErrorKind.NOT_FOUND,
}
OPEN_PATHS = frozenset({"/health", "/healthz", "/readyz"})
MAX_DIMENSIONS = 2**32 - 1  # EncodeOptions.dimension is a uint32
EMBEDDINGS_FIELDS = frozenset(
    {"input", "model", "encoding_format", "dimensions", "user", "options"}
)
# Characters to tokenize above which the server's tokenizer runs in a thread.
TOKENIZE_INLINE_CHARS = 400
# Token counts remembered (texts, and their characters in all).
MEMO_TEXTS = 100_000
MEMO_CHARS = 16_000_000


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    open: bool = False  # no bearer token needed
    # What the router matches, where it differs from the path shown (a regex in it).
    pattern: str = ""

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


# Unary RPCs offered in the .proto's JSON mapping: path -> (RPC name, request class).
PROTO_ROUTES = {
    "/v1/encode": ("Encode", pb.EncodeRequest),
    "/v1/similarity": ("Similarity", pb.SimilarityRequest),
    "/v1/lookup": ("Lookup", pb.LookupRequest),
    "/v1/tokenize": ("Tokenize", pb.TokenizeRequest),
    "/v1/info": ("Info", pb.InfoRequest),
}

ROUTES = [
    Route(
        "POST",
        "/v1/embeddings",
        "OpenAI embeddings: `input` (a string or a list of strings), `model`, "
        "`encoding_format` (`float` or `base64`), `dimensions`, `user` (ignored); embedq's "
        "[EncodeOptions](#embedq.v1.EncodeOptions) as `options` (JSON mapping), float32 only. "
        "`usage` counts the tokens the model reads (an estimate, with the header "
        "`embedq-usage: estimated`, when neither the workers nor the server can count them).",
    ),
    Route("GET", "/v1/models", "OpenAI model list: the served models."),
    Route(
        "GET",
        "/v1/models/{model}",
        "OpenAI model retrieval (a name with `/` in it as is, or as `%2F`); 404 for a model "
        "not served.",
        pattern="/v1/models/{model:.+}",  # a model's name may hold "/" (NAME=PATH)
    ),
    *(
        Route(
            "POST",
            path,
            f"[{name}](#embedq.v1.Embedder.{name}) in the .proto's JSON mapping: body "
            f"[{request.DESCRIPTOR.name}](#{request.DESCRIPTOR.full_name}), answer its response "
            "(bytes as base64).",
        )
        for path, (name, request) in PROTO_ROUTES.items()
    ),
    Route(
        "GET",
        "/health",
        '`{"status": ..., "services": {...}}` of the gRPC health service; 200 while `""` '
        "is SERVING (Redis reachable), else 503.",
        open=True,
    ),
    Route("GET", "/healthz", '200 while gRPC health `""` is SERVING, else 503.', open=True),
    Route(
        "GET",
        "/readyz",
        f"200 while gRPC health `{SERVICE_NAME}` is SERVING (`?model=NAME`: "
        f"`{SERVICE_NAME}/NAME`), else 503.",
        open=True,
    ),
]
LABELS = {(route.method, route.path): route.label for route in ROUTES}


def routes_markdown() -> list[str]:
    """The HTTP section of docs/api.md."""
    out = [
        "## HTTP/JSON",
        "",
        "With `--http-port P` (or `EMBEDQ_HTTP_PORT`) the server also answers HTTP/1.1 on "
        "`--host`:P, TLS with the gRPC certificate when `--tls-cert` is set, and the same "
        "bearer tokens (`Authorization: Bearer TOKEN`), limits and metrics as gRPC. Errors are "
        'OpenAI\'s shape, `{"error": {"message", "type", "param", "code"}}`, with HTTP status '
        "400 (invalid argument), 401 (token missing or invalid), 404 (unknown model or route), "
        "405 (wrong method), 413 (body over the message limit), 429 (queue full), 500, "
        "503 (Redis or every worker gone) or 504 (deadline exceeded). Nothing else is served "
        "on that port.",
        "",
        "| route | what | token |",
        "| --- | --- | --- |",
    ]
    for route in ROUTES:
        out.append(f"| `{route.label}` | {route.summary} | {'no' if route.open else 'yes'} |")
    return [*out, ""]


# -- plumbing -----------------------------------------------------------------------


class HttpContext:
    """What the gRPC handlers use of a ServicerContext, for an HTTP request."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def time_remaining(self) -> float | None:
        return None  # the server's default timeout; a client that leaves cancels the work

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        error = RequestError(kind_of_status(code), details or code.name)
        for key, value in trailing_metadata or ():
            if key == RETRY_AFTER_MS_KEY and str(value).isdigit():
                error.retry_after_ms = int(value)  # becomes Retry-After
        raise error

    def cancelled(self) -> bool:
        return False

    def invocation_metadata(self) -> tuple:
        return ()

    def peer(self) -> str:
        return self._peer


class HttpError(Exception):
    """An error answered in OpenAI's shape; `code` (the kind's gRPC status) is what
    metrics count it as."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        param: str | None = None,
        detail: str | None = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        retry_after_ms: int = 0,
    ) -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.code = grpc_status(self.kind)
        self.message = message
        self.param = param
        self.detail = detail  # OpenAI's "code" field; default: the gRPC code, lower case
        self.status, self.error_type = http_status(self.kind)
        if status is not None:
            self.status, self.error_type = status, "invalid_request_error"
        self.headers = dict(headers or {})
        if self.status == 401:
            self.headers["WWW-Authenticate"] = "Bearer"
        elif self.status in (429, 503):
            # Whole seconds (RFC 9110); the OpenAI SDKs also read retry-after-ms.
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_ms / 1000)))
            if retry_after_ms:
                self.headers["retry-after-ms"] = str(retry_after_ms)

    def response(self) -> web.Response:
        error = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.detail or self.code.name.lower(),
        }
        return json_response({"error": error}, status=self.status, headers=self.headers)


def dumps(value: object) -> bytes:
    if orjson is not None:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(value, separators=(",", ":"), default=_numpy_default).encode()


def _numpy_default(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_response(value: object, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(
        body=dumps(value), status=status, headers=headers, content_type="application/json"
    )


async def read_json(request: web.Request) -> object:
    body = await request.read()  # over client_max_size: 413
    try:
        return orjson.loads(body) if orjson is not None else json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(ErrorKind.INVALID_INPUT, f"request body is not valid JSON: {exc}") from None


def ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The gRPC server's TLS, from the same files (checked by app.check_security first)."""
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key, password=lambda: b"")
    if settings.tls_client_ca:
        context.load_verify_locations(cafile=settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# -- token counts ---------------------------------------------------------------------


@dataclass(frozen=True)
class TokenPlan:
    """What decides a text's token count: the model, the prompt and truncation."""

    model: ServedModel
    prompt: str
    truncate: bool


# Response header of /v1/embeddings when `usage` is an estimate (see estimated_counts).
USAGE_HEADER = "embedq-usage"
# Characters per token of the estimate: about 4 for English with WordPiece or BPE.
CHARS_PER_TOKEN = 4


def estimated_counts(plan: TokenPlan, texts: list[str]) -> list[int]:
    """Token counts when neither the workers nor a trusted local tokenizer can count: about
    one token per CHARS_PER_TOKEN characters, two special tokens, truncation applied."""
    max_len = plan.model.registration.max_seq_length
    counts = [2 + math.ceil(len(plan.prompt + text) / CHARS_PER_TOKEN) for text in texts]
    return [min(count, max_len) for count in counts] if plan.truncate and max_len else counts


class TokenCounter:
    """`usage` token counts: the server's own copy of the model's tokenizer when it
    has one whose counts matched the worker's, else a Tokenize job for the workers."""

    def __init__(self) -> None:
        self._tokenizers: dict[str, object | None] = {}  # model fingerprint -> tokenizer
        self._verified: dict[str, bool] = {}
        # (model fingerprint, prompt, text) -> full length: repeated texts (cache hits,
        # mostly) are not tokenized again. Bounded by characters and by entries.
        self._memo: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._memo_chars = 0

    def local(self, model: ServedModel) -> object | None:
        """The verified local tokenizer of `model`, or None."""
        fingerprint = model.registration.fingerprint
        if self._verified.get(fingerprint):
            return self._tokenizers.get(fingerprint)
        return None

    async def candidate(self, model: ServedModel) -> object | None:
        """A tokenizer loaded from the model's folder when it is on this machine."""
        fingerprint = model.registration.fingerprint
        if fingerprint not in self._tokenizers:
            loop = asyncio.get_running_loop()  # reading and parsing it takes a while
            tokenizer = await loop.run_in_executor(None, _load_tokenizer, model.registration.source)
            self._tokenizers.setdefault(fingerprint, tokenizer)
        return self._tokenizers[fingerprint]

    def _memo_get(self, plan: TokenPlan, texts: list[str]) -> tuple[list, list[int]]:
        """Known full lengths (None where unknown) and the indexes still to tokenize."""
        fingerprint, prompt, memo = plan.model.registration.fingerprint, plan.prompt, self._memo
        lengths = [memo.get((fingerprint, prompt, text)) for text in texts]
        return lengths, [i for i, length in enumerate(lengths) if length is None]

    def _memo_put(self, plan: TokenPlan, texts: list[str], lengths: list[int]) -> None:
        fingerprint, prompt, memo = plan.model.registration.fingerprint, plan.prompt, self._memo
        for text, length in zip(texts, lengths, strict=True):
            key = (fingerprint, prompt, text)
            if key not in memo:
                memo[key] = length
                self._memo_chars += len(prompt) + len(text)
        while self._memo_chars > MEMO_CHARS or len(memo) > MEMO_TEXTS:
            # The prompt counts in full with each entry: entries of other requests hold their
            # own copy of it (a long prompt varied per request kept gigabytes uncounted).
            (_fp, old_prompt, text), _ = memo.popitem(last=False)
            self._memo_chars -= len(old_prompt) + len(text)

    @staticmethod
    def _tokenize(tokenizer: object, prompt: str, texts: list[str]) -> list[int]:
        """Full lengths, special tokens included (encode_batch_fast: no offsets needed); a
        text sent several times is tokenized once."""
        encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
        unique = list(dict.fromkeys(texts))
        lengths = [len(encoding.ids) for encoding in encode([prompt + text for text in unique])]
        found = dict(zip(unique, lengths, strict=True))
        return [found[text] for text in texts]

    @staticmethod
    def _read(plan: TokenPlan, lengths: list[int]) -> list[int]:
        """What the model reads: truncation stops at max_seq_length."""
        max_len = plan.model.registration.max_seq_length
        if plan.truncate and max_len:
            return [min(length, max_len) for length in lengths]
        return lengths

    def count_now(self, tokenizer: object, plan: TokenPlan, texts: list[str]) -> list[int] | None:
        """Counts if they are cheap now (remembered, or few characters to tokenize), else None.

        Tokenizing costs about 35 us per sentence: on the event loop only for a
        few, in a thread (count()) beside the encode for more."""
        lengths, missing = self._memo_get(plan, texts)
        if missing:
            todo = [texts[i] for i in missing]
            # The prompt is read with each text: a long one made a "short" request seconds
            # of tokenizing on the event loop (every call of this server stalled meanwhile).
            if sum(map(len, todo)) + len(plan.prompt) * len(todo) > TOKENIZE_INLINE_CHARS:
                return None
            found = self._tokenize(tokenizer, plan.prompt, todo)
            self._memo_put(plan, todo, found)
            for index, length in zip(missing, found, strict=True):
                lengths[index] = length
        return self._read(plan, lengths)

    async def count(self, tokenizer: object, plan: TokenPlan, texts: list[str]) -> list[int]:
        """Counts, tokenizing what is not remembered in a thread (the tokenizer drops the GIL)."""
        lengths, missing = self._memo_get(plan, texts)
        if missing:
            todo = [texts[i] for i in missing]
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(None, self._tokenize, tokenizer, plan.prompt, todo)
            self._memo_put(plan, todo, found)
            for index, length in zip(missing, found, strict=True):
                lengths[index] = length
        return self._read(plan, lengths)

    def known_wrong(self, model: ServedModel) -> bool:
        """Whether the local tokenizer of `model` was found to disagree with its workers."""
        return self._verified.get(model.registration.fingerprint) is False

    async def check(self, plan: TokenPlan, texts: list[str], worker_counts: list[int]) -> None:
        """Trust the local tokenizer from now on if it agrees with the worker."""
        fingerprint = plan.model.registration.fingerprint
        tokenizer = await self.candidate(plan.model)
        if tokenizer is None or fingerprint in self._verified:
            return
        ok = await self.count(tokenizer, plan, texts) == worker_counts
        self._verified[fingerprint] = ok
        if ok:
            log.info("usage tokens of model %r counted by this server", plan.model.name)
        else:
            log.warning(
                "the tokenizer in %s disagrees with model %r's workers: usage is counted by "
                "the workers (slower)",
                plan.model.registration.source,
                plan.model.name,
            )


def _load_tokenizer(source: str) -> object | None:
    path = Path(source) / "tokenizer.json" if source else None
    if path is None or not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return tokenizer
    except Exception as exc:  # noqa: BLE001 - the workers count instead
        log.warning("cannot load %s (%s): usage is counted by the workers", path, exc)
        return None


# -- the API --------------------------------------------------------------------------


def _input_texts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(item, str) for item in value):
            return value
        if value and (all(map(_is_token_id, value)) or all(map(_is_token_ids, value))):
            raise HttpError(
                ErrorKind.INVALID_INPUT,
                "input as token ids is not supported: embedq tokenizes with the model's own "
                "tokenizer, so send the text (a string or a list of strings)",
                "input",
                "token_ids_unsupported",
            )
        if not value:
            raise HttpError(
                ErrorKind.INVALID_INPUT, "input is empty: send at least one text", "input"
            )
    raise HttpError(ErrorKind.INVALID_INPUT, "input must be a string or a list of strings", "input")


def _is_token_id(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _is_token_ids(item: object) -> bool:
    return isinstance(item, list) and bool(item) and all(map(_is_token_id, item))


def _options(body: dict) -> pb.EncodeOptions:
    options = pb.EncodeOptions()
    if body.get("options") is not None:
        if not isinstance(body["options"], dict):
            raise HttpError(ErrorKind.INVALID_INPUT, "options must be an object", "options")
        try:
            json_format.ParseDict(body["options"], options)
        except json_format.ParseError as exc:
            raise HttpError(ErrorKind.INVALID_INPUT, f"options: {exc}", "options") from None
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise HttpError(ErrorKind.INVALID_INPUT, "model must be a string", "model")
        if options.model and model and options.model != model:
            raise HttpError(ErrorKind.INVALID_INPUT, "model and options.model differ", "model")
        options.model = model or options.model
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise HttpError(
                ErrorKind.INVALID_INPUT, "dimensions must be a positive integer", "dimensions"
            )
        if dimensions > MAX_DIMENSIONS:  # past the field's uint32: no model is that wide
            raise HttpError(
                ErrorKind.INVALID_INPUT,
                f"dimensions {dimensions} is above any model's dimension",
                "dimensions",
            )
        options.dimension = dimensions
    if options.precision not in (pb.PRECISION_UNSPECIFIED, pb.PRECISION_FLOAT32):
        raise HttpError(
            ErrorKind.INVALID_INPUT,
            "/v1/embeddings answers float32 only: use POST /v1/encode for other precisions",
            "options",
        )
    return options


class HttpApi:
    def __init__(
        self,
        settings: ServerSettings,
        service: EmbedderService,
        health_servicer: health.aio.HealthServicer,
        tokens: TokenSet | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.health = health_servicer
        self.tokens = tokens
        self.counter = TokenCounter()
        self._throttled = Throttled(log)

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._middleware], client_max_size=self.settings.limits.max_message_bytes
        )
        handlers = {
            "/v1/embeddings": self.embeddings,
            "/v1/models": self.models,
            "/v1/models/{model}": self.model,
            "/health": self.health_all,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }
        for path, (name, request_class) in PROTO_ROUTES.items():
            handlers[path] = self._proto_handler(name, request_class)
        for route in ROUTES:
            if route.method == "GET":
                # HEAD too for the probes (some health checkers send it), not elsewhere.
                head = route.path in OPEN_PATHS
                pattern = route.pattern or route.path
                app.router.add_get(pattern, handlers[route.path], allow_head=head)
            else:
                app.router.add_route(route.method, route.path, handlers[route.path])
        return app

    # -- every request: request id, token, errors, metrics ---------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        info = request.match_info
        route = info.route.resource.canonical if info.route.resource is not None else None
        verb = "GET" if request.method == "HEAD" else request.method  # HEAD: health probes
        method = LABELS.get((verb, route), "unknown")
        request_id = metrics.request_id_from(request.headers.items())
        token = REQUEST_ID.set(request_id)
        outcome = "OK"  # the request metrics' label: a gRPC status name
        try:
            try:
                if self.tokens is not None and route not in OPEN_PATHS:
                    self._check_token(request)
                response = await handler(request)
            except HttpError:
                raise
            except web.HTTPException as exc:
                raise self._http_error(request, exc) from None
            except asyncio.CancelledError:
                outcome = "CANCELLED"
                raise
            except Exception as exc:  # noqa: BLE001 - told the gRPC front's way (errors.py)
                error = as_request_error(exc, method)
                raise HttpError(
                    error.kind, error.message, retry_after_ms=error.retry_after_ms
                ) from None
        except HttpError as exc:
            outcome = exc.code.name
            response = exc.response()
            self._log_failure(method, exc, started)
        finally:
            metrics.REQUESTS.labels(method, outcome).inc()
            metrics.REQUEST_DURATION.labels(method).observe(time.perf_counter() - started)
            REQUEST_ID.reset(token)
        response.headers[metrics.REQUEST_ID_KEY] = request_id
        return response

    def _check_token(self, request: web.Request) -> None:
        presented = bearer_token(request.headers.items())
        if presented is None:
            raise HttpError(MISSING[0], MISSING[1], detail="missing_api_key")
        if not self.tokens.matches(presented):
            # gRPC says PERMISSION_DENIED; over HTTP a bad credential is a 401.
            raise HttpError(ErrorKind.UNAUTHENTICATED, "invalid token", detail="invalid_api_key")

    def _http_error(self, request: web.Request, exc: web.HTTPException) -> HttpError:
        """aiohttp's own refusals (no route, wrong method, body too large) in our shape."""
        status = exc.status
        if status == 404:
            return HttpError(ErrorKind.NOT_FOUND, f"no route {request.path}", detail="unknown_url")
        if status == 405:
            allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ())))
            return HttpError(
                ErrorKind.INVALID_INPUT,
                f"{request.method} is not allowed on {request.path} (allowed: {allowed})",
                detail="method_not_allowed",
                status=405,
                headers={"Allow": allowed},
            )
        if status == 413:
            return HttpError(
                ErrorKind.OVERLOADED,
                f"request body is over the limit of {self.settings.limits.max_message_bytes} bytes",
                detail="request_too_large",
                status=413,
            )
        fallback = ErrorKind.INVALID_INPUT if status < 500 else ErrorKind.INTERNAL
        return HttpError(
            KIND_OF_HTTP.get(status, fallback), exc.reason or f"HTTP {status}", status=status
        )

    @staticmethod
    def _log_failure(method: str, exc: HttpError, started: float) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        log.info(
            "%s failed: %s (%.1f ms)",
            method,
            exc.code.name,
            elapsed_ms,
            extra={
                "method": method,
                "code": exc.code.name,
                "duration_ms": round(elapsed_ms, 3),
                "details": exc.message[:200],
            },
        )

    def _context(self, request: web.Request) -> HttpContext:
        return HttpContext(f"http:{request.remote}")

    # -- OpenAI ---------------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise HttpError(ErrorKind.INVALID_INPUT, "request body must be a JSON object")
        unknown = sorted(set(body) - EMBEDDINGS_FIELDS)
        if unknown:
            raise HttpError(
                ErrorKind.INVALID_INPUT,
                f"unrecognized request argument(s): {', '.join(unknown)}",
                unknown[0],
            )
        texts = _input_texts(body.get("input"))
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise HttpError(
                ErrorKind.INVALID_INPUT,
                f"encoding_format must be 'float' or 'base64', not {encoding!r}",
                "encoding_format",
            )
        options = _options(body)
        try:
            validation.check_texts(texts, self.service.limits, field="input")
        except RequestError as exc:
            raise HttpError(exc.kind, exc.message, "input") from None
        metrics.TEXTS.labels("POST /v1/embeddings").inc(len(texts))
        plan = self._plan(options)
        context = self._context(request)
        encode = self.service.Encode(pb.EncodeRequest(texts=texts, options=options), context)
        tokenizer, estimated = self.counter.local(plan.model), False
        counts = None if tokenizer is None else self.counter.count_now(tokenizer, plan, texts)
        if counts is not None:
            reply = await encode
        elif tokenizer is not None:  # counted in a thread while the texts are encoded
            counting = asyncio.ensure_future(self.counter.count(tokenizer, plan, texts))
            try:
                reply = await encode
            except BaseException:
                _give_up(counting)
                raise
            counts = await counting
        else:
            tokenize = self.service.Tokenize(
                pb.TokenizeRequest(texts=texts, options=options), context
            )
            reply, counts, estimated = await self._encode_and_count(encode, tokenize, plan, texts)
        vectors = np.frombuffer(reply.embeddings, dtype="<f4").reshape(reply.count, reply.dimension)
        if encoding == "base64":
            rows = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
        elif orjson is not None:
            rows = list(vectors)  # each row a float32 array: orjson writes it natively
        else:
            rows = vectors.tolist()
        tokens = sum(counts)
        return json_response(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": index, "embedding": row}
                    for index, row in enumerate(rows)
                ],
                "model": reply.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers={USAGE_HEADER: "estimated"} if estimated else None,
        )

    async def _encode_and_count(
        self, encode: Awaitable, tokenize: Awaitable, plan: TokenPlan, texts: list[str]
    ) -> tuple[pb.EncodeResponse, list[int], bool]:
        """Encode, with the workers counting tokens alongside (their counts check ours);
        the third value says the counts are an estimate.

        If only the count fails (say, cached texts and no worker alive, or a full queue),
        the vectors are still answered: the server's own tokenizer counts when it has one
        not known to disagree with the workers, else usage is estimated."""
        encoding, counting = asyncio.ensure_future(encode), asyncio.ensure_future(tokenize)
        try:
            reply = await encoding
        except BaseException:
            _give_up(counting)
            raise
        try:
            tokenized = await counting
        except RequestError as exc:
            tokenizer = await self.counter.candidate(plan.model)
            if tokenizer is not None and not self.counter.known_wrong(plan.model):
                return reply, await self.counter.count(tokenizer, plan, texts), False
            self._throttled.warning(
                "usage-estimated",
                "usage of model %r estimated: its workers could not count tokens (%s) and this "
                "server has no tokenizer of it that agrees with them",
                plan.model.name,
                exc.message,
            )
            return reply, estimated_counts(plan, texts), True
        counts = [len(item.ids) for item in tokenized.texts]
        await self.counter.check(plan, texts, counts)
        return reply, counts, False

    def _plan(self, options: pb.EncodeOptions) -> TokenPlan:
        """The model and the prompt and truncation of a request (validated as Encode does)."""
        validation.check_options(options)
        try:
            model = self.service.registry.resolve(options.model)
        except RequestError as exc:
            if exc.kind is not ErrorKind.NOT_FOUND:
                raise
            raise HttpError(exc.kind, exc.message, "model", "model_not_found") from None
        reg = model.registration
        prompt = validation.resolve_prompt(options, reg.prompts, reg.default_prompt_name)
        # Checked here, before any counting: Encode checks it too, but after the counting
        # has begun (an oversized prompt was tokenized, and remembered, before its 400).
        validation.check_prompt(prompt, self.service.limits)
        return TokenPlan(model, prompt, validation.truncate_flag(options))

    def _model_json(self, model: ServedModel) -> dict:
        reg = model.registration
        return {
            "id": model.name,
            "object": "model",
            "created": reg.registered_unix_ms // 1000,
            "owned_by": "embedq",
            # embedq's additions (clients ignore what they do not know)
            "dimension": reg.dimension,
            "max_seq_length": reg.max_seq_length,
            "pooling": reg.pooling,
            "normalize": reg.normalize,
            "workers_alive": model.workers_alive,
        }

    def _served(self) -> dict[str, ServedModel]:
        registry = self.service.registry
        if not registry.models and not registry.redis_ok:
            raise HttpError(ErrorKind.UNAVAILABLE, "redis unavailable")
        return registry.models

    async def models(self, request: web.Request) -> web.Response:
        served = self._served()
        data = [self._model_json(model) for model in served.values()]
        return json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        model = self._served().get(name)
        if model is None:
            raise HttpError(
                ErrorKind.NOT_FOUND, f"unknown model {name!r}", "model", detail="model_not_found"
            )
        return json_response(self._model_json(model))

    # -- embedq's RPCs in the JSON mapping ----------------------------------------

    def _proto_handler(self, name: str, request_class: type):
        label = f"POST {next(p for p, (n, _) in PROTO_ROUTES.items() if n == name)}"

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            message = request_class()
            try:
                json_format.Parse(body or b"{}", message)
            except (json_format.ParseError, UnicodeDecodeError) as exc:  # not UTF-8: not JSON
                raise HttpError(
                    ErrorKind.INVALID_INPUT, f"not a valid {request_class.DESCRIPTOR.name}: {exc}"
                ) from None
            texts = metrics.texts_in(message)
            if texts:
                metrics.TEXTS.labels(label).inc(texts)
            handler = getattr(self.service, name)
            response = await handler(message, self._context(request))
            return web.Response(
                # Defaults printed too ("index": 0, "found": false): allowed by the
                # mapping, and what a JSON reader expects.
                text=json_format.MessageToJson(
                    response, indent=None, always_print_fields_with_no_presence=True
                ),
                content_type="application/json",
            )

        return handle

    # -- health: the gRPC health service's state ------------------------------------

    async def _status(self, service: str) -> int | None:
        try:
            reply = await self.health.Check(
                health_pb2.HealthCheckRequest(service=service), HttpContext("")
            )
        except RequestError:
            return None  # not a known service name
        return reply.status

    @staticmethod
    def _health_response(status: int | None, extra: dict | None = None) -> web.Response:
        serving = status == health_pb2.HealthCheckResponse.SERVING
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status or 0)
        return json_response({"status": name, **(extra or {})}, status=200 if serving else 503)

    async def health_all(self, request: web.Request) -> web.Response:
        names = ["", SERVICE_NAME] + [f"{SERVICE_NAME}/{m}" for m in self.service.registry.models]
        services = {}
        for name in names:
            status = await self._status(name)
            if status is not None:
                services[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        return self._health_response(await self._status(""), {"services": services})

    async def healthz(self, request: web.Request) -> web.Response:
        return self._health_response(await self._status(""))

    async def readyz(self, request: web.Request) -> web.Response:
        model = request.query.get("model")
        name = f"{SERVICE_NAME}/{model}" if model else SERVICE_NAME
        status = await self._status(name)
        if status is None:
            raise HttpError(ErrorKind.NOT_FOUND, f"unknown health service {name!r}", "model")
        return self._health_response(status)


async def start_http(
    settings: ServerSettings,
    service: EmbedderService,
    health_servicer: health.aio.HealthServicer,
    tokens: TokenSet | None,
    shutdown_timeout: float,
) -> web.AppRunner:
    """Serve HTTP on settings.host:settings.http_port; SettingsError if it cannot listen."""
    api = HttpApi(settings, service, health_servicer, tokens)
    runner = web.AppRunner(
        api.app(),
        access_log=None,  # failures are logged (without secrets) by the middleware
        handler_cancellation=True,  # a client that hangs up cancels its queued work
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.http_port, ssl_context=ssl_context(settings))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SettingsError(
            f"cannot serve HTTP on {settings.host}:{settings.http_port} (--http-port): "
            f"{exc.strerror or exc}"
        ) from None
    scheme = "https" if settings.tls_cert else "http"
    log.info("HTTP/JSON API on %s://%s:%d", scheme, settings.host, settings.http_port)
    return runner


def _give_up(task: asyncio.Future) -> None:
    """Cancel a side task whose result is no longer wanted. One that already failed (the
    count failing in the same flush as the vectors: no worker alive) has its exception
    read here, else asyncio logs "Task exception was never retrieved" for every request."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
