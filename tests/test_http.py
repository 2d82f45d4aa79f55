"""The HTTP/JSON API (`--http-port`), tested with real clients against real processes.

The official `openai` package and LangChain's `OpenAIEmbeddings` talk to a real
server (one worker, the bundled model) and must get sentence-transformers'
vectors; errors arrive as the OpenAI client's own exception types; the README's
curl examples run as written; TLS and bearer tokens are the gRPC server's.

Servers here (all on the session Redis, started in parallel):
  main    plain, metrics on           -- correctness, curl, metrics
  secure  TLS + token file, metrics   -- auth and TLS
  full    EMBEDQ_MAX_QUEUED_JOBS=0    -- every uncached text refused: 429
  slow    --request-timeout 0.001     -- every uncached text times out: 504
  empty   a namespace with no worker, EMBEDQ_MAX_MESSAGE_BYTES=65536 -- 503, 413
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import redis
from conftest import LOG_DIR, Service, _spawn, log_tail, stop_process
from embedq.apps.embedded import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_security import make_pki

from embedq.internal.v1 import queue_pb2
from embedq.keys import Keys, text_sha256, variant_fingerprint
from embedq.v1 import embedq_pb2 as pb
from embedq.v1 import embedq_pb2_grpc

MODEL = "all-MiniLM-L6-v2"
README = Path(__file__).resolve().parents[1] / "README.md"
README_ORIGIN = "http://localhost:8080"
TOKEN = "tok-http-" + uuid.uuid4().hex
WRONG_TOKEN = "tok-wrong-" + uuid.uuid4().hex
TEXTS = [
    "A man is playing a guitar.",
    "A woman is slicing onions.",
    "The new movie is awesome!",
    "Two dogs run through a snowy field.",
]


def fresh(label: str, count: int = 1) -> list[str]:
    """Texts no other test has cached."""
    return [f"{label} {uuid.uuid4().hex[:8]} number {i}." for i in range(count)]


@dataclass
class HttpServer:
    name: str
    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    metrics_port: int = 0
    tls: bool = False
    namespace: str = ""
    redis_url: str = ""

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        path = LOG_DIR / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Servers:
    started: list[HttpServer] = field(default_factory=list)

    def spawn(
        self, namespace: str, redis_url: str, *flags: str, env=None, metrics=False, tls=False
    ):
        grpc_port, http_port = free_port(), free_port()
        metrics_port = free_port() if metrics else 0
        name = f"http-server-{uuid.uuid4().hex[:6]}"
        args = ["server", "--port", str(grpc_port), "--http-port", str(http_port)]
        args += ["--redis-url", redis_url, "--namespace", namespace, *flags]
        if metrics:
            args += ["--metrics-port", str(metrics_port)]
        proc = _spawn(args, name, env)
        server = HttpServer(
            name, proc, grpc_port, http_port, metrics_port, tls, namespace, redis_url
        )
        self.started.append(server)
        return server

    def stop(self) -> None:
        for server in self.started:
            stop_process(server.proc)


def wait_http(server: HttpServer, ssl_context: ssl.SSLContext | None = None, timeout=60.0) -> None:
    """Until /healthz answers 200 (Redis reachable; the HTTP site is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{log_tail(server.name)}")
        try:
            with urllib.request.urlopen(
                f"{server.base_url}/healthz", timeout=2, context=ssl_context
            ) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} HTTP not up after {timeout}s:\n{log_tail(server.name)}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("http-pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("http-auth") / "tokens"
    path.write_text(f"# tokens\n{TOKEN}\n")
    return path


@pytest.fixture(scope="module")
def deployment(redis_server, pki, token_file) -> Iterator[dict[str, HttpServer]]:
    """One worker; five servers started at once (their start-up overlaps the worker's)."""
    workers = Service(redis_server.url, namespace=f"http{uuid.uuid4().hex[:6]}")
    servers = Servers()
    url, ns = redis_server.url, workers.namespace
    try:
        workers.start_worker()
        started = {
            "main": servers.spawn(ns, url, metrics=True),
            "secure": servers.spawn(
                ns,
                url,
                "--tls-cert",
                str(pki.server_cert),
                "--tls-key",
                str(pki.server_key),
                "--auth-token-file",
                str(token_file),
                metrics=True,
                tls=True,
            ),
            "full": servers.spawn(ns, url, env={"EMBEDQ_MAX_QUEUED_JOBS": "0"}),
            "slow": servers.spawn(ns, url, "--request-timeout", "0.001"),
            "empty": servers.spawn(
                f"http-empty-{uuid.uuid4().hex[:6]}",
                url,
                env={"EMBEDQ_MAX_MESSAGE_BYTES": "65536"},
            ),
        }
        tls = ssl.create_default_context(cafile=str(pki.ca))
        for name, server in started.items():
            wait_http(server, tls if name == "secure" else None)
        yield started
    finally:
        servers.stop()
        workers.stop()
    for server in servers.started:
        log = server.log()
        assert TOKEN not in log and WRONG_TOKEN not in log, f"a token leaked into {server.name}"


@pytest.fixture(scope="module")
def main(deployment) -> HttpServer:
    return deployment["main"]


@pytest.fixture(scope="module")
def client(main) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{main.base_url}/v1", api_key="unused", max_retries=0)


def expected(reference_model, texts: list[str], dimensions: int | None = None) -> np.ndarray:
    vectors = reference_model.encode(texts, convert_to_numpy=True)
    if dimensions:
        vectors = vectors[:, :dimensions]
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def token_count(reference_model, texts: list[str]) -> int:
    """Tokens the model reads: special tokens included, truncated at max_seq_length."""
    return int(reference_model.tokenize(texts)["attention_mask"].sum())


def matrix(reply) -> np.ndarray:
    """The vectors of a reply (the SDK leaves base64 undecoded when it was asked for)."""
    rows = [
        np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else np.asarray(e)
        for e in (item.embedding for item in reply.data)
    ]
    return np.stack(rows).astype(np.float32)


def post(url: str, body: object, headers: dict | None = None, context=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
    return fetch(request, context)


def fetch(request, context=None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- vectors: the official OpenAI client ----------------------------------------------


def test_openai_client_single_and_batch_equal_sentence_transformers(client, reference_model):
    single = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert single.object == "list" and single.model == MODEL
    assert [(item.index, item.object) for item in single.data] == [(0, "embedding")]
    np.testing.assert_allclose(matrix(single), expected(reference_model, TEXTS[:1]), atol=1e-5)

    batch = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [item.index for item in batch.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose(matrix(batch), expected(reference_model, TEXTS), atol=1e-5)
    assert batch.usage.prompt_tokens == token_count(reference_model, TEXTS)
    assert batch.usage.total_tokens == batch.usage.prompt_tokens


def test_base64_is_the_sdk_default_and_equal(client, reference_model):
    texts = fresh("base64", 3)
    reply = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64
    np.testing.assert_allclose(matrix(reply), expected(reference_model, texts), atol=1e-5)
    raw = client.embeddings.with_raw_response.create(
        model=MODEL, input=texts, encoding_format="base64"
    )
    payload = json.loads(raw.text)
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in payload["data"]]
    np.testing.assert_allclose(np.stack(decoded), expected(reference_model, texts), atol=1e-5)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_dimensions_are_the_servers_matryoshka_truncation(main, client, reference_model, encoding):
    texts = TEXTS[:3]
    reply = client.embeddings.create(
        model=MODEL, input=texts, dimensions=128, encoding_format=encoding
    )
    got = matrix(reply)
    assert got.shape == (3, 128)
    np.testing.assert_allclose(got, expected(reference_model, texts, 128), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with grpc.insecure_channel(f"127.0.0.1:{main.grpc_port}") as channel:
        grpc_reply = embedq_pb2_grpc.EmbedderStub(channel).Encode(
            pb.EncodeRequest(texts=texts, options=pb.EncodeOptions(dimension=128)), timeout=30
        )
    same = np.frombuffer(grpc_reply.embeddings, "<f4").reshape(3, 128)
    np.testing.assert_array_equal(got, same)  # bit for bit what gRPC answers


def test_usage_counts_tokens_the_model_reads(client, reference_model):
    long_text = "word " * 400  # over max_seq_length (256): truncated, counted as read
    texts = [*fresh("usage", 2), long_text, ""]
    first = client.embeddings.create(model=MODEL, input=texts)
    again = client.embeddings.create(model=MODEL, input=texts)  # cached; counted locally
    want = token_count(reference_model, texts)
    assert want == sum(len(reference_model.tokenizer(t)["input_ids"][:256]) for t in texts)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == want


def test_model_may_be_left_out_when_one_is_served(main, reference_model):
    status, body = post(f"{main.base_url}/v1/embeddings", {"input": "hello world"})
    assert status == 200 and body["model"] == MODEL
    vector = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(vector, expected(reference_model, ["hello world"])[0], atol=1e-5)


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.owned_by == "embedq"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("text-embedding-3-small")


def test_a_model_name_with_a_slash_is_retrieved_as_is(main):
    """A model served as `org/name` (NAME=PATH) is listed; retrieving it with the slash as
    is (curl) reached no route (404 unknown_url); `%2F` (what the openai SDK sends) too."""
    for path in ("org/name", "org%2Fname"):
        status, body = fetch(f"{main.base_url}/v1/models/{path}")
        assert status == 404 and body["error"]["code"] == "model_not_found", body
        assert "'org/name'" in body["error"]["message"]


# -- LangChain --------------------------------------------------------------------------


def test_langchain_openai_embeddings(main, reference_model, monkeypatch):
    import tiktoken
    from langchain_openai import OpenAIEmbeddings

    def no_tiktoken(*_args, **_kwargs):
        raise AssertionError("tiktoken was used (it would download its encodings)")

    monkeypatch.setattr(tiktoken, "get_encoding", no_tiktoken)
    monkeypatch.setattr(tiktoken, "encoding_for_model", no_tiktoken)
    embeddings = OpenAIEmbeddings(
        model=MODEL,
        base_url=f"{main.base_url}/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    documents = embeddings.embed_documents(TEXTS)
    np.testing.assert_allclose(
        np.asarray(documents, dtype=np.float32), expected(reference_model, TEXTS), atol=1e-5
    )
    query = embeddings.embed_query("What is playing a guitar?")
    np.testing.assert_allclose(
        np.asarray(query, dtype=np.float32),
        expected(reference_model, ["What is playing a guitar?"])[0],
        atol=1e-5,
    )


# -- the README's curl examples -----------------------------------------------------------


def readme_curl_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## HTTP\n(.*?)^## ", text, flags=re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## HTTP' section"
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section.group(1), flags=re.DOTALL):
        commands += [line for line in block.replace("\\\n", " ").splitlines() if "curl " in line]
    return commands


def test_readme_curl_examples_run(main, reference_model):
    commands = readme_curl_commands()
    assert len(commands) >= 4
    for command in commands:
        assert README_ORIGIN in command
        done = subprocess.run(
            ["bash", "-c", command.replace(README_ORIGIN, main.base_url)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        body = json.loads(done.stdout)
        assert "error" not in body, f"{command}\n{done.stdout}"
        if "/v1/embeddings" in command and '"dimensions"' not in command:
            got = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
            want = expected(reference_model, TEXTS[:2])
            np.testing.assert_allclose(got, want, atol=1e-5)
        elif "/v1/embeddings" in command:
            got = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
            np.testing.assert_allclose(
                got, expected(reference_model, ["hello world"], 128)[0], atol=1e-5
            )
        elif "/v1/similarity" in command:
            assert body["matches"][0]["index"] == 0
        elif "/readyz" in command:
            assert body == {"status": "SERVING"}


# -- embedq's RPCs in the JSON mapping, health ---------------------------------------------


def test_proto_json_routes(main, reference_model):
    base = main.base_url
    status, pairs = post(
        f"{base}/v1/similarity", {"pairs": {"pairs": [{"a": TEXTS[0], "b": TEXTS[0]}]}}
    )
    assert status == 200 and pairs["scores"][0] == pytest.approx(1.0, abs=1e-5)
    status, tokens = post(f"{base}/v1/tokenize", {"texts": ["Hello, world!"]})
    assert status == 200 and tokens["texts"][0]["tokens"][0] == "[CLS]"
    status, info = post(f"{base}/v1/info", {})
    assert status == 200 and info["models"][0]["dimension"] == 384
    status, encoded = post(
        f"{base}/v1/encode", {"texts": TEXTS[:2], "options": {"precision": "PRECISION_FLOAT16"}}
    )
    assert status == 200 and encoded["dtype"] == "DTYPE_FLOAT16"
    half = np.frombuffer(base64.b64decode(encoded["embeddings"]), "<f2").reshape(2, 384)
    np.testing.assert_allclose(half, expected(reference_model, TEXTS[:2]), atol=2e-3)
    status, lookup = post(
        f"{base}/v1/lookup", {"texts": [TEXTS[0], "never encoded " + uuid.uuid4().hex]}
    )
    assert status == 200 and lookup["found"] == [True, False]
    status, bad = post(f"{base}/v1/similarity", {"pairs": {"pairs": []}, "nope": 1})
    assert status == 400 and bad["error"]["type"] == "invalid_request_error"
    for route in ("encode", "similarity", "lookup", "tokenize"):  # bytes that are not UTF-8
        status, bad = post(f"{base}/v1/{route}", b'{"texts": ["\xff\xfe"]}')
        assert status == 400 and "not a valid" in bad["error"]["message"], (route, bad)


def grpc_health(server: HttpServer, service: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.mark.parametrize("name", ["main", "empty"])
def test_health_matches_grpc_health(deployment, name):
    server = deployment[name]
    for path, service in (("/healthz", ""), ("/readyz", "embedq.v1.Embedder")):
        status, body = fetch(urllib.request.Request(server.base_url + path))
        want = grpc_health(server, service)
        assert body["status"] == want and status == (200 if want == "SERVING" else 503)
    status, body = fetch(urllib.request.Request(server.base_url + "/health"))
    assert body["services"][""] == grpc_health(server, "")


def test_nothing_else_is_served(main):
    status, body = fetch(urllib.request.Request(main.base_url + "/metrics"))
    assert status == 404 and body["error"]["code"] == "unknown_url"
    status, body = fetch(urllib.request.Request(main.base_url + "/v1/embeddings"))  # GET
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    status, body = post(main.base_url + "/v1/models", {})
    assert status == 405


# -- errors, through the OpenAI client's exception types -------------------------------


def test_bad_requests(client):
    cases = [
        ({"input": [[101, 2023, 102]]}, "token"),
        ({"input": [101, 2023]}, "token"),
        ({"input": []}, "empty"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 385}, "dimension"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": [""] * 2049}, "limit"),
    ]
    for kwargs, word in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model=MODEL, **kwargs)
        assert caught.value.status_code == 400
        assert word in caught.value.message, caught.value.message
        assert caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input="x", extra_body={"frobnicate": 1})
    assert caught.value.param == "frobnicate"


def test_token_counts_stay_off_the_event_loop_when_a_prompt_makes_them_long(
    bundled_model_path,
):
    """`usage` is counted inline only when cheap: the prompt is read with every text, so a
    long one sends the counting to a thread (2,048 empty texts behind a 64 KB prompt were
    tokenized on the event loop: every call of the server stalled for tens of seconds).
    Remembered counts charge the prompt with each entry, so long prompts cannot pile up."""
    from embedq.server.http import MEMO_CHARS, TokenCounter, TokenPlan, _load_tokenizer
    from embedq.server.registry import ServedModel

    tokenizer = _load_tokenizer(str(bundled_model_path))
    registration = queue_pb2.ModelRegistration(name="m", fingerprint="f", max_seq_length=256)
    model = ServedModel(registration, workers_alive=1)
    counter = TokenCounter()
    assert counter.count_now(tokenizer, TokenPlan(model, "", True), ["a b", "c"]) == [4, 3]
    long_prompt = TokenPlan(model, "word " * 200, True)
    assert counter.count_now(tokenizer, long_prompt, [""] * 2048) is None
    counts = asyncio.run(counter.count(tokenizer, long_prompt, ["", "", "x"]))
    assert counts == [202, 202, 203]  # duplicates tokenized once, counted each
    huge = TokenPlan(model, "p" * (MEMO_CHARS // 2), False)
    asyncio.run(counter.count(tokenizer, huge, ["one", "two", "three"]))
    assert counter._memo_chars <= MEMO_CHARS  # the prompt is counted: two of three evicted


def test_an_oversized_prompt_is_refused_before_any_counting(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(
            model=MODEL, input="x", extra_body={"options": {"prompt": "p" * 70_000}}
        )
    assert "options.prompt is 70000 UTF-8 bytes" in caught.value.message


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert "text-embedding-3-small" in caught.value.message
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


def test_overload_is_429(deployment, client):
    full = openai.OpenAI(base_url=f"{deployment['full'].base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        full.embeddings.create(model=MODEL, input=fresh("full"))
    assert int(caught.value.response.headers["retry-after"]) >= 1
    # Cached through the main server here (an earlier test may have run in another pytest
    # process, with a deployment of its own): cache hits need no queue.
    client.embeddings.create(model=MODEL, input=TEXTS[0])
    cached = full.embeddings.create(model=MODEL, input=TEXTS[0])
    assert len(cached.data[0].embedding) == 384


def test_timeout_is_504(deployment):
    client = openai.OpenAI(base_url=f"{deployment['slow'].base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.embeddings.create(model=MODEL, input=fresh("slow"))
    assert caught.value.status_code == 504


def test_no_worker_is_503_and_big_bodies_413(deployment):
    server = deployment["empty"]
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.embeddings.create(model=MODEL, input="hello")
    assert caught.value.status_code == 503
    status, body = post(f"{server.base_url}/v1/embeddings", {"input": "x" * 70_000})
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_cached_vectors_are_answered_when_only_the_token_count_fails(deployment):
    """A model whose workers are gone and whose tokenizer is not on the server's machine (the
    usual split deployment): its cached texts are still answered, as gRPC Encode answers them,
    with `usage` estimated and said to be (header `embedq-usage: estimated`), not a 503."""
    server = deployment["empty"]
    keys, client = Keys(server.namespace), redis.Redis.from_url(server.redis_url)
    registration = queue_pb2.ModelRegistration(
        name="far-away", fingerprint="f" * 64, dimension=4, pooling="mean",
        max_seq_length=128, normalize=True, source="/not/on/this/machine",
    )  # fmt: skip
    text, vector = "cached far away", np.array([0.5, 0.5, 0.5, 0.5], "<f4")
    variant = variant_fingerprint(registration.fingerprint, normalize=True, truncate=True)
    cache_key = keys.cache(variant, text_sha256(text))
    client.hset(keys.models(), "far-away", registration.SerializeToString())
    client.set(cache_key, vector.tobytes(), ex=300)
    try:
        deadline = time.monotonic() + 10
        while "far-away" not in str(fetch(urllib.request.Request(server.base_url + "/v1/models"))):
            assert time.monotonic() < deadline, "the server never saw the model"
            time.sleep(0.2)
        request = urllib.request.Request(
            f"{server.base_url}/v1/embeddings",
            data=json.dumps({"model": "far-away", "input": [text]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            body, estimated = json.loads(reply.read()), reply.headers.get("embedq-usage")
        assert body["data"][0]["embedding"] == vector.tolist()
        assert estimated == "estimated" and body["usage"]["prompt_tokens"] == 2 + 4  # 15 chars
        status, failed = post(
            f"{server.base_url}/v1/embeddings", {"model": "far-away", "input": ["never cached"]}
        )
        assert status == 503 and "no worker alive" in failed["error"]["message"]
    finally:
        client.hdel(keys.models(), "far-away")
        client.delete(cache_key)
        client.close()
    assert "usage of model 'far-away' estimated" in server.log()


def test_health_answers_head_without_a_token(deployment, pki):
    """Health checkers that probe with HEAD: 200 with no body, no token needed."""
    server = deployment["secure"]
    tls = ssl.create_default_context(cafile=str(pki.ca))
    for path in ("/healthz", "/readyz", "/health"):
        request = urllib.request.Request(server.base_url + path, method="HEAD")
        with urllib.request.urlopen(request, timeout=10, context=tls) as reply:
            assert reply.status == 200 and reply.read() == b""


def test_dimensions_past_any_model_is_400(main):
    status, body = post(f"{main.base_url}/v1/embeddings", {"input": "a", "dimensions": 10**10})
    assert status == 400 and body["error"]["param"] == "dimensions", body


# -- TLS and bearer tokens ------------------------------------------------------------------


def test_tls_and_tokens(deployment, pki, reference_model):
    server = deployment["secure"]
    url = f"{server.base_url}/v1"

    def client(token: str) -> openai.OpenAI:
        http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(pki.ca)))
        return openai.OpenAI(base_url=url, api_key=token, http_client=http, max_retries=0)

    reply = client(TOKEN).embeddings.create(model=MODEL, input=TEXTS[:2])
    np.testing.assert_allclose(matrix(reply), expected(reference_model, TEXTS[:2]), atol=1e-5)
    with pytest.raises(openai.AuthenticationError) as caught:
        client(WRONG_TOKEN).embeddings.create(model=MODEL, input="hi")
    assert caught.value.code == "invalid_api_key" and WRONG_TOKEN not in caught.value.message
    with pytest.raises(openai.AuthenticationError):
        client(WRONG_TOKEN).models.list()
    tls = ssl.create_default_context(cafile=str(pki.ca))
    status, body = post(f"{url}/embeddings", {"input": "hi"}, context=tls)  # no token at all
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    status, body = fetch(urllib.request.Request(f"{server.base_url}/healthz"), tls)  # open
    assert status == 200
    with pytest.raises(openai.APIConnectionError):  # the certificate is checked
        openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0).models.list()
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plaintext on TLS
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/healthz", timeout=5)


# -- metrics -----------------------------------------------------------------------------


def scrape(server: HttpServer) -> dict[tuple[str, str], float]:
    """embedq_requests_total by (method, code)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
        text = reply.read().decode()
    return {
        (sample.labels["method"], sample.labels["code"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "embedq_requests_total"
    }


def test_metrics_count_routes_as_methods(main, client, deployment, pki):
    before = scrape(main)
    client.embeddings.create(model=MODEL, input=TEXTS[0])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    fetch(urllib.request.Request(main.base_url + "/no/such/route"))
    after = scrape(main)

    def delta(method: str, code: str) -> float:
        return after.get((method, code), 0) - before.get((method, code), 0)

    assert delta("POST /v1/embeddings", "OK") == 1
    assert delta("POST /v1/embeddings", "NOT_FOUND") == 1
    assert delta("unknown", "NOT_FOUND") == 1
    secure = deployment["secure"]
    refused = ("POST /v1/embeddings", "UNAUTHENTICATED")
    refused_before = scrape(secure).get(refused, 0)
    tls = ssl.create_default_context(cafile=str(pki.ca))
    status, _ = post(f"{secure.base_url}/v1/embeddings", {"input": "hi"}, context=tls)
    assert status == 401
    assert scrape(secure).get(refused, 0) - refused_before == 1
