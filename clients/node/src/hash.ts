import { createHash } from "node:crypto";

/** Default Redis key namespace of an embedq deployment. */
export const DEFAULT_NAMESPACE = "embedq";

/**
 * The public hash rule: SHA-256 of the text's UTF-8 bytes, exactly as sent
 * (no trimming, no Unicode normalisation). Returns the 32 raw digest bytes,
 * as `Lookup` takes them. (A lone UTF-16 surrogate has no UTF-8 form; Node
 * encodes it as U+FFFD here, and the client refuses such texts in requests.)
 */
export function textSha256(text: string): Buffer {
  return createHash("sha256").update(Buffer.from(text, "utf8")).digest();
}

/** Lowercase hex form of {@link textSha256}. */
export function textSha256Hex(text: string): string {
  return textSha256(text).toString("hex");
}

/** The options that select a cache variant (the effective ones of a request). */
export interface VariantOptions {
  /** Vectors L2-normalised (the effective value: the model's default when a request leaves it unset). */
  normalize: boolean;
  /** Truncation END (true) or REJECT (false); unset truncation means END. */
  truncate: boolean;
  /**
   * The prompt text that applied (the explicit one, the named one's text, or
   * the model's default prompt); unset or "": none.
   */
  prompt?: string;
}

/**
 * First 16 lowercase hex digits of
 * SHA-256("<model fingerprint>|normalize=<0|1>|truncate=<0|1>"), with
 * "|prompt=<sha256 hex of the prompt's UTF-8 bytes>" appended when a prompt
 * applies. Output dimension and precision do not change it.
 */
export function variantFingerprint(modelFingerprint: string, options: VariantOptions): string {
  let material = `${modelFingerprint}|normalize=${options.normalize ? 1 : 0}|truncate=${
    options.truncate ? 1 : 0
  }`;
  if (options.prompt) material += `|prompt=${textSha256Hex(options.prompt)}`;
  return createHash("sha256").update(material, "utf8").digest("hex").slice(0, 16);
}

/**
 * The Redis key under which embedq caches a text's vector:
 * `<namespace>:v1:emb:<variant fingerprint>:<text sha256 hex>`.
 * `modelFingerprint` is `info().models[i].fingerprint`; the value stored there
 * is the raw little-endian float32 vector.
 */
export function cacheKey(
  namespace: string,
  modelFingerprint: string,
  options: VariantOptions,
  text: string,
): string {
  return `${namespace}:v1:emb:${variantFingerprint(modelFingerprint, options)}:${textSha256Hex(text)}`;
}
