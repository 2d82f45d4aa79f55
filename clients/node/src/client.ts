import * as grpc from "@grpc/grpc-js";
import { invalidArgument, toEmbedqError } from "./errors";
import {
  type CallOptions,
  checkText,
  type EncodeOptions,
  type MetricName,
  toRawMetric,
  toRawOptions,
  toTexts,
} from "./options";
import { embedderClient } from "./proto";
import { EncodeStream } from "./stream";
import { type Matrix, rows, unpackFloat32 } from "./vectors";

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
}

/** encode() result in packed form, plus where it came from. */
export interface EncodeResult extends Matrix {
  model: string;
  /** Per text: the vector came from the cache. */
  cached: boolean[];
}

export interface SimilarityOptions extends EncodeOptions, CallOptions {
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

export interface LookupRequest extends EncodeOptions, CallOptions {
  /** Texts to look up. */
  texts?: readonly string[];
  /** Raw 32-byte SHA-256 digests of texts' UTF-8 bytes (see textSha256), or 64-digit hex strings. */
  sha256?: readonly (Uint8Array | string)[];
}

export interface LookupResult {
  model: string;
  dimension: number;
  /** One flag per item: texts first, then hashes, in request order. */
  found: boolean[];
  /** Aligned with `found`: the cached vector, or null for a miss. */
  vectors: (Float32Array | null)[];
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
}

export interface Limits {
  maxBatchTexts: number;
  maxTextBytes: number;
  maxMessageBytes: number;
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

  constructor(target: string = DEFAULT_TARGET, options: ClientOptions = {}) {
    const Embedder = embedderClient(options.protoRoot);
    this.target = target;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    this.maxInFlight = Math.max(1, options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT);
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
   * Embeds texts; one Float32Array per text, in input order. The rows are
   * views into one aligned Float32Array (use `encodeMatrix` for that packed
   * form directly). Inputs over `chunkSize` texts are sent as several requests.
   */
  async encode(
    texts: string | readonly string[],
    options: EncodeOptions & CallOptions = {},
  ): Promise<Float32Array[]> {
    const parts = await this.encodeParts(toTexts(texts), options);
    return parts.flatMap((part) => rows(part));
  }

  /** Like encode(), as one packed row-major `count` x `dimension` matrix. */
  async encodeMatrix(
    texts: string | readonly string[],
    options: EncodeOptions & CallOptions = {},
  ): Promise<EncodeResult> {
    const parts = await this.encodeParts(toTexts(texts), options);
    if (parts.length === 1) return parts[0];
    const count = parts.reduce((n, p) => n + p.count, 0);
    const dimension = parts[0].dimension;
    const data = new Float32Array(count * dimension);
    let offset = 0;
    for (const part of parts) {
      data.set(part.data, offset);
      offset += part.data.length;
    }
    return { count, dimension, data, model: parts[0].model, cached: parts.flatMap((p) => p.cached) };
  }

  private async encodeParts(texts: string[], options: EncodeOptions & CallOptions): Promise<EncodeResult[]> {
    const deadline = this.deadline(options);
    const rawOptions = toRawOptions(options);
    const chunks: string[][] = [];
    for (let i = 0; i < texts.length; i += this.chunkSize) chunks.push(texts.slice(i, i + this.chunkSize));
    if (chunks.length === 0) chunks.push([]); // the server answers INVALID_ARGUMENT
    return this.limited(chunks, async (chunk) => {
      const raw = await this.unary<RawEncodeResponse>("Encode", { texts: chunk, options: rawOptions }, deadline);
      return {
        model: raw.model,
        count: raw.count,
        dimension: raw.dimension,
        data: unpackFloat32(raw.embeddings, raw.count, raw.dimension, raw.dtype),
        cached: raw.cached,
      };
    });
  }

  /**
   * Opens a bidirectional EncodeStream. `options` apply to every message
   * (write() can override them per message). No deadline unless
   * `options.timeoutMs` is given: streams are meant to stay open.
   */
  encodeStream(options: EncodeOptions & CallOptions = {}): EncodeStream {
    const callOptions: grpc.CallOptions = {};
    if (options.timeoutMs !== undefined && Number.isFinite(options.timeoutMs)) {
      callOptions.deadline = Date.now() + options.timeoutMs;
    }
    const method = (this.stub as unknown as Record<string, Function>).EncodeStream;
    const call = method.call(this.stub, this.metadata, callOptions) as grpc.ClientDuplexStream<unknown, never>;
    return new EncodeStream(call, toRawOptions(options));
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
        options: toRawOptions(options),
      },
      this.deadline(options),
    );
    return raw.scores;
  }

  /** Candidates ranked against the query, best first (the best `topK` when topK > 0). */
  async rank(query: string, candidates: readonly string[], options: RankOptions = {}): Promise<Match[]> {
    const raw = await this.unary<RawSimilarityResponse>(
      "Similarity",
      {
        ranking: { query: checkText(query, "query"), candidates: toTexts(candidates, "candidates") },
        metric: toRawMetric(options.metric),
        topK: options.topK ?? 0,
        options: toRawOptions(options),
      },
      this.deadline(options),
    );
    return raw.matches.map((m) => ({ index: m.index, score: m.score }));
  }

  /**
   * Cache only: vectors already stored for texts and/or SHA-256 digests
   * (misses are reported, never computed). normalize/truncate/model select the
   * cache variant, as in encode().
   */
  async lookup(request: LookupRequest): Promise<LookupResult> {
    const texts = toTexts(request.texts ?? []);
    const hashes = (request.sha256 ?? []).map(toDigest);
    const raw = await this.unary<RawLookupResponse>(
      "Lookup",
      { texts, sha256: hashes, options: toRawOptions(request) },
      this.deadline(request),
    );
    const data = unpackFloat32(raw.embeddings, raw.count, raw.dimension, raw.dtype);
    const hits = rows({ count: raw.count, dimension: raw.dimension, data });
    let next = 0;
    const vectors = raw.found.map((found) => (found ? (hits[next++] ?? null) : null));
    return { model: raw.model, dimension: raw.dimension, found: raw.found, vectors };
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
      })),
      defaultModel: raw.defaultModel,
      limits: {
        maxBatchTexts: raw.limits?.maxBatchTexts ?? 0,
        maxTextBytes: raw.limits?.maxTextBytes ?? 0,
        maxMessageBytes: raw.limits?.maxMessageBytes ?? 0,
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

  private unary<T>(method: string, request: unknown, deadline: number | undefined): Promise<T> {
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
    const runner = async (): Promise<void> => {
      while (next < items.length) {
        const index = next++;
        out[index] = await work(items[index]);
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.maxInFlight, items.length) }, runner));
    return out;
  }
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
