/**
 * Against a real embedq: `embedq serve` (private Redis, one worker, the
 * bundled all-MiniLM-L6-v2) started here on a free port and stopped (SIGINT)
 * in after(), whatever happened.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";
import {
  cacheKey,
  DEFAULT_NAMESPACE,
  EmbedqClient,
  EmbedqError,
  float16ToFloat32,
  type Info,
  packFloat32,
  textSha256,
  textSha256Hex,
} from "../src";
import { pythonReference, redisCommand, Service } from "./support/service";

const DIM = 384;
const ATOL = 1e-5;

/** A text no other test (or earlier run) has sent, so the cache cannot have it yet. */
const fresh = (text: string) => `${text} [${randomUUID()}]`;

const norm = (v: Float32Array) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
const dot = (a: Float32Array, b: Float32Array) => a.reduce((s, x, i) => s + x * b[i], 0);
const cosine = (a: Float32Array, b: Float32Array) => dot(a, b) / (norm(a) * norm(b));
const maxAbsDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  assert.equal(a.length, b.length);
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
};

function isEmbedqError(code: number, pattern?: RegExp) {
  return (err: unknown) => {
    assert.ok(err instanceof EmbedqError, `expected an EmbedqError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.equal(typeof err.details, "string");
    if (pattern) assert.match(err.details, pattern);
    return true;
  };
}

let service: Service | undefined;
let client: EmbedqClient;
let info: Info;

before(
  async () => {
    service = await Service.start();
    client = new EmbedqClient(service.target, { timeoutMs: 60_000 });
    info = await client.info();
  },
  { timeout: 180_000 },
);

after(
  async () => {
    client?.close();
    if (service) {
      const code = await service.stop();
      // Printed by the test runner as a diagnostic line.
      console.log(`embedq serve stopped (exit ${code}); log: ${service.logFile}`);
    }
  },
  { timeout: 60_000 },
);

describe("info", () => {
  test("describes the bundled model and the limits", () => {
    assert.ok(info.models.length >= 1);
    const model = info.models[0];
    assert.equal(info.defaultModel, model.name);
    assert.equal(model.name, "all-MiniLM-L6-v2");
    assert.equal(model.dimension, DIM);
    assert.equal(model.pooling, "mean");
    assert.equal(model.maxSeqLength, 256);
    assert.equal(model.normalize, true);
    assert.ok(model.workersAlive >= 1);
    assert.match(model.fingerprint, /^[0-9a-f]{16,}$/);
    assert.ok(model.source.length > 0);
    assert.equal(info.limits.maxBatchTexts, 2048);
    assert.equal(info.limits.maxTextBytes, 65536);
    assert.ok(info.limits.maxMessageBytes > 0);
    assert.equal(info.limits.maxCandidates, 10_000);
    assert.deepEqual(model.prompts, {});
    assert.equal(model.defaultPromptName, "");
    assert.match(info.version, /^\d+\.\d+/);
  });
});

describe("encode", () => {
  test("returns one 384-dim unit Float32Array per text", async () => {
    const texts = ["A man is playing a guitar.", "A woman is slicing onions.", ""];
    const vectors = await client.encode(texts);
    assert.equal(vectors.length, texts.length);
    for (const v of vectors) {
      assert.ok(v instanceof Float32Array);
      assert.equal(v.length, DIM);
      assert.ok(Math.abs(norm(v) - 1) < 1e-4, `norm ${norm(v)}`);
    }
  });

  test("the same text twice gives identical vectors (second from the cache)", async () => {
    const text = fresh("The same sentence, twice.");
    const first = await client.encodeMatrix([text]);
    const second = await client.encodeMatrix([text]);
    assert.deepEqual(first.cached, [false]);
    assert.deepEqual(second.cached, [true]);
    assert.equal(first.count, 1);
    assert.equal(first.dimension, DIM);
    assert.equal(first.model, "all-MiniLM-L6-v2");
    assert.deepEqual(Array.from(second.data), Array.from(first.data));
    // Rows in one request agree with single requests, in input order.
    const batch = await client.encode(["other text", text, "third"]);
    assert.deepEqual(Array.from(batch[1]), Array.from(first.data));
  });

  test("a string is one text; normalize: false gives the raw pooled vector", async () => {
    const text = fresh("Not normalised.");
    const [unit] = await client.encode(text);
    const [raw] = await client.encode([text], { normalize: false });
    assert.ok(Math.abs(norm(raw) - 1) > 0.1, `raw norm ${norm(raw)}`);
    assert.ok(cosine(raw, unit) > 0.99999);
  });

  test("big inputs are chunked and stay in order", async () => {
    const small = new EmbedqClient(service!.target, { chunkSize: 7, maxInFlight: 3 });
    try {
      const texts = Array.from({ length: 40 }, (_, i) => `chunk test ${i}`);
      const chunked = await small.encodeMatrix(texts);
      const whole = await client.encodeMatrix(texts);
      assert.equal(chunked.count, 40);
      assert.ok(maxAbsDiff(chunked.data, whole.data) === 0);
    } finally {
      small.close();
    }
  });

  test("matches the Python client within 1e-5", async () => {
    const nodeFirst = fresh("Node encodes this one first.");
    const pythonFirst = fresh("Python encodes this one first.");
    const fromNodeFirst = await client.encodeMatrix([nodeFirst]);
    assert.deepEqual(fromNodeFirst.cached, [false]);
    const reference = await pythonReference({
      target: service!.target,
      namespace: DEFAULT_NAMESPACE,
      encode: [pythonFirst, nodeFirst],
      keys: [],
    });
    const fromPythonFirst = await client.encodeMatrix([pythonFirst]);
    assert.deepEqual(fromPythonFirst.cached, [true]);
    assert.ok(maxAbsDiff(fromPythonFirst.data, reference.vectors[0]) <= ATOL);
    assert.ok(maxAbsDiff(fromNodeFirst.data, reference.vectors[1]) <= ATOL);
  });
});

describe("encodeStream", () => {
  test("answers every id exactly once over 30 messages; a bad message does not end it", async () => {
    const stream = client.encodeStream();
    const sent = new Map<string, string[]>();
    for (let i = 0; i < 30; i++) {
      const texts = Array.from({ length: (i % 3) + 1 }, (_, j) => `stream message ${i} text ${j}`);
      const id = `m${i}`;
      sent.set(id, texts);
      stream.write(id, texts);
      if (i === 15) stream.write("bad", []);
    }
    stream.end();
    const seen = new Map<string, number>();
    let bad: EmbedqError | null = null;
    for await (const result of stream) {
      seen.set(result.id, (seen.get(result.id) ?? 0) + 1);
      if (result.id === "bad") {
        bad = result.error;
        assert.equal(result.vectors.length, 0);
        continue;
      }
      assert.equal(result.error, null);
      assert.equal(result.vectors.length, sent.get(result.id)?.length);
      for (const v of result.vectors) {
        assert.equal(v.length, DIM);
        assert.ok(Math.abs(norm(v) - 1) < 1e-4);
      }
    }
    assert.equal(seen.size, 31);
    for (const [id, count] of seen) assert.equal(count, 1, `id ${id} answered ${count} times`);
    for (const id of sent.keys()) assert.ok(seen.has(id), `id ${id} never answered`);
    assert.ok(bad instanceof EmbedqError);
    assert.equal(bad.code, 3);
  });

  test("streamed vectors equal encode() vectors", async () => {
    const text = fresh("streamed and encoded");
    const stream = client.encodeStream({ normalize: true });
    stream.write("only", text);
    stream.end();
    const results = [];
    for await (const r of stream) results.push(r);
    assert.equal(results.length, 1);
    const [encoded] = await client.encode([text]);
    assert.deepEqual(Array.from(results[0].vectors[0]), Array.from(encoded));
  });
});

describe("similarity and rank", () => {
  test("similar texts score higher; cosine agrees with the vectors", async () => {
    const close = await client.similarity("A cat sits on the mat.", "A kitten is sitting on a rug.");
    const far = await client.similarity("A cat sits on the mat.", "Shares fell sharply on Wall Street.");
    assert.ok(close > far, `${close} <= ${far}`);
    assert.ok(close > 0.5 && close <= 1.0001);
    const [a, b] = await client.encode(["A cat sits on the mat.", "A kitten is sitting on a rug."]);
    assert.ok(Math.abs(close - cosine(a, b)) < 1e-4);
    const asDot = await client.similarity("A cat sits on the mat.", "A kitten is sitting on a rug.", "dot");
    assert.ok(Math.abs(asDot - close) < 1e-4, "dot = cosine on unit vectors");
    const euclid = await client.similarity("a", "b", { metric: "euclidean" });
    assert.ok(euclid < 0, "distances come back negated");
    const pairs = await client.similarityPairs([
      ["fast car", "quick automobile"],
      ["fast car", "slow snail"],
    ]);
    assert.equal(pairs.length, 2);
    assert.ok(pairs[0] > pairs[1]);
  });

  test("rank puts the relevant candidate first, best first, honours topK", async () => {
    const candidates = [
      "Shares fell sharply on Wall Street.",
      "Kittens love to play with yarn.",
      "The orchestra played a symphony.",
      "A cat sleeps on the sofa.",
    ];
    const all = await client.rank("cats", candidates);
    assert.equal(all.length, candidates.length);
    assert.ok([1, 3].includes(all[0].index), JSON.stringify(all));
    for (let i = 1; i < all.length; i++) assert.ok(all[i - 1].score >= all[i].score);
    assert.deepEqual(new Set(all.map((m) => m.index)), new Set([0, 1, 2, 3]));
    const top = await client.rank("cats", candidates, { topK: 2, metric: "cosine" });
    assert.deepEqual(top, all.slice(0, 2));
    await assert.rejects(client.rank("cats", candidates, { topK: -1 }), isEmbedqError(3, /top_k/));
  });
});

describe("per-request options", () => {
  const texts = ["A man is playing a guitar.", "A woman is slicing onions.", "Stocks fell sharply today."];

  test("ubinary: 48 bytes a row for 384 dimensions, the Python client's bytes", async () => {
    const batch = texts.map(fresh);
    const bits = await client.encode(batch, { precision: "ubinary" });
    assert.equal(bits.length, batch.length);
    for (const row of bits) {
      assert.ok(row instanceof Uint8Array);
      assert.equal(row.length, 48);
    }
    const matrix = await client.encodeMatrix(batch, { precision: "ubinary", dimension: DIM });
    assert.equal(matrix.dtype, "ubinary");
    assert.equal(matrix.dimension, DIM);
    assert.equal(matrix.width, 48);
    assert.equal(matrix.data.length, batch.length * 48);
    const python = await pythonReference({
      target: service!.target,
      namespace: DEFAULT_NAMESPACE,
      encode: [],
      keys: [],
      packed: [
        [batch, { precision: "ubinary" }],
        [batch, { precision: "binary", dimension: 64 }],
      ],
    });
    assert.equal(python.packed[0].dtype, "uint8");
    assert.deepEqual(python.packed[0].shape, [batch.length, 48]);
    assert.equal(Buffer.from(matrix.data).toString("hex"), python.packed[0].hex);
    const signed = await client.encodeMatrix(batch, { precision: "binary", dimension: 64 });
    assert.ok(signed.data instanceof Int8Array);
    assert.equal(signed.width, 8);
    const signedBytes = Buffer.from(signed.data.buffer, signed.data.byteOffset, signed.data.byteLength);
    assert.equal(signedBytes.toString("hex"), python.packed[1].hex);
    // The bits are the signs of the float32 vector, big-endian within each byte.
    const [floats] = await client.encode([batch[0]]);
    for (let j = 0; j < DIM; j++) {
      assert.equal((bits[0][j >> 3] >> (7 - (j & 7))) & 1, floats[j] > 0 ? 1 : 0);
    }
  });

  test("dimension: 64 rows are unit length and the re-normalised prefix", async () => {
    const short = await client.encode(texts, { dimension: 64 });
    const full = await client.encode(texts);
    for (let i = 0; i < texts.length; i++) {
      assert.equal(short[i].length, 64);
      assert.ok(Math.abs(norm(short[i]) - 1) < 1e-5, `norm ${norm(short[i])}`);
      const prefix = full[i].slice(0, 64);
      const scale = norm(prefix);
      assert.ok(maxAbsDiff(short[i], prefix.map((x) => x / scale)) < 1e-6);
    }
    const close = await client.similarity(texts[0], texts[1], { dimension: 64 });
    assert.ok(Math.abs(close - cosine(short[0], short[1])) < 1e-4);
  });

  test("prompt changes the vector; an empty prompt is no prompt", async () => {
    const [plain] = await client.encode([texts[0]]);
    const [prompted] = await client.encode([texts[0]], { prompt: "query: " });
    const [empty] = await client.encode([texts[0]], { prompt: "" });
    assert.ok(maxAbsDiff(plain, prompted) > 1e-3, "the prompt changed nothing");
    assert.ok(Math.abs(norm(prompted) - 1) < 1e-4);
    assert.ok(maxAbsDiff(plain, empty) <= ATOL);
    const python = await pythonReference({
      target: service!.target,
      namespace: DEFAULT_NAMESPACE,
      encode: [],
      keys: [],
      packed: [[[texts[0]], { prompt: "query: " }]],
    });
    assert.equal(Buffer.from(prompted.buffer, prompted.byteOffset, prompted.byteLength).toString("hex"), python.packed[0].hex);
    const ranked = await client.rank("query", texts, { prompt: "query: ", topK: 1 });
    assert.equal(ranked.length, 1);
    await assert.rejects(client.encode(["x"], { promptName: "nope" }), isEmbedqError(3, /prompt/));
  });

  test("float16 halves, int8 calibrated once over a chunked input, lookup and stream", async () => {
    const [half] = await client.encode([texts[0]], { precision: "float16" });
    const [floats] = await client.encode([texts[0]]);
    assert.ok(half instanceof Uint16Array);
    assert.ok(maxAbsDiff(float16ToFloat32(half), floats) < 1e-3);

    const many = Array.from({ length: 20 }, (_, i) => `calibration text ${i} ${texts[i % 3]}`);
    const whole = await client.encodeMatrix(many, { precision: "int8" }); // one request: the server calibrates
    const small = new EmbedqClient(service!.target, { chunkSize: 6 });
    try {
      const chunked = await small.encodeMatrix(many, { precision: "int8" }); // 4 requests: calibrated here
      assert.ok(chunked.data instanceof Int8Array);
      assert.deepEqual(Array.from(chunked.data), Array.from(whole.data));
      const unsigned = await small.encodeMatrix(many, { precision: "uint8" });
      assert.deepEqual(Array.from(unsigned.data), Array.from(whole.data, (x) => x + 128));
    } finally {
      small.close();
    }
    await assert.rejects(client.encode(["alone"], { precision: "int8" }), isEmbedqError(3, /ranges/));

    const hit = await client.lookup({ texts: [many[0], fresh("missing")], precision: "ubinary", dimension: 128 });
    assert.equal(hit.dtype, "ubinary");
    assert.ok(hit.vectors[0] instanceof Uint8Array);
    assert.equal(hit.vectors[0]!.length, 16);
    assert.equal(hit.vectors[1], null);

    const stream = client.encodeStream({ precision: "binary" });
    stream.write("one", texts[0]);
    stream.end();
    for await (const result of stream) {
      assert.equal(result.error, null);
      assert.equal(result.dtype, "binary");
      assert.ok(result.vectors[0] instanceof Int8Array);
      assert.equal(result.vectors[0].length, 48);
    }
    assert.throws(() => client.encodeStream({ precision: "int4" as never }), isEmbedqError(3, /precision/));
  });
});

describe("tokenize", () => {
  test("ids and tokens with special tokens; truncation is reported", async () => {
    const [hello, long] = await client.tokenize(["Hello, world!", "word ".repeat(400)]);
    assert.deepEqual(hello.tokens, ["[CLS]", "hello", ",", "world", "!", "[SEP]"]);
    assert.equal(hello.ids.length, hello.tokens.length);
    assert.equal(hello.truncated, false);
    assert.equal(hello.fullLength, 6);
    assert.equal(long.truncated, true);
    assert.equal(long.ids.length, info.models[0].maxSeqLength);
    assert.equal(long.fullLength, 402);
  });
});

describe("lookup", () => {
  test("finds a just-encoded vector by text and by a hash computed in Node", async () => {
    const text = fresh("Looked up later.");
    const missing = fresh("Never encoded.");
    const [vector] = await client.encode([text]);
    const byText = await client.lookup({ texts: [text, missing] });
    assert.deepEqual(byText.found, [true, false]);
    assert.equal(byText.dimension, DIM);
    assert.deepEqual(Array.from(byText.vectors[0]!), Array.from(vector));
    assert.equal(byText.vectors[1], null);

    const byHash = await client.lookup({ sha256: [textSha256(missing), textSha256(text), textSha256Hex(text)] });
    assert.deepEqual(byHash.found, [false, true, true]);
    assert.deepEqual(Array.from(byHash.vectors[1]!), Array.from(vector));
    assert.deepEqual(Array.from(byHash.vectors[2]!), Array.from(vector));

    // Other variant: normalize=false was never computed for this text.
    const otherVariant = await client.lookup({ texts: [text], normalize: false });
    assert.deepEqual(otherVariant.found, [false]);
  });
});

describe("cache key rule", () => {
  test("the key computed in Node exists in the service's Redis and holds the vector", async () => {
    const text = fresh("Cache key check: héllo wörld 🌍");
    const model = info.models[0];
    const [vector] = await client.encode([text], { normalize: true, truncate: true });
    const key = cacheKey(DEFAULT_NAMESPACE, model.fingerprint, { normalize: true, truncate: true }, text);
    const redisUrl = service!.redisUrl();
    assert.equal(await redisCommand(redisUrl, "EXISTS", key), 1, `${key} not in ${redisUrl}`);
    const stored = await redisCommand(redisUrl, "GET", key);
    assert.ok(Buffer.isBuffer(stored));
    assert.deepEqual(stored, packFloat32(vector), "the value is the raw little-endian float32 vector");
    // Negative controls: another variant, another text.
    const otherVariant = cacheKey(DEFAULT_NAMESPACE, model.fingerprint, { normalize: false, truncate: true }, text);
    assert.equal(await redisCommand(redisUrl, "EXISTS", otherVariant), 0);
    const otherText = cacheKey(DEFAULT_NAMESPACE, model.fingerprint, { normalize: true, truncate: true }, fresh("x"));
    assert.equal(await redisCommand(redisUrl, "EXISTS", otherText), 0);
    // The same key as the Python side's embedq.keys.
    const python = await pythonReference({
      target: service!.target,
      namespace: DEFAULT_NAMESPACE,
      encode: [],
      keys: [[model.fingerprint, true, true, text]],
    });
    assert.deepEqual(python.keys, [key]);
    assert.deepEqual(python.sha256, [textSha256Hex(text)]);
  });
});

describe("errors", () => {
  test("empty texts -> INVALID_ARGUMENT (3)", async () => {
    await assert.rejects(client.encode([]), isEmbedqError(3, /texts is empty/));
  });

  test("other bad input gets its specific status", async () => {
    await assert.rejects(client.encode(["x"], { model: "no-such-model" }), isEmbedqError(5, /unknown model/));
    await assert.rejects(client.lookup({ sha256: [Buffer.alloc(5)] }), isEmbedqError(3, /32/));
    await assert.rejects(
      client.encode(["word ".repeat(400)], { truncate: false }),
      isEmbedqError(3, /max_seq_length/),
    );
    await assert.rejects(
      client.encode(["x".repeat(info.limits.maxTextBytes + 1)]),
      isEmbedqError(3, /UTF-8 bytes/),
    );
  });

  test("an unreachable server -> UNAVAILABLE (14)", async () => {
    const nowhere = new EmbedqClient("127.0.0.1:1", { timeoutMs: 5_000, retry: false });
    try {
      await assert.rejects(nowhere.info(), isEmbedqError(14));
    } finally {
      nowhere.close();
    }
  });
});
