"""Bearer-token authentication: a grpc.aio server interceptor.

Every RPC must carry the metadata ``authorization: Bearer <token>`` with one
of the configured tokens, except health checking (load balancers probe it
without credentials) and server reflection (it describes the public API,
which ships in this repository anyway, and lets ``grpcurl list`` work).

- no (bearer) authorization metadata: UNAUTHENTICATED "missing bearer token"
- a token that matches none: PERMISSION_DENIED "invalid token"

Tokens come from a file (one per line; blank lines and ``#`` comments are
ignored), re-read when it changes so that tokens rotate without a restart,
and/or from EMBEDQ_AUTH_TOKENS (comma-separated). They are compared as
SHA-256 digests with :func:`hmac.compare_digest`, against every configured
token with no early exit, so neither timing nor logs tell which one matched.
No token is ever logged: problems name the file and line only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence

import grpc

from embedq.keys import ErrorKind
from embedq.settings import ServerSettings, SettingsError

from .errors import grpc_status

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
# Method prefixes that need no token.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# How often (seconds) the token file's stat is checked for changes.
RELOAD_CHECK_S = 1.0
SHORT_TOKEN = 16

MISSING = (ErrorKind.UNAUTHENTICATED, "missing bearer token")
INVALID = (ErrorKind.PERMISSION, "invalid token")


def parse_tokens(lines: Iterable[str], source: str) -> list[str]:
    """Tokens from `lines` (blank and ``#`` lines skipped); errors name `source` and the line."""
    tokens = []
    for number, raw in enumerate(lines, 1):
        token = raw.strip()
        if not token or token.startswith("#"):
            continue
        where = f"{source} line {number}"
        if any(ch.isspace() for ch in token):
            raise SettingsError(f"{where}: a token must not contain whitespace")
        if not token.isascii() or not token.isprintable():
            raise SettingsError(f"{where}: a token must be printable ASCII")
        if len(token) < SHORT_TOKEN:
            log.warning(
                "%s: token is shorter than %d characters; use e.g. `openssl rand -hex 32`",
                where,
                SHORT_TOKEN,
            )
        tokens.append(token)
    return tokens


def env_tokens(raw: str | None) -> tuple[str, ...]:
    """EMBEDQ_AUTH_TOKENS: comma-separated, blanks ignored."""
    return tuple(parse_tokens((raw or "").split(","), "EMBEDQ_AUTH_TOKENS item"))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenSet:
    """The accepted tokens (as digests); the file is re-read when it changes."""

    def __init__(self, path: str | None = None, tokens: Sequence[str] = ()) -> None:
        self.path = path
        self._fixed = [_digest(t) for t in tokens]
        self._from_file: list[bytes] = []
        self._stat: tuple[int, int, int] | None = None
        self._checked = 0.0
        if path:
            self._load(self._file_stat())
        if not self._fixed and not self._from_file:
            raise SettingsError(
                f"--auth-token-file {path!r} holds no token"
                if path
                else "bearer-token auth is on but no token is configured"
            )

    def __len__(self) -> int:
        return len(self._fixed) + len(self._from_file)

    def _file_stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise SettingsError(f"--auth-token-file {self.path!r}: {exc.strerror}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, stat: tuple[int, int, int]) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                tokens = parse_tokens(handle, str(self.path))
        except OSError as exc:
            raise SettingsError(f"--auth-token-file {self.path!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise SettingsError(f"--auth-token-file {self.path!r} is not UTF-8 text") from None
        self._from_file = [_digest(t) for t in tokens]
        self._stat = stat

    def refresh(self) -> None:
        """Re-read the file if it changed; a file that cannot be read keeps the last tokens."""
        now = time.monotonic()
        if not self.path or now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            stat = self._file_stat()
            if stat != self._stat:
                self._load(stat)
                log.info("auth tokens reloaded: %d token(s) from %s", len(self), self.path)
                if not self:
                    log.warning("%s holds no token now: every call is refused", self.path)
        except SettingsError as exc:
            log.warning("keeping the previous auth tokens: %s", exc)

    def matches(self, token: str) -> bool:
        """Constant time per configured token, and every one is compared."""
        self.refresh()
        presented = _digest(token)
        found = False
        for known in (*self._fixed, *self._from_file):
            found |= hmac.compare_digest(presented, known)
        return found


def token_set(settings: ServerSettings) -> TokenSet | None:
    """The server's tokens, or None when auth is off; SettingsError if it cannot work."""
    if not settings.auth_enabled:
        return None
    return TokenSet(settings.auth_token_file, settings.auth_tokens)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first authorization entry if it is a Bearer one."""
    for key, value in metadata or ():
        if key.lower() != METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None
    return None


# How long a refused streaming call may take to finish sending its messages.
REJECT_DRAIN_S = 0.5


async def _drain(requests: AsyncIterator[object]) -> None:
    async for _message in requests:
        pass


def _rejecting_handler(
    handler: grpc.RpcMethodHandler | None, kind: ErrorKind, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts (requests are never parsed)."""

    async def reject(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        log.debug("refused %s: %s", context.peer(), message)
        if hasattr(request_or_iterator, "__aiter__"):
            # Let a streaming client finish sending first (briefly, discarding the bytes):
            # ending the call while its messages are still in flight can reach it as
            # INTERNAL "Internal error from Core" instead of this status.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_drain(request_or_iterator), REJECT_DRAIN_S)
        await context.abort(grpc_status(kind), message)

    if handler is None or (handler.request_streaming and handler.response_streaming):
        # An unknown method gets the same answer as a known one: no probing without a token.
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with a valid bearer token (health and reflection: always)."""

    def __init__(self, tokens: TokenSet) -> None:
        self.tokens = tokens

    def check(self, method: str, metadata) -> tuple[ErrorKind, str] | None:
        """None when the call may proceed, else the (kind, message) to refuse it with."""
        if method.startswith(OPEN_PREFIXES):
            return None
        token = bearer_token(metadata)
        if token is None:
            return MISSING
        return None if self.tokens.matches(token) else INVALID

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        refusal = self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        if refusal is None:
            return await continuation(handler_call_details)
        # Only to learn the method's shape; its behaviour never runs.
        handler = await continuation(handler_call_details)
        return _rejecting_handler(handler, *refusal)
