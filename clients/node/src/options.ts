import { invalidArgument } from "./errors";

/** Options that change how texts become vectors (all optional). */
export interface EncodeOptions {
  /** L2-normalise. Unset: as the model folder says (true for all-MiniLM-L6-v2). */
  normalize?: boolean;
  /**
   * Over-long input: true (the default) keeps the first max_seq_length tokens,
   * like sentence-transformers; false rejects the text with INVALID_ARGUMENT.
   */
  truncate?: boolean;
  /** Served model name (`info().models[].name`). Unset: the default model. */
  model?: string;
}

/** Per-call deadline override, in milliseconds (Infinity: none). */
export interface CallOptions {
  timeoutMs?: number;
}

export type MetricName = "cosine" | "dot" | "euclidean" | "manhattan";

/** The EncodeOptions message as @grpc/proto-loader takes it. */
export interface RawEncodeOptions {
  model: string;
  normalize?: boolean;
  truncation: string;
}

export function toRawOptions(options: EncodeOptions = {}): RawEncodeOptions {
  const raw: RawEncodeOptions = {
    model: options.model ?? "",
    truncation:
      options.truncate === undefined
        ? "TRUNCATION_UNSPECIFIED"
        : options.truncate
          ? "TRUNCATION_END"
          : "TRUNCATION_REJECT",
  };
  // proto3 `optional bool`: leave it out to get the model's default.
  if (options.normalize !== undefined) raw.normalize = options.normalize;
  return raw;
}

const METRICS: Record<string, string> = {
  cosine: "METRIC_COSINE",
  dot: "METRIC_DOT",
  euclidean: "METRIC_EUCLIDEAN",
  manhattan: "METRIC_MANHATTAN",
};

/** Metric names the client accepts. */
export const METRIC_NAMES: readonly MetricName[] = Object.keys(METRICS) as MetricName[];

export function toRawMetric(metric: string | undefined): string {
  if (metric === undefined) return "METRIC_COSINE";
  const raw = METRICS[metric.toLowerCase()];
  if (!raw) {
    throw invalidArgument(`metric: unknown value ${JSON.stringify(metric)}; use one of ${METRIC_NAMES.join(", ")}`);
  }
  return raw;
}

const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

function isWellFormed(text: string): boolean {
  const native = (text as { isWellFormed?: () => boolean }).isWellFormed;
  return native ? native.call(text) : !LONE_SURROGATE.test(text);
}

/**
 * Checks one text. A JS string with a lone UTF-16 surrogate has no UTF-8 form:
 * protobufjs would send invalid UTF-8 for short strings (the server fails to
 * parse the request) and U+FFFD for long ones (silently another text, with
 * another hash), so it is refused here with INVALID_ARGUMENT.
 */
export function checkText(text: unknown, field: string): string {
  if (typeof text !== "string") throw invalidArgument(`${field} is ${typeof text}, not a string`);
  if (!isWellFormed(text)) {
    throw invalidArgument(`${field} has a lone UTF-16 surrogate: not valid Unicode, no UTF-8 form`);
  }
  return text;
}

export function toTexts(texts: string | readonly string[], field = "texts"): string[] {
  if (typeof texts === "string") return [checkText(texts, `${field}[0]`)];
  if (!Array.isArray(texts)) throw invalidArgument(`${field} must be a string or an array of strings`);
  texts.forEach((text, i) => checkText(text, `${field}[${i}]`));
  return texts as string[];
}
