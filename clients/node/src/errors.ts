import { Metadata, status } from "@grpc/grpc-js";
import { RETRYABLE_CODES, retryAfterMs } from "./retry";

/** Names of the gRPC status codes (google.rpc.Code), by number. */
export const STATUS_NAMES: Readonly<Record<number, string>> = Object.freeze(
  Object.fromEntries(
    Object.entries(status)
      .filter(([, value]) => typeof value === "number")
      .map(([name, value]) => [value as number, name]),
  ),
);

/**
 * Every failure of an embedq call: `code` is the gRPC status code
 * (3 = INVALID_ARGUMENT, 5 = NOT_FOUND, 14 = UNAVAILABLE, ...), `details` the
 * server's message (it names the offending field and index), `metadata` the
 * call's trailing metadata, `attempts` how many times the call was sent
 * (more than 1 after retries).
 */
export class EmbedqError extends Error {
  readonly code: number;
  readonly details: string;
  readonly metadata?: Metadata;
  attempts = 1;

  constructor(code: number, details: string, metadata?: Metadata) {
    super(`${STATUS_NAMES[code] ?? "UNKNOWN"} (${code}): ${details}`);
    this.name = "EmbedqError";
    this.code = code;
    this.details = details;
    this.metadata = metadata;
  }

  /** The status name, e.g. "INVALID_ARGUMENT". */
  get codeName(): string {
    return STATUS_NAMES[this.code] ?? "UNKNOWN";
  }

  /** The server's `retry-after-ms` hint (ms), if it sent one. */
  get retryAfterMs(): number | undefined {
    return retryAfterMs(this.metadata);
  }

  /** UNAVAILABLE or RESOURCE_EXHAUSTED: sending the same request later may succeed. */
  get retryable(): boolean {
    return RETRYABLE_CODES.includes(this.code);
  }
}

interface GrpcLikeError {
  code?: unknown;
  details?: unknown;
  metadata?: unknown;
  message?: unknown;
}

/** Turns whatever grpc-js rejected with into an EmbedqError. */
export function toEmbedqError(err: unknown): EmbedqError {
  if (err instanceof EmbedqError) return err;
  const e = (err ?? {}) as GrpcLikeError;
  const code = typeof e.code === "number" ? e.code : status.UNKNOWN;
  const details =
    typeof e.details === "string" && e.details !== ""
      ? e.details
      : typeof e.message === "string"
        ? e.message
        : String(err);
  const metadata = e.metadata instanceof Metadata ? e.metadata : undefined;
  const out = new EmbedqError(code, details, metadata);
  if (err instanceof Error) (out as { cause?: unknown }).cause = err;
  return out;
}

/** A client-side argument error, shaped like the server's INVALID_ARGUMENT. */
export function invalidArgument(details: string): EmbedqError {
  return new EmbedqError(status.INVALID_ARGUMENT, details);
}
