/** Offline tests: hash rule, cache keys, vector unpacking, errors, proto loading. */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import * as path from "node:path";
import { describe, test } from "node:test";
import {
  cacheKey,
  EmbedqClient,
  EmbedqError,
  packFloat32,
  resolveProtoRoot,
  rows,
  textSha256,
  textSha256Hex,
  unpackFloat32,
  variantFingerprint,
} from "../src";
import { toEmbedqError } from "../src/errors";
import { repoRoot } from "./support/service";

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
  test("the proto comes from the repository's protos/ folder (no copy)", () => {
    assert.equal(resolveProtoRoot(), path.join(repoRoot(), "protos"));
    assert.equal(resolveProtoRoot(path.join(repoRoot(), "protos")), path.join(repoRoot(), "protos"));
    assert.throws(() => resolveProtoRoot(__dirname), /has no embedq\/v1\/embedq.proto/);
    assert.throws(() => new EmbedqClient("127.0.0.1:1", { protoRoot: __dirname }));
  });
});
