import type { ClientDuplexStream } from "@grpc/grpc-js";
import { status } from "@grpc/grpc-js";
import { EmbedqError, toEmbedqError } from "./errors";
import { type EncodeOptions, type RawEncodeOptions, toRawOptions, toTexts } from "./options";
import { dtypeName, type Precision, rows, unpackVectors, type VectorOf } from "./vectors";

/** The answer to one streamed message. */
export interface StreamResult<P extends Precision = "float32"> {
  /** The id given to write(). */
  id: string;
  /** One vector per text of the message (typed by `dtype`); empty when `error` is set. */
  vectors: VectorOf<P>[];
  /** Per text: the vector came from the cache. */
  cached: boolean[];
  model: string;
  dimension: number;
  /** Element type of `vectors` (the message's precision; "float32" when `error` is set). */
  dtype: Precision;
  /** Set when this message failed (the stream goes on). */
  error: EmbedqError | null;
}

/** Raw EncodeStreamResponse as @grpc/proto-loader decodes it. */
interface RawStreamResponse {
  id: string;
  model: string;
  dimension: number;
  dtype: string;
  count: number;
  embeddings: Buffer;
  cached: boolean[];
  error: { code: number; message: string } | null;
}

// Stop reading from the network while this many answers wait for the consumer.
const HIGH_WATER = 256;

/**
 * A bidirectional EncodeStream call. `write(id, texts)` sends a message;
 * iterate (`for await`) to get one {@link StreamResult} per message, in
 * completion order. Call `end()` once everything is written: iteration then
 * finishes after the last answer. A failure of the whole call (deadline,
 * server gone) is thrown from the iteration as an EmbedqError, after the
 * answers received before it.
 */
export class EncodeStream<P extends Precision = "float32"> implements AsyncIterable<StreamResult<P>> {
  private readonly queue: StreamResult<P>[] = [];
  private failure: EmbedqError | null = null;
  private done = false;
  private cancelled = false;
  private wake: (() => void) | null = null;
  private iterating = false;

  constructor(
    private readonly call: ClientDuplexStream<unknown, RawStreamResponse>,
    private readonly defaults: RawEncodeOptions,
    /** Each message's own time limit (EncodeStreamRequest.timeout_ms); 0: none. */
    private readonly messageTimeoutMs = 0,
  ) {
    call.on("data", (raw: RawStreamResponse) => {
      let result: StreamResult<P>;
      try {
        result = convert<P>(raw);
      } catch (err) {
        result = emptyResult<P>(raw, toEmbedqError(err));
      }
      this.queue.push(result);
      if (this.queue.length >= HIGH_WATER) call.pause();
      this.notify();
    });
    // grpc-js ends the readable side (push(null)) and then emits 'error' for
    // a non-OK status: answers still buffered (while paused) come before 'end'.
    call.on("error", (err: unknown) => {
      const error = toEmbedqError(err);
      if (!(this.cancelled && error.code === status.CANCELLED)) this.failure ??= error;
      if (call.destroyed || call.readableEnded || call.readableLength === 0) this.finish();
      else this.notify();
    });
    call.on("end", () => this.finish());
    call.on("close", () => this.finish());
  }

  /**
   * Sends one message: `texts` is one text or a few, `options` override the
   * stream's options for this message (keep the stream's precision: the
   * result type assumes it). Returns false when the send buffer is full
   * (await `drain()` before writing more, for backpressure).
   */
  write(id: string, texts: string | readonly string[], options?: EncodeOptions<P>): boolean {
    return this.call.write({
      id,
      texts: toTexts(texts),
      options: options ? toRawOptions(options) : this.defaults,
      timeoutMs: this.messageTimeoutMs,
    });
  }

  /** Resolves when the send buffer has room again. */
  drain(): Promise<void> {
    if (!this.call.writableNeedDrain) return Promise.resolve();
    return new Promise((resolve) => this.call.once("drain", () => resolve()));
  }

  /** No more messages: the server answers the pending ones, then the stream ends. */
  end(): void {
    this.call.end();
  }

  /** Abandons the call; iteration stops without an error. */
  cancel(): void {
    this.cancelled = true;
    this.call.cancel();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<StreamResult<P>> {
    if (this.iterating) throw new Error("an EncodeStream can be iterated only once");
    this.iterating = true;
    try {
      for (;;) {
        const next = this.queue.shift();
        if (next) {
          if (this.queue.length < HIGH_WATER / 4 && this.call.isPaused()) this.call.resume();
          yield next;
          continue;
        }
        if (this.done) break;
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
      }
      if (this.failure) throw this.failure;
    } finally {
      if (!this.done) this.cancel(); // the consumer stopped early
    }
  }

  private finish(): void {
    this.done = true;
    this.notify();
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }
}

function emptyResult<P extends Precision>(raw: RawStreamResponse, error: EmbedqError): StreamResult<P> {
  return {
    id: raw.id,
    vectors: [],
    cached: [],
    model: raw.model,
    dimension: raw.dimension,
    dtype: "float32",
    error,
  };
}

function convert<P extends Precision>(raw: RawStreamResponse): StreamResult<P> {
  if (raw.error) {
    return emptyResult<P>(raw, new EmbedqError(raw.error.code, raw.error.message));
  }
  const data = unpackVectors(raw.embeddings, raw.count, raw.dimension, raw.dtype);
  return {
    id: raw.id,
    vectors: rows({ count: raw.count, dimension: raw.dimension, data }) as VectorOf<P>[],
    cached: raw.cached,
    model: raw.model,
    dimension: raw.dimension,
    dtype: dtypeName(raw.dtype),
    error: null,
  };
}
