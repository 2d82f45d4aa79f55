import { type Metadata, status } from "@grpc/grpc-js";

/**
 * How a call refused with a retryable status (UNAVAILABLE, RESOURCE_EXHAUSTED)
 * is sent again. Attempt n (n >= 2) follows a pause of
 * `min(initialBackoffMs * multiplier ** (n - 2), maxBackoffMs)`, scaled by a
 * random factor in [1 - jitter, 1 + jitter]. A `retry-after-ms` hint in the
 * server's trailing metadata replaces that pause (jitter only lengthens it).
 * The call gives up, rejecting with the last error at once, after
 * `maxAttempts` attempts in all or when the pause would end past its deadline (or less than
 * MIN_ATTEMPT_MS before it).
 *
 * Done here rather than with gRPC's service-config `retryPolicy`, which
 * honours only `grpc-retry-pushback-ms`, not embedq's `retry-after-ms`.
 */
export interface RetryPolicy {
  /** Attempts in all, the first one included (1: no retries). Default 5. */
  maxAttempts: number;
  /** Pause before the first retry, ms. Default 200. */
  initialBackoffMs: number;
  /** Growth of the pause per retry. Default 2. */
  multiplier: number;
  /** Longest pause without a server hint, ms. Default 5000. */
  maxBackoffMs: number;
  /** Random spread of each pause, as a fraction (0..1). Default 0.2 (+-20 %). */
  jitter: number;
  /** gRPC status codes retried. Default UNAVAILABLE (14) and RESOURCE_EXHAUSTED (8). */
  codes: readonly number[];
}

/** Trailing metadata key of the server's hint: ASCII integer milliseconds. */
export const RETRY_AFTER_KEY = "retry-after-ms";
/** A hint past an hour is not believed. */
const MAX_HINT_MS = 3_600_000;

export const RETRYABLE_CODES: readonly number[] = Object.freeze([status.UNAVAILABLE, status.RESOURCE_EXHAUSTED]);

export const DEFAULT_RETRY_POLICY: Readonly<RetryPolicy> = Object.freeze({
  maxAttempts: 5,
  initialBackoffMs: 200,
  multiplier: 2,
  maxBackoffMs: 5000,
  jitter: 0.2,
  codes: RETRYABLE_CODES,
});

export const NO_RETRY: Readonly<RetryPolicy> = Object.freeze({ ...DEFAULT_RETRY_POLICY, maxAttempts: 1 });

/** The policy a client uses: true/undefined the default, false none, else the default with overrides. */
export function toRetryPolicy(retry: Partial<RetryPolicy> | boolean | undefined): Readonly<RetryPolicy> {
  if (retry === undefined || retry === true) return DEFAULT_RETRY_POLICY;
  if (retry === false) return NO_RETRY;
  if (typeof retry !== "object" || retry === null) throw new TypeError("retry must be a boolean or a RetryPolicy");
  const policy: RetryPolicy = { ...DEFAULT_RETRY_POLICY, ...retry };
  if (!Number.isInteger(policy.maxAttempts) || policy.maxAttempts < 1) {
    throw new RangeError("retry.maxAttempts must be an integer >= 1 (1: no retries)");
  }
  if (!(policy.initialBackoffMs >= 0) || !(policy.maxBackoffMs >= 0)) throw new RangeError("retry backoffs must be >= 0");
  if (!(policy.multiplier >= 1)) throw new RangeError("retry.multiplier must be >= 1");
  if (!(policy.jitter >= 0 && policy.jitter <= 1)) throw new RangeError("retry.jitter must be between 0 and 1");
  return Object.freeze({ ...policy, codes: Object.freeze([...policy.codes]) });
}

/** The server's `retry-after-ms` hint in ms, or undefined when absent or malformed. */
export function retryAfterMs(metadata: Metadata | undefined): number | undefined {
  const values = metadata?.get(RETRY_AFTER_KEY) ?? [];
  if (values.length === 0) return undefined;
  const raw = values[0];
  const text = (typeof raw === "string" ? raw : raw.toString("latin1")).trim();
  if (!/^[0-9]+$/.test(text)) return undefined;
  const ms = Number(text);
  return ms <= MAX_HINT_MS ? ms : undefined;
}

/** The failure, as the retry loop needs to see it. */
export interface RetryableFailure {
  code: number;
  details: string;
  metadata?: Metadata;
}

// RESOURCE_EXHAUSTED that grpc raises on this side for an over-sized message.
const LOCAL_SIZE_ERROR = /^(Received|Sent) message larger than max/;

/** Whether a failed call may be sent again under a policy retrying `codes`. */
export function isRetryable(err: RetryableFailure, codes: readonly number[] = RETRYABLE_CODES): boolean {
  if (!codes.includes(err.code)) return false;
  return !(err.code === status.RESOURCE_EXHAUSTED && LOCAL_SIZE_ERROR.test(err.details));
}

/** Pause in ms before attempt `attempt` (2, 3, ...) when the server sent no hint. */
export function backoffMs(policy: RetryPolicy, attempt: number, rand: () => number = Math.random): number {
  const nominal = Math.min(policy.initialBackoffMs * policy.multiplier ** (attempt - 2), policy.maxBackoffMs);
  return nominal * (1 - policy.jitter + 2 * policy.jitter * rand());
}

/** An attempt is not started with less than this many ms left before the call's deadline. */
export const MIN_ATTEMPT_MS = 100;

/**
 * Ms to wait before attempt `attempt` after `err`, or undefined: give up.
 * `remainingMs`: time left until the call's deadline (undefined: none).
 */
export function retryPauseMs(
  policy: RetryPolicy,
  attempt: number,
  err: RetryableFailure,
  remainingMs: number | undefined,
  rand: () => number = Math.random,
): number | undefined {
  if (attempt > policy.maxAttempts || !isRetryable(err, policy.codes)) return undefined;
  const hint = retryAfterMs(err.metadata);
  const pause = hint === undefined ? backoffMs(policy, attempt, rand) : hint * (1 + policy.jitter * rand());
  // The next attempt would start past the deadline, or so close to it that it could only end in
  // DEADLINE_EXCEEDED on a busy machine, hiding the refusal the caller needs to see.
  if (remainingMs !== undefined && pause + MIN_ATTEMPT_MS > remainingMs) return undefined;
  return pause;
}
