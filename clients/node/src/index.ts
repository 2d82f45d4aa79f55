/**
 * Node.js client for embedq, the Sentence-BERT embedding service.
 *
 *     import { EmbedqClient } from "@embedq/client";
 *     const client = new EmbedqClient("127.0.0.1:50051");
 *     const [a, b] = await client.encode(["first sentence", "second one"]); // Float32Array(384) each
 *     const [bits] = await client.encode("one", { precision: "ubinary" }); // Uint8Array(48)
 *     client.close();
 */
export {
  type ClientOptions,
  DEFAULT_CHUNK_SIZE,
  DEFAULT_MAX_IN_FLIGHT,
  DEFAULT_TARGET,
  DEFAULT_TIMEOUT_MS,
  EmbedqClient,
  type EncodeResult,
  type Info,
  type Limits,
  type LookupRequest,
  type LookupResult,
  type Match,
  type ModelInfo,
  type RankOptions,
  type SimilarityOptions,
  type TokenizedText,
} from "./client";
export { EmbedqError, STATUS_NAMES } from "./errors";
export {
  cacheKey,
  DEFAULT_NAMESPACE,
  textSha256,
  textSha256Hex,
  type VariantOptions,
  variantFingerprint,
} from "./hash";
export { type CallOptions, type EncodeOptions, METRIC_NAMES, type MetricName } from "./options";
export { PROTO_FILE, resolveProtoRoot } from "./proto";
export {
  DEFAULT_RETRY_POLICY,
  MIN_ATTEMPT_MS,
  NO_RETRY,
  RETRY_AFTER_KEY,
  RETRYABLE_CODES,
  type RetryPolicy,
  retryAfterMs,
  retryPauseMs,
} from "./retry";
export { EncodeStream, type StreamResult } from "./stream";
export {
  float16ToFloat32,
  type Matrix,
  PRECISIONS,
  type Precision,
  packFloat32,
  quantizeCalibrated,
  quantizeInt8,
  rows,
  rowWidth,
  unpackFloat32,
  unpackVectors,
  type Vector,
  type VectorOf,
} from "./vectors";
