/** EncodeStream against a fake grpc-js duplex call (offline). */
import assert from "node:assert/strict";
import { Duplex } from "node:stream";
import { describe, test } from "node:test";
import type { ClientDuplexStream } from "@grpc/grpc-js";
import { EmbedqError, EncodeStream, packFloat32, type StreamResult } from "../src";

interface FakeRequest {
  id: string;
  texts: string[];
  options: { normalize?: boolean };
  timeoutMs?: number;
}

/**
 * Answers each written message with a 2-dim vector per text, as grpc-js
 * delivers them; on end() it ends the readable side, then (like grpc-js for
 * a non-OK status) emits 'error' when `failWith` is set.
 */
class FakeCall extends Duplex {
  readonly received: FakeRequest[] = [];
  cancelled = false;
  pauses = 0;

  override pause(): this {
    this.pauses++;
    return super.pause();
  }

  constructor(private readonly failWith?: { code: number; details: string }) {
    super({ objectMode: true });
  }

  override _read(): void {}

  override _write(request: FakeRequest, _enc: BufferEncoding, done: (err?: Error | null) => void): void {
    this.received.push(request);
    if (request.texts.length === 0) {
      this.push({ id: request.id, model: "", dimension: 0, dtype: "DTYPE_UNSPECIFIED", count: 0,
        embeddings: Buffer.alloc(0), cached: [], error: { code: 3, message: "texts is empty" } });
    } else {
      const vectors = request.texts.map((_, i) => [i, request.texts.length]);
      this.push({ id: request.id, model: "fake", dimension: 2, dtype: "DTYPE_FLOAT32",
        count: request.texts.length, embeddings: packFloat32(vectors),
        cached: request.texts.map(() => false), error: null });
    }
    done();
  }

  override _final(done: (err?: Error | null) => void): void {
    setImmediate(() => {
      this.push(null);
      if (this.failWith) {
        this.emit("error", Object.assign(new Error(this.failWith.details), this.failWith));
      }
    });
    done();
  }

  cancel(): void {
    this.cancelled = true;
  }
}

function open(call: FakeCall): EncodeStream {
  return new EncodeStream(call as unknown as ClientDuplexStream<unknown, never>, {
    model: "",
    truncation: "TRUNCATION_UNSPECIFIED",
  });
}

describe("EncodeStream", () => {
  test("delivers every answer to a slow consumer (backpressure), then ends", async () => {
    const call = new FakeCall();
    const stream = open(call);
    const total = 1000;
    for (let i = 0; i < total; i++) stream.write(`m${i}`, i % 2 ? ["a", "b"] : "a");
    stream.end();
    await new Promise((resolve) => setTimeout(resolve, 20)); // let answers pile up
    const seen = new Set<string>();
    for await (const result of stream) {
      assert.equal(result.error, null);
      assert.equal(result.vectors.length, Number(result.id.slice(1)) % 2 ? 2 : 1);
      assert.deepEqual(Array.from(result.vectors[0]), [0, result.vectors.length]);
      seen.add(result.id);
      if (seen.size % 100 === 0) await new Promise((resolve) => setImmediate(resolve));
    }
    assert.equal(seen.size, total);
    assert.ok(call.pauses > 0, "the stream paused while answers piled up");
    assert.equal(call.received[0].options.normalize, undefined);
  });

  test("each message carries the stream's per-message time limit", async () => {
    const call = new FakeCall();
    const stream = new EncodeStream(call as unknown as ClientDuplexStream<unknown, never>, {
      model: "",
      truncation: "TRUNCATION_UNSPECIFIED",
    }, 250);
    stream.write("a", "x");
    stream.write("b", ["y"], { normalize: false });
    stream.end();
    for await (const _result of stream) { /* drain */ }
    assert.deepEqual(call.received.map((r) => r.timeoutMs), [250, 250]);
    const none = new FakeCall();
    const plain = open(none);
    plain.write("c", "z");
    plain.end();
    for await (const _result of plain) { /* drain */ }
    assert.equal(none.received[0].timeoutMs, 0);
  });

  test("per-message errors and options; a call failure is thrown after the answers", async () => {
    const call = new FakeCall({ code: 4, details: "deadline passed" });
    const stream = open(call);
    stream.write("ok", ["x"], { normalize: false });
    stream.write("bad", []);
    stream.end();
    const results: StreamResult[] = [];
    await assert.rejects(
      (async () => {
        for await (const result of stream) results.push(result);
      })(),
      (err: unknown) => err instanceof EmbedqError && err.code === 4 && err.details === "deadline passed",
    );
    assert.deepEqual(results.map((r) => r.id), ["ok", "bad"]);
    assert.ok(results[1].error instanceof EmbedqError);
    assert.equal(results[1].error?.code, 3);
    assert.equal(call.received[0].options.normalize, false);
  });

  test("breaking out of the loop cancels the call", async () => {
    const call = new FakeCall();
    const stream = open(call);
    stream.write("a", "x");
    stream.write("b", "y");
    for await (const _ of stream) break;
    assert.ok(call.cancelled);
  });
});
