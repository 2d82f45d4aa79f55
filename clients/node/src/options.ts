import { invalidArgument } from "./errors";
import { PRECISIONS, type Precision } from "./vectors";

/** Options that change how texts become vectors (all optional). */
export interface EncodeOptions<P extends Precision = Precision> {
  /** L2-normalise. Unset: as the model folder says (true for all-MiniLM-L6-v2). */
  normalize?: boolean;
  /**
   * Over-long input: true (the default) keeps the first max_seq_length tokens,
   * like sentence-transformers; false rejects the text with INVALID_ARGUMENT.
   */
  truncate?: boolean;
  /** Served model name (`info().models[].name`). Unset: the default model. */
  model?: string;
  /**
   * Output dimension (Matryoshka): keep the first `dimension` values,
   * re-normalised when normalisation is on. Unset or 0: the model's.
   */
  dimension?: number;
  /**
   * Element type of the vectors (default "float32"); see {@link VectorOf} for
   * the typed array each one comes in. Similarity ignores it.
   */
  precision?: P;
  /** Prepended to every text before tokenisation; "" turns off the model's default prompt. */
  prompt?: string;
  /** One of the model's named prompts (`info().models[].prompts`); exclusive with `prompt`. */
  promptName?: string;
  /**
   * int8/uint8 calibration: per-dimension minimums then maximums (2 x
   * dimension values, flat or as two rows). Unset: the request's own vectors
   * calibrate (at least 2 texts); see the README for chunked inputs.
   */
  ranges?: ArrayLike<number> | readonly [ArrayLike<number>, ArrayLike<number>];
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
  dimension?: number;
  precision?: string;
  prompt?: string;
  promptName?: string;
  ranges?: number[];
}

/** The precision a request asks for ("float32" when unset); INVALID_ARGUMENT when unknown. */
export function toPrecision(precision: string | undefined): Precision {
  if (precision === undefined) return "float32";
  const name = typeof precision === "string" ? precision.toLowerCase() : "";
  if (!(PRECISIONS as readonly string[]).includes(name)) {
    throw invalidArgument(
      `precision: unknown value ${JSON.stringify(precision)}; use one of ${PRECISIONS.join(", ")}`,
    );
  }
  return name as Precision;
}

function flatRanges(ranges: EncodeOptions["ranges"]): number[] {
  if (ranges === undefined) return [];
  const parts = Array.from(ranges as ArrayLike<unknown>);
  const flat =
    parts.length === 2 && typeof parts[0] === "object" && parts[0] !== null
      ? [...Array.from(parts[0] as ArrayLike<number>), ...Array.from(parts[1] as ArrayLike<number>)]
      : (parts as number[]);
  if (flat.length === 0 || flat.length % 2 !== 0 || flat.some((v) => typeof v !== "number")) {
    throw invalidArgument("ranges must be 2 x dimension numbers: per-dimension minimums, then maximums");
  }
  return flat;
}

export function toRawOptions(options: EncodeOptions = {}): RawEncodeOptions {
  const precision = toPrecision(options.precision);
  const dimension = options.dimension ?? 0;
  if (!Number.isInteger(dimension) || dimension < 0) {
    throw invalidArgument(`dimension must be an integer >= 0 (0: the model's), got ${dimension}`);
  }
  if (options.prompt !== undefined && options.promptName) {
    throw invalidArgument("set prompt or promptName, not both");
  }
  const ranges = flatRanges(options.ranges);
  if (ranges.length && precision !== "int8" && precision !== "uint8") {
    throw invalidArgument('ranges applies only to precision "int8" or "uint8"');
  }
  const raw: RawEncodeOptions = {
    model: options.model ?? "",
    truncation:
      options.truncate === undefined
        ? "TRUNCATION_UNSPECIFIED"
        : options.truncate
          ? "TRUNCATION_END"
          : "TRUNCATION_REJECT",
    dimension,
    precision: `PRECISION_${precision.toUpperCase()}`,
    promptName: options.promptName ?? "",
    ranges,
  };
  // proto3 `optional bool`: leave it out to get the model's default.
  if (options.normalize !== undefined) raw.normalize = options.normalize;
  // proto3 `optional string` too: unset is the model's default prompt, "" none at all.
  if (options.prompt !== undefined) raw.prompt = options.prompt;
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
