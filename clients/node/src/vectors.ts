import { endianness } from "node:os";
import { status } from "@grpc/grpc-js";
import { EmbedqError } from "./errors";

const LITTLE_ENDIAN_HOST = endianness() === "LE";

/**
 * Element type of returned vectors (the request's `precision`, the response's
 * `dtype`), with sentence-transformers' `quantize_embeddings` names.
 */
export type Precision = "float32" | "float16" | "int8" | "uint8" | "binary" | "ubinary";

/** Precision names the client accepts. */
export const PRECISIONS: readonly Precision[] = ["float32", "float16", "int8", "uint8", "binary", "ubinary"];

/**
 * The typed array a precision's rows come in: Float32Array; float16 as raw
 * IEEE-754 half bits in a Uint16Array (see {@link float16ToFloat32}); Int8Array
 * for int8 and binary (packed bits minus 128); Uint8Array for uint8 and ubinary
 * (packed bits, big-endian bit order, ceil(dimension / 8) bytes a row).
 */
export type VectorOf<P extends Precision> = P extends "float32"
  ? Float32Array
  : P extends "float16"
    ? Uint16Array
    : P extends "int8" | "binary"
      ? Int8Array
      : Uint8Array;

/** Any row type the client returns. */
export type Vector = Float32Array | Uint16Array | Int8Array | Uint8Array;

/** A packed row-major matrix: `count` rows of `dimension` values. */
export interface Matrix<V extends Vector = Float32Array> {
  count: number;
  /** Logical values per vector (for binary/ubinary rows: bits, 8 to a byte). */
  dimension: number;
  /**
   * All rows back to back, row i at `[i * width, (i + 1) * width)` where width is
   * `dimension`, or ceil(dimension / 8) for binary/ubinary.
   */
  data: V;
}

const DTYPES: Record<string, Precision> = {
  DTYPE_UNSPECIFIED: "float32", // an older server that leaves it unset sends float32
  DTYPE_FLOAT32: "float32",
  DTYPE_FLOAT16: "float16",
  DTYPE_INT8: "int8",
  DTYPE_UINT8: "uint8",
  DTYPE_BINARY: "binary",
  DTYPE_UBINARY: "ubinary",
};
const DTYPE_NUMBERS = Object.keys(DTYPES);

/** The precision name of a response's `dtype` (enum name or number). */
export function dtypeName(dtype: unknown): Precision {
  const key = typeof dtype === "number" ? DTYPE_NUMBERS[dtype] : dtype;
  const name = typeof key === "string" ? DTYPES[key] : undefined;
  if (!name) throw new EmbedqError(status.INTERNAL, `unsupported embeddings dtype ${String(dtype)}`);
  return name;
}

/** Elements per row: `dimension`, or ceil(dimension / 8) bytes of packed bits. */
export function rowWidth(precision: Precision, dimension: number): number {
  return precision === "binary" || precision === "ubinary" ? Math.ceil(dimension / 8) : dimension;
}

const BYTES: Record<Precision, number> = { float32: 4, float16: 2, int8: 1, uint8: 1, binary: 1, ubinary: 1 };

/** An aligned copy of `length` bytes (a fresh ArrayBuffer starting at offset 0). */
function copyBytes(bytes: Uint8Array, length: number): ArrayBuffer {
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + length) as ArrayBuffer;
}

/**
 * Turns the packed little-endian `embeddings` bytes of a response into a typed
 * array of the response's dtype (see {@link VectorOf}) that owns its aligned
 * memory: one bulk copy, no per-value parsing on little-endian hosts.
 */
export function unpackVectors(bytes: Uint8Array, count: number, dimension: number, dtype: unknown): Vector {
  const precision = dtypeName(dtype);
  const values = count * rowWidth(precision, dimension);
  const size = values * BYTES[precision];
  if (bytes.byteLength !== size) {
    throw new EmbedqError(
      status.INTERNAL,
      `embeddings has ${bytes.byteLength} bytes; expected ${count} x ${dimension} ${precision} = ${size}`,
    );
  }
  switch (precision) {
    case "float32":
      return unpackFloat32(bytes, count, dimension);
    case "float16": {
      if (LITTLE_ENDIAN_HOST) return new Uint16Array(copyBytes(bytes, size));
      const view = new DataView(bytes.buffer, bytes.byteOffset, size);
      const out = new Uint16Array(values);
      for (let i = 0; i < values; i++) out[i] = view.getUint16(i * 2, true);
      return out;
    }
    case "int8":
    case "binary":
      return new Int8Array(copyBytes(bytes, size));
    default:
      return new Uint8Array(copyBytes(bytes, size));
  }
}

/**
 * Turns the packed little-endian float32 `embeddings` bytes of a response into
 * a Float32Array that owns its (4-byte aligned) memory: one bulk copy, no
 * per-float parsing on little-endian hosts.
 */
export function unpackFloat32(
  bytes: Uint8Array,
  count: number,
  dimension: number,
  dtype: unknown = "DTYPE_FLOAT32",
): Float32Array {
  const values = count * dimension;
  if (values === 0) return new Float32Array(0);
  if (dtype !== "DTYPE_FLOAT32" && dtype !== 1) {
    throw new EmbedqError(status.INTERNAL, `unsupported embeddings dtype ${String(dtype)}`);
  }
  if (bytes.byteLength !== values * 4) {
    throw new EmbedqError(
      status.INTERNAL,
      `embeddings has ${bytes.byteLength} bytes; expected ${count} x ${dimension} float32 = ${values * 4}`,
    );
  }
  if (LITTLE_ENDIAN_HOST) {
    // ArrayBuffer.slice copies into a fresh buffer starting at offset 0, which
    // is aligned for Float32Array whatever the Buffer's byteOffset was.
    return new Float32Array(copyBytes(bytes, values * 4));
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(values);
  for (let i = 0; i < values; i++) out[i] = view.getFloat32(i * 4, true);
  return out;
}

/** Row views (no copies) over a matrix's data (`data.length / count` values each). */
export function rows<V extends Vector>(matrix: Matrix<V>): V[] {
  const out: V[] = new Array(matrix.count);
  const width = matrix.count ? matrix.data.length / matrix.count : 0;
  for (let i = 0; i < matrix.count; i++) {
    out[i] = matrix.data.subarray(i * width, (i + 1) * width) as V;
  }
  return out;
}

/** Packs vectors as little-endian float32 bytes (the wire and cache format). */
export function packFloat32(vectors: ArrayLike<number>[] | Float32Array): Buffer {
  const flat =
    vectors instanceof Float32Array
      ? vectors
      : Float32Array.from((vectors as ArrayLike<number>[]).flatMap((v) => Array.from(v)));
  const out = Buffer.alloc(flat.length * 4);
  for (let i = 0; i < flat.length; i++) out.writeFloatLE(flat[i], i * 4);
  return out;
}

/** IEEE-754 half-precision bits (as float16 vectors come) to float32 values, exactly. */
export function float16ToFloat32(halves: Uint16Array): Float32Array {
  const out = new Float32Array(halves.length);
  for (let i = 0; i < halves.length; i++) {
    const h = halves[i];
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >> 10) & 0x1f;
    const fraction = h & 0x3ff;
    if (exponent === 0) out[i] = sign * fraction * 2 ** -24;
    else if (exponent === 31) out[i] = fraction ? NaN : sign * Infinity;
    else out[i] = sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
  }
  return out;
}

/**
 * INT8/UINT8 codes of float32 rows (`dimension` values each) for per-dimension
 * ranges, with sentence-transformers' `quantize_embeddings` formula in float32
 * arithmetic (`Math.fround` after every operation), so the codes are byte for
 * byte what the server sends: `floor((v - min) / ((max - min) / 255))`,
 * clipped to 0..255, minus 128 for int8.
 */
export function quantizeInt8(
  vectors: Float32Array,
  dimension: number,
  minimums: ArrayLike<number>,
  maximums: ArrayLike<number>,
  precision: "int8" | "uint8",
): Int8Array | Uint8Array {
  const f = Math.fround;
  const starts = Float32Array.from(minimums);
  const steps = new Float32Array(dimension);
  for (let j = 0; j < dimension; j++) {
    const step = f(f(f(maximums[j]) - starts[j]) / 255);
    steps[j] = step === 0 ? 1 : step;
  }
  const out = precision === "uint8" ? new Uint8Array(vectors.length) : new Int8Array(vectors.length);
  const shift = precision === "uint8" ? 0 : 128;
  for (let i = 0; i < vectors.length; i++) {
    const j = i % dimension;
    const code = Math.floor(f(f(vectors[i] - starts[j]) / steps[j]));
    out[i] = Math.min(255, Math.max(0, code)) - shift;
  }
  return out;
}

/**
 * {@link quantizeInt8} calibrated on the rows themselves (per-dimension minimum
 * and maximum over them), as the server and `quantize_embeddings` without
 * ranges do for one batch. Needs at least 2 rows.
 */
export function quantizeCalibrated(
  vectors: Float32Array,
  dimension: number,
  precision: "int8" | "uint8",
): Int8Array | Uint8Array {
  const count = dimension ? vectors.length / dimension : 0;
  if (count < 2) {
    throw new EmbedqError(
      status.INVALID_ARGUMENT,
      "int8/uint8 without ranges calibrates on the vectors themselves and needs at least 2: pass ranges",
    );
  }
  const minimums = new Float32Array(dimension).fill(Infinity);
  const maximums = new Float32Array(dimension).fill(-Infinity);
  for (let i = 0; i < vectors.length; i++) {
    const j = i % dimension;
    if (vectors[i] < minimums[j]) minimums[j] = vectors[i];
    if (vectors[i] > maximums[j]) maximums[j] = vectors[i];
  }
  return quantizeInt8(vectors, dimension, minimums, maximums, precision);
}
