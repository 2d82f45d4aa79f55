import * as grpc from "@grpc/grpc-js";
import { invalidArgument, toEmbedqError } from "./errors";
import {
  type CallOptions,
  checkText,
  type EncodeOptions,
  type MetricName,
  toPrecision,
  toRawMetric,
  toRawOptions,
  toTexts,
} from "./options";
import { embedderClient } from "./proto";
import { type RetryPolicy, retryPauseMs, toRetryPolicy } from "./retry";
import { EncodeStream } from "./stream";
import {
  dtypeName,
  type Matrix,
  type Precision,
  quantizeCalibrated,
  rows,
  rowWidth,
  unpackVectors,
  type Vector,
  type VectorOf,
} from "./vectors";

export const DEFAULT_TARGET = "127.0.0.1:50051";
/** Per-call deadline when none is given (the server's own default is 120 s too). */
export const DEFAULT_TIMEOUT_MS = 120_000;
/** Texts per Encode request; bigger encode() inputs are split (server limit: 2048). */
export const DEFAULT_CHUNK_SIZE = 512;
/** Requests of one chunked encode() in flight at once. */
export const DEFAULT_MAX_IN_FLIGHT = 4;
/** Responses of big batches outgrow grpc's 4 MiB default; match the server's bound. */
export const DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024;

export interface ClientOptions {
  /** Deadline of each call in ms (Infinity: none). Default 120000. */
  timeoutMs?: number;
  /** Channel credentials. Default: insecure (plaintext), like `embedq serve`. */
  credentials?: grpc.ChannelCredentials;
  /** Folder holding `embedq/v1/embedq.proto`. Default: found above this package (see README). */
  protoRoot?: string;
  /** Extra grpc channel options (they win over the defaults). */
  channelOptions?: grpc.ChannelOptions;
  /** Metadata sent with every call (e.g. auth headers for a proxy). */
  metadata?: grpc.Metadata;
  /** Texts per Encode request for big inputs. Default 512. */
  chunkSize?: number;
  /** Requests of one chunked encode() in flight at once. Default 4. */
  maxInFlight?: number;
  /**
   * Retries of calls refused with UNAVAILABLE or RESOURCE_EXHAUSTED, within
   * the call's deadline, honouring the server's `retry-after-ms` hint.
   * Default true: up to 5 attempts, pauses of 200, 400, 800, 1600 ms
   * (+-20 %, at most 5000 ms). false: none; an object overrides fields of
   * {@link DEFAULT_RETRY_POLICY}. Streams (encodeStream) are never retried.
   */
  retry?: Partial<RetryPolicy> | boolean;
}

/** encode() result in packed form, plus where it came from. */
export interface EncodeResult<V extends Vector = Float32Array> extends Matrix<V> {
  model: string;
  /** Element type of `data` (the requested precision). */
  dtype: Precision;
  /** Values (bytes for binary/ubinary) per row in `data`. */
  width: number;
  /** Per text: the vector came from the cache. */
  cached: boolean[];
}

/** Similarity scores float32 vectors: every encode option but precision/ranges applies. */
export interface SimilarityOptions extends Omit<EncodeOptions, "precision" | "ranges">, CallOptions {
  /** Default "cosine". Higher is more similar for every metric (distances are negated). */
  metric?: MetricName;
}

export interface RankOptions extends SimilarityOptions {
  /** Keep the best topK candidates; 0 (default): all of them. */
  topK?: number;
}

export interface Match {
  /** Index into the candidates array. */
  index: number;
  score: number;
}

export interface LookupRequest<P extends Precision = Precision> extends EncodeOptions<P>, CallOptions {
  /** Texts to look up. */
  texts?: readonly string[];
  /** Raw 32-byte SHA-256 digests of texts' UTF-8 bytes (see textSha256), or 64-digit hex strings. */
  sha256?: readonly (Uint8Array | string)[];
}

export interface LookupResult<V extends Vector = Float32Array> {
  model: string;
  dimension: number;
  /** Element type of the vectors (the requested precision). */
  dtype: Precision;
  /** One flag per item: texts first, then hashes, in request order. */
  found: boolean[];
  /** Aligned with `found`: the cached vector, or null for a miss. */
  vectors: (V | null)[];
}

export interface TokenizedText {
  ids: number[];
  tokens: string[];
  truncated: boolean;
  fullLength: number;
}

export interface ModelInfo {
  name: string;
  fingerprint: string;
  dimension: number;
  pooling: string;
  maxSeqLength: number;
  normalize: boolean;
  workersAlive: number;
  source: string;
  /** Named prompts of the model (config_sentence_transformers.json): name -> prompt text. */
  prompts: Record<string, string>;
  /** The prompt applied when a request names none ("" when there is none). */
  defaultPromptName: string;
}

export interface Limits {
  maxBatchTexts: number;
  maxTextBytes: number;
  maxMessageBytes: number;
  /** Most candidates in one rank() call (10,000 by default). */
  maxCandidates: number;
}

export interface Info {
  models: ModelInfo[];
  defaultModel: string;
  limits: Limits;
  version: string;
}

// Messages as @grpc/proto-loader decodes them (camelCase, enum names, Buffers).
interface RawEncodeResponse {
  model: string;
  dimension: number;
  dtype: string;
  count: number;
  embeddings: Buffer;
  cached: boolean[];
}
interface RawSimilarityResponse {
  model: string;
  metric: string;
  scores: number[];
  matches: { index: number; score: number }[];
}
interface RawLookupResponse {
  model: string;
  dimension: number;
  dtype: string;
  found: boolean[];
  embeddings: Buffer;
  count: number;
}

type UnaryMethod = (
  request: unknown,
  metadata: grpc.Metadata,
  options: grpc.CallOptions,
  callback: (err: grpc.ServiceError | null, response: unknown) => void,
) => grpc.ClientUnaryCall;

/**
 * Client of an embedq deployment. Every method returns a Promise that rejects
 * with an {@link EmbedqError} (gRPC `code` and `details`) on failure.
 */
export class EmbedqClient {
  readonly target: string;
  readonly timeoutMs: number;
  private readonly stub: grpc.Client;
  private readonly metadata: grpc.Metadata;
  private readonly chunkSize: number;
  private readonly maxInFlight: number;
  /** The retry policy in use (maxAttempts 1: none). */
  readonly retry: Readonly<RetryPolicy>;

  constructor(target: string = DEFAULT_TARGET, options: ClientOptions = {}) {
    const Embedder = embedderClient(options.protoRoot);
    this.target = target;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    this.maxInFlight = Math.max(1, options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT);
    this.retry = toRetryPolicy(options.retry);
    if (!Number.isInteger(this.chunkSize) || this.chunkSize < 1) {
      throw new RangeError("chunkSize must be a positive integer");
    }
    this.metadata = options.metadata ?? new grpc.Metadata();
    this.stub = new Embedder(target, options.credentials ?? grpc.credentials.createInsecure(), {
      "grpc.max_receive_message_length": DEFAULT_MAX_RECEIVE_BYTES,
      ...options.channelOptions,
    });
  }

  /**
   * Embeds texts; one vector per text, in input order: a Float32Array, or for
   * another `precision` the typed array {@link VectorOf} names (float16: raw
   * half bits in a Uint16Array; binary/ubinary: ceil(dimension / 8) packed
   * bytes). The rows are views into one aligned array per response (use
   * `encodeMatrix` for the packed form directly). Inputs over `chunkSize`
   * texts are sent as several requests.
   */
  async encode<P extends Precision = "float32">(
    texts: string | readonly string[],
    options: EncodeOptions<P> & CallOptions = {},
  ): Promise<VectorOf<P>[]> {
    const parts = await this.encodeParts(toTexts(texts), options);
    return parts.flatMap((part) => rows(part)) as VectorOf<P>[];
  }

  /** Like encode(), as one packed row-major `count` x `width` matrix. */
  async encodeMatrix<P extends Precision = "float32">(
    texts: string | readonly string[],
    options: EncodeOptions<P> & CallOptions = {},
  ): Promise<EncodeResult<VectorOf<P>>> {
    const parts = await this.encodeParts(toTexts(texts), options);
    return concatParts(parts) as EncodeResult<VectorOf<P>>;
  }

  private async encodeParts(texts: string[], options: EncodeOptions & CallOptions): Promise<EncodeResult<Vector>[]> {
    const deadline = this.deadline(options);
    const chunks: string[][] = [];
    for (let i = 0; i < texts.length; i += this.chunkSize) chunks.push(texts.slice(i, i + this.chunkSize));
    if (chunks.length === 0) chunks.push([]); // the server answers INVALID_ARGUMENT
    // int8/uint8 without ranges calibrates on each request's own vectors: split
    // over several requests, every chunk would get its own ranges. Ask for
    // float32 instead and quantise here, once, over the whole input, with the
    // same formula: the codes one request for all of it would give.
    const precision = toPrecision(options.precision);
    const calibrateHere =
      chunks.length > 1 && (precision === "int8" || precision === "uint8") && options.ranges === undefined;
    const rawOptions = toRawOptions(calibrateHere ? { ...options, precision: "float32" } : options);
    const parts = await this.limited(chunks, async (chunk) => {
      const raw = await this.unary<RawEncodeResponse>("Encode", { texts: chunk, options: rawOptions }, deadline);
      const dtype = dtypeName(raw.dtype);
      return {
        model: raw.model,
        count: raw.count,
        dimension: raw.dimension,
        dtype,
        width: rowWidth(dtype, raw.dimension),
        data: unpackVectors(raw.embeddings, raw.count, raw.dimension, raw.dtype),
        cached: raw.cached,
      };
    });
    if (!calibrateHere) return parts;
    const merged = concatParts(parts) as EncodeResult<Float32Array>;
    const data = quantizeCalibrated(merged.data, merged.dimension, precision as "int8" | "uint8");
    return [{ ...merged, data, dtype: precision, width: merged.dimension }];
  }

  /**
   * Opens a bidirectional EncodeStream. `options` apply to every message
   * (write() can override them per message). No deadline unless
   * `options.timeoutMs` is given: streams are meant to stay open. int8/uint8
   * without ranges calibrate on each message's own texts. A stream is never
   * retried: a message refused with UNAVAILABLE or RESOURCE_EXHAUSTED comes
   * back as its result's `error` (`error.retryable`), for the caller to write
   * again; a failure of the whole call ends the iteration with an EmbedqError.
   * `messageTimeoutMs` is each message's own time limit: one not answered in
   * time fails alone with DEADLINE_EXCEEDED (work that cannot finish within it
   * is refused at once), while the stream goes on.
   */
  encodeStream<P extends Precision = "float32">(
    options: EncodeOptions<P> & CallOptions & { messageTimeoutMs?: number } = {},
  ): EncodeStream<P> {
    const rawOptions = toRawOptions(options); // refuse bad options before opening the call
    const callOptions: grpc.CallOptions = {};
    if (options.timeoutMs !== undefined && Number.isFinite(options.timeoutMs)) {
      callOptions.deadline = Date.now() + options.timeoutMs;
    }
    const method = (this.stub as unknown as Record<string, Function>).EncodeStream;
    const call = method.call(this.stub, this.metadata, callOptions) as grpc.ClientDuplexStream<unknown, never>;
    const messageTimeoutMs = Math.max(0, Math.ceil(options.messageTimeoutMs ?? 0));
    return new EncodeStream<P>(call, rawOptions, messageTimeoutMs);
  }

  /** Similarity of two texts (default metric: cosine). */
  async similarity(a: string, b: string, options: SimilarityOptions | MetricName = {}): Promise<number> {
    const opts = typeof options === "string" ? { metric: options } : options;
    const [score] = await this.similarityPairs([[a, b]], opts);
    return score;
  }

  /** Scores of text pairs, in pair order. */
  async similarityPairs(
    pairs: readonly (readonly [string, string])[],
    options: SimilarityOptions = {},
  ): Promise<number[]> {
    const raw = await this.unary<RawSimilarityResponse>(
      "Similarity",
      {
        pairs: {
          pairs: pairs.map(([a, b], i) => ({
            a: checkText(a, `pairs[${i}].a`),
            b: checkText(b, `pairs[${i}].b`),
          })),
        },
        metric: toRawMetric(options.metric),
        options: toRawOptions(scoringOptions(options)),
      },
      this.deadline(options),
    );
    return raw.scores;
  }

  /**
   * Candidates ranked against the query, best first (the best `topK` when
   * topK > 0). One request: up to `info().limits.maxCandidates` candidates
   * (10,000 by default).
   */
  async rank(query: string, candidates: readonly string[], options: RankOptions = {}): Promise<Match[]> {
    const raw = await this.unary<RawSimilarityResponse>(
      "Similarity",
      {
        ranking: { query: checkText(query, "query"), candidates: toTexts(candidates, "candidates") },
        metric: toRawMetric(options.metric),
        topK: options.topK ?? 0,
        options: toRawOptions(scoringOptions(options)),
      },
      this.deadline(options),
    );
    return raw.matches.map((m) => ({ index: m.index, score: m.score }));
  }

  /**
   * Cache only: vectors already stored for texts and/or SHA-256 digests
   * (misses are reported, never computed). normalize/truncate/model/prompt/
   * promptName select the cache variant, as in encode(); dimension/precision/
   * ranges shape the answer (int8/uint8 without ranges: calibrated on the hits).
   */
  async lookup<P extends Precision = "float32">(request: LookupRequest<P>): Promise<LookupResult<VectorOf<P>>> {
    const texts = toTexts(request.texts ?? []);
    const hashes = (request.sha256 ?? []).map(toDigest);
    const raw = await this.unary<RawLookupResponse>(
      "Lookup",
      { texts, sha256: hashes, options: toRawOptions(request) },
      this.deadline(request),
    );
    const data = unpackVectors(raw.embeddings, raw.count, raw.dimension, raw.dtype);
    const hits = rows({ count: raw.count, dimension: raw.dimension, data }) as VectorOf<P>[];
    let next = 0;
    const vectors = raw.found.map((found) => (found ? (hits[next++] ?? null) : null));
    return { model: raw.model, dimension: raw.dimension, dtype: dtypeName(raw.dtype), found: raw.found, vectors };
  }

  /** Token ids and strings, as the model's own tokenizer sees each text. */
  async tokenize(
    texts: string | readonly string[],
    options: Omit<EncodeOptions, "normalize"> & CallOptions = {},
  ): Promise<TokenizedText[]> {
    const raw = await this.unary<{ texts: TokenizedText[] }>(
      "Tokenize",
      { texts: toTexts(texts), options: toRawOptions(options) },
      this.deadline(options),
    );
    return raw.texts.map((t) => ({
      ids: t.ids,
      tokens: t.tokens,
      truncated: t.truncated,
      fullLength: t.fullLength,
    }));
  }

  /** The served models (name, fingerprint, dimension, ...) and request limits. */
  async info(options: CallOptions = {}): Promise<Info> {
    const raw = await this.unary<Info>("Info", {}, this.deadline(options));
    return {
      models: raw.models.map((m) => ({
        name: m.name,
        fingerprint: m.fingerprint,
        dimension: m.dimension,
        pooling: m.pooling,
        maxSeqLength: m.maxSeqLength,
        normalize: m.normalize,
        workersAlive: m.workersAlive,
        source: m.source,
        prompts: { ...(m.prompts ?? {}) },
        defaultPromptName: m.defaultPromptName ?? "",
      })),
      defaultModel: raw.defaultModel,
      limits: {
        maxBatchTexts: raw.limits?.maxBatchTexts ?? 0,
        maxTextBytes: raw.limits?.maxTextBytes ?? 0,
        maxMessageBytes: raw.limits?.maxMessageBytes ?? 0,
        maxCandidates: raw.limits?.maxCandidates ?? 0,
      },
      version: raw.version,
    };
  }

  /** Closes the channel; calls in flight are cancelled. */
  close(): void {
    this.stub.close();
  }

  private deadline(options: CallOptions): number | undefined {
    const timeout = options.timeoutMs ?? this.timeoutMs;
    return Number.isFinite(timeout) ? Date.now() + timeout : undefined;
  }

  /** One unary call, sent again while the retry policy says so. */
  private async unary<T>(method: string, request: unknown, deadline: number | undefined): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.unaryOnce<T>(method, request, deadline);
      } catch (err) {
        const error = toEmbedqError(err);
        error.attempts = attempt;
        const remaining = deadline === undefined ? undefined : deadline - Date.now();
        const pause = retryPauseMs(this.retry, attempt + 1, error, remaining);
        if (pause === undefined) throw error;
        await new Promise((resolve) => setTimeout(resolve, pause));
      }
    }
  }

  private unaryOnce<T>(method: string, request: unknown, deadline: number | undefined): Promise<T> {
    const fn = (this.stub as unknown as Record<string, UnaryMethod>)[method];
    const callOptions: grpc.CallOptions = deadline === undefined ? {} : { deadline };
    return new Promise<T>((resolve, reject) => {
      fn.call(this.stub, request, this.metadata, callOptions, (err, response) => {
        if (err) reject(toEmbedqError(err));
        else resolve(response as T);
      });
    });
  }

  private async limited<I, O>(items: I[], work: (item: I) => Promise<O>): Promise<O[]> {
    if (items.length === 1) return [await work(items[0])];
    const out: O[] = new Array(items.length);
    let next = 0;
    let failed = false; // one chunk failed: the call fails, so send no more of them
    const runner = async (): Promise<void> => {
      while (next < items.length && !failed) {
        const index = next++;
        try {
          out[index] = await work(items[index]);
        } catch (error) {
          failed = true;
          throw error;
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.maxInFlight, items.length) }, runner));
    return out;
  }
}

/** Similarity always scores float32 vectors: precision and ranges never go out. */
function scoringOptions(options: SimilarityOptions): EncodeOptions {
  const { precision: _precision, ranges: _ranges, ...rest } = options as EncodeOptions & SimilarityOptions;
  return rest;
}

/** One matrix from consecutive parts (same dtype and width), in order. */
function concatParts(parts: EncodeResult<Vector>[]): EncodeResult<Vector> {
  if (parts.length === 1) return parts[0];
  const first = parts[0];
  const length = parts.reduce((n, p) => n + p.data.length, 0);
  const Kind = first.data.constructor as new (length: number) => Vector;
  const data = new Kind(length);
  let offset = 0;
  for (const part of parts) {
    (data as Float32Array).set(part.data as ArrayLike<number>, offset);
    offset += part.data.length;
  }
  return {
    count: parts.reduce((n, p) => n + p.count, 0),
    dimension: first.dimension,
    dtype: first.dtype,
    width: first.width,
    data,
    model: first.model,
    cached: parts.flatMap((p) => p.cached),
  };
}

const HEX_DIGEST = /^[0-9a-fA-F]{64}$/;

function toDigest(item: Uint8Array | string, index: number): Buffer {
  if (typeof item === "string") {
    if (!HEX_DIGEST.test(item)) {
      throw invalidArgument(`sha256[${index}] is a string but not 64 hex digits`);
    }
    return Buffer.from(item, "hex");
  }
  if (item instanceof Uint8Array) return Buffer.from(item.buffer, item.byteOffset, item.byteLength);
  throw invalidArgument(`sha256[${index}] must be a Buffer/Uint8Array or a hex string`);
}
