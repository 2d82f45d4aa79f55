/** Offline tests: hash rule, cache keys, vector unpacking, errors, proto loading. */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { describe, test } from "node:test";
import {
  cacheKey,
  EmbedqClient,
  EmbedqError,
  float16ToFloat32,
  PROTO_FILE,
  packFloat32,
  quantizeCalibrated,
  quantizeInt8,
  resolveProtoRoot,
  rows,
  rowWidth,
  textSha256,
  textSha256Hex,
  unpackFloat32,
  unpackVectors,
  variantFingerprint,
} from "../src";
import { toEmbedqError } from "../src/errors";
import { findRepoRoot, packageRoot } from "./support/service";

// Values computed with the Python side (embedq.keys) for the bundled model's fingerprint.
const FINGERPRINT = "809455c30db34229baae55caab1185765406582c8b5aa426f45ccd3d7508ca09";

describe("hash rule", () => {
  test("textSha256 is the SHA-256 of the UTF-8 bytes", () => {
    assert.equal(
      textSha256("").toString("hex"),
      "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    );
    assert.equal(
      textSha256Hex("abc"),
      "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    );
    // Non-ASCII: UTF-8 bytes, no normalisation (Python: hashlib.sha256(s.encode()).hexdigest()).
    assert.equal(
      textSha256Hex("héllo wörld 🌍"),
      "701aea0197ece166311a45663e52d5d580e3b5ff116dfda2724ad928e51a834a",
    );
    const digest = textSha256(" padded ");
    assert.ok(Buffer.isBuffer(digest));
    assert.equal(digest.length, 32);
    assert.notEqual(digest.toString("hex"), textSha256Hex("padded"), "no trimming");
    // NFC and NFD forms are different texts.
    assert.notEqual(textSha256Hex("\u00e9"), textSha256Hex("e\u0301"));
  });

  test("variantFingerprint matches embedq.keys", () => {
    const expected: [boolean, boolean, string][] = [
      [true, true, "8d947603bbb3b92b"],
      [true, false, "90d9b03269f0dfb3"],
      [false, true, "012c61b051cd5217"],
      [false, false, "d1b094749a01151b"],
    ];
    for (const [normalize, truncate, variant] of expected) {
      assert.equal(variantFingerprint(FINGERPRINT, { normalize, truncate }), variant);
    }
    // A prompt that applies is part of the variant; "" is no prompt.
    assert.equal(variantFingerprint(FINGERPRINT, { normalize: true, truncate: true, prompt: "query: " }), "069d8bfdd1e8446a");
    assert.equal(variantFingerprint(FINGERPRINT, { normalize: true, truncate: true, prompt: "" }), "8d947603bbb3b92b");
    const material = `${FINGERPRINT}|normalize=1|truncate=1`;
    assert.equal(
      variantFingerprint(FINGERPRINT, { normalize: true, truncate: true }),
      createHash("sha256").update(material).digest("hex").slice(0, 16),
    );
  });

  test("cacheKey is <namespace>:v1:emb:<variant>:<sha256 hex>", () => {
    assert.equal(
      cacheKey("embedq", FINGERPRINT, { normalize: true, truncate: true }, "A cat sits on the mat."),
      "embedq:v1:emb:8d947603bbb3b92b:a1e4e51d0e27f8c9427011efbdc25991e68f6c82df8bce062b5c08a7148bb41b",
    );
    assert.match(
      cacheKey("prod", FINGERPRINT, { normalize: false, truncate: false }, "x"),
      /^prod:v1:emb:d1b094749a01151b:[0-9a-f]{64}$/,
    );
  });
});

describe("packed vectors", () => {
  test("unpackFloat32 reads little-endian float32 into an aligned copy", () => {
    const values = [1.5, -2.25, 0, 3.4028234663852886e38, 1e-30, -0.1];
    const packed = packFloat32([values.slice(0, 3), values.slice(3)]);
    // Put the bytes at an odd offset inside a bigger buffer: no alignment assumed.
    const backing = Buffer.alloc(packed.length + 3);
    packed.copy(backing, 1);
    const view = backing.subarray(1, 1 + packed.length);
    const data = unpackFloat32(view, 2, 3);
    assert.ok(data instanceof Float32Array);
    assert.equal(data.byteOffset, 0);
    assert.deepEqual(Array.from(data), Array.from(Float32Array.from(values)));
    backing.fill(0); // the result owns its memory
    assert.equal(data[0], 1.5);
    const [first, second] = rows({ count: 2, dimension: 3, data });
    assert.deepEqual(Array.from(first), [1.5, -2.25, 0]);
    assert.equal(second.length, 3);
    assert.equal(second.buffer, data.buffer, "rows are views, not copies");
  });

  test("unpackFloat32 rejects a size mismatch and an unknown dtype", () => {
    assert.throws(
      () => unpackFloat32(Buffer.alloc(10), 1, 3),
      (err: unknown) => err instanceof EmbedqError && err.code === 13,
    );
    assert.throws(() => unpackFloat32(Buffer.alloc(12), 1, 3, "DTYPE_UNSPECIFIED"), EmbedqError);
    assert.equal(unpackFloat32(Buffer.alloc(0), 0, 384).length, 0);
  });
});

describe("precisions", () => {
  test("unpackVectors gives the dtype's typed array, aligned and owned", () => {
    const backing = Buffer.from([0, 0x00, 0x3e, 0x08, 0x88, 0xff, 0x7b, 0xf8]); // odd offset
    const halves = unpackVectors(backing.subarray(1, 5), 1, 2, "DTYPE_FLOAT16");
    assert.ok(halves instanceof Uint16Array);
    assert.deepEqual(Array.from(halves), [15872, 34824]);
    const signed = unpackVectors(backing.subarray(1, 7), 2, 3, "DTYPE_INT8");
    assert.ok(signed instanceof Int8Array);
    assert.deepEqual(Array.from(signed), [0, 62, 8, -120, -1, 123]);
    const bits = unpackVectors(backing.subarray(1, 7), 2, 20, "DTYPE_UBINARY"); // ceil(20 / 8) = 3 bytes a row
    assert.ok(bits instanceof Uint8Array);
    const [first, second] = rows({ count: 2, dimension: 20, data: bits });
    assert.deepEqual(Array.from(first), [0x00, 0x3e, 0x08]);
    assert.deepEqual(Array.from(second), [0x88, 0xff, 0x7b]);
    assert.ok(unpackVectors(backing.subarray(1, 3), 2, 8, "DTYPE_BINARY") instanceof Int8Array);
    assert.ok(unpackVectors(Buffer.alloc(8), 2, 1, 1) instanceof Float32Array);
    backing.fill(0);
    assert.equal(halves[0], 15872);
    assert.throws(() => unpackVectors(Buffer.alloc(5), 2, 20, "DTYPE_UBINARY"), { code: 13 });
    assert.throws(() => unpackVectors(Buffer.alloc(4), 1, 4, "DTYPE_INT4"), { code: 13 });
    assert.equal(rowWidth("binary", 384), 48);
    assert.equal(rowWidth("int8", 384), 384);
  });

  test("float16ToFloat32 is exact (values from numpy)", () => {
    const halves = Uint16Array.from([15872, 34824, 31743, 13652, 0, 0x7c00, 0x0001]);
    assert.deepEqual(Array.from(float16ToFloat32(halves)), [
      1.5, -0.00012302398681640625, 65504, 0.3330078125, 0, Infinity, 2 ** -24,
    ]);
  });

  test("int8/uint8 codes equal sentence-transformers' quantize_embeddings", () => {
    const x = Float32Array.from([0.1, -0.5, 0.3, 0.0, 0.7, 0.2, -0.9, 0.0, -0.3, 0.25, 0.05, 0.0]);
    assert.deepEqual(
      Array.from(quantizeCalibrated(x, 4, "int8")),
      [-27, -128, 127, -128, 126, 109, -128, -128, -128, 127, 73, -128],
    );
    assert.deepEqual(
      Array.from(quantizeCalibrated(x, 4, "uint8")),
      [101, 0, 255, 0, 254, 237, 0, 0, 0, 255, 201, 0],
    );
    // Given ranges; values outside them clip.
    const codes = quantizeInt8(Float32Array.from([-2, 0, 2]), 3, [-1, -1, -1], [1, 1, 1], "uint8");
    assert.deepEqual(Array.from(codes), [0, 127, 255]);
    assert.throws(() => quantizeCalibrated(x.subarray(0, 4), 4, "int8"), { code: 3 });
  });

  test("bad output options are refused before anything is sent", async () => {
    const client = new EmbedqClient("127.0.0.1:1");
    try {
      await assert.rejects(client.encode(["a"], { precision: "int4" as never }), { code: 3, details: /precision/ });
      await assert.rejects(client.encode(["a"], { prompt: "q: ", promptName: "query" }), { code: 3 });
      await assert.rejects(client.encode(["a"], { dimension: -1 }), { code: 3, details: /dimension/ });
      await assert.rejects(client.encode(["a"], { ranges: [0, 1] }), { code: 3, details: /ranges/ });
      await assert.rejects(client.encode(["a"], { precision: "int8", ranges: [0, 1, 2] }), { code: 3 });
    } finally {
      client.close();
    }
  });
});

describe("errors", () => {
  test("grpc errors become EmbedqError with code and details", () => {
    const err = toEmbedqError(Object.assign(new Error("3 INVALID_ARGUMENT: x"), { code: 3, details: "x" }));
    assert.ok(err instanceof EmbedqError);
    assert.ok(err instanceof Error);
    assert.equal(err.code, 3);
    assert.equal(err.details, "x");
    assert.equal(err.codeName, "INVALID_ARGUMENT");
    assert.equal(err.message, "INVALID_ARGUMENT (3): x");
    assert.equal(toEmbedqError("boom").code, 2);
  });

  test("client-side argument errors reject with INVALID_ARGUMENT", async () => {
    const client = new EmbedqClient("127.0.0.1:1");
    try {
      await assert.rejects(client.similarity("a", "b", { metric: "jaccard" as never }), {
        name: "EmbedqError",
        code: 3,
      });
      await assert.rejects(client.lookup({ sha256: ["not hex"] }), { code: 3 });
      // Lone surrogates have no UTF-8 form: refused before anything is sent.
      await assert.rejects(client.encode(["ok", "bad \ud800"]), {
        code: 3,
        details: /texts\[1\] has a lone UTF-16 surrogate/,
      });
      await assert.rejects(client.similarity("a", "\udc00"), { code: 3, details: /pairs\[0\]\.b/ });
      await assert.rejects(client.rank("q", ["\ud83c"]), { code: 3, details: /candidates\[0\]/ });
      await assert.rejects(client.encode([1 as unknown as string]), { code: 3, details: /not a string/ });
    } finally {
      client.close();
    }
  });
});

describe("proto loading", () => {
  test("the proto comes from the package's own protos/ copy, identical to the repository's", () => {
    const ownCopy = path.join(packageRoot(), "protos");
    assert.equal(resolveProtoRoot(), ownCopy);
    assert.equal(resolveProtoRoot(ownCopy), ownCopy);
    const repo = findRepoRoot();
    if (repo !== undefined) {
      // In the repository the build copies protos/: the copy must be the current source.
      assert.equal(
        readFileSync(path.join(ownCopy, PROTO_FILE), "utf8"),
        readFileSync(path.join(repo, "protos", PROTO_FILE), "utf8"),
        `${PROTO_FILE} in the package differs from the repository's`,
      );
    }
    // The private server-worker format stays out of the package.
    assert.equal(existsSync(path.join(ownCopy, "embedq", "internal")), false);
    assert.throws(() => resolveProtoRoot(__dirname), /has no embedq\/v1\/embedq.proto/);
    assert.throws(() => new EmbedqClient("127.0.0.1:1", { protoRoot: __dirname }));
  });
  test("EMBEDQ_PROTO_ROOT is honoured before the package's copy", () => {
    const other = mkdtempSync(path.join(tmpdir(), "embedq-protos-"));
    mkdirSync(path.join(other, "embedq", "v1"), { recursive: true });
    copyFileSync(path.join(packageRoot(), "protos", PROTO_FILE), path.join(other, PROTO_FILE));
    const saved = process.env.EMBEDQ_PROTO_ROOT;
    process.env.EMBEDQ_PROTO_ROOT = other;
    try {
      assert.equal(resolveProtoRoot(), other);
      const ownCopy = path.join(packageRoot(), "protos");
      assert.equal(resolveProtoRoot(ownCopy), ownCopy); // the explicit option still wins
    } finally {
      if (saved === undefined) delete process.env.EMBEDQ_PROTO_ROOT;
      else process.env.EMBEDQ_PROTO_ROOT = saved;
      rmSync(other, { recursive: true, force: true });
    }
  });

  test("package.json exports: the entry point and the .proto files, by package name", () => {
    // A package may require itself by name through its own "exports" map.
    assert.equal(require.resolve("@embedq/client"), path.join(packageRoot(), "dist", "src", "index.js"));
    assert.equal(
      require.resolve(`@embedq/client/protos/${PROTO_FILE}`),
      path.join(packageRoot(), "protos", PROTO_FILE),
    );
    assert.throws(
      () => require.resolve("@embedq/client/dist/src/proto.js"),
      /not defined by "exports"/,
    );
  });
});
