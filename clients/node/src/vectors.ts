import { endianness } from "node:os";
import { status } from "@grpc/grpc-js";
import { EmbedqError } from "./errors";

const LITTLE_ENDIAN_HOST = endianness() === "LE";

/** A packed row-major float32 matrix: `count` rows of `dimension` values. */
export interface Matrix {
  count: number;
  dimension: number;
  /** `count * dimension` values, row i at `[i * dimension, (i + 1) * dimension)`. */
  data: Float32Array;
}

function isFloat32(dtype: unknown): boolean {
  return dtype === "DTYPE_FLOAT32" || dtype === 1;
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
  if (!isFloat32(dtype)) {
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
    return new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + values * 4));
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(values);
  for (let i = 0; i < values; i++) out[i] = view.getFloat32(i * 4, true);
  return out;
}

/** Row views (no copies) over a matrix's data. */
export function rows(matrix: Matrix): Float32Array[] {
  const out: Float32Array[] = new Array(matrix.count);
  for (let i = 0; i < matrix.count; i++) {
    out[i] = matrix.data.subarray(i * matrix.dimension, (i + 1) * matrix.dimension);
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
