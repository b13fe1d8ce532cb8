import type { TensorMessage } from "./types.js";

/** A decoded tensor: row-major values and their shape. */
export interface Tensor {
  shape: number[];
  data: Float32Array;
}

/** Decode a wire Tensor (dense, little-endian); undefined when the field was not set. */
export function decodeTensor(t: TensorMessage | null | undefined): Tensor | undefined {
  if (!t || t.shape.length === 0) return undefined;
  if (t.dtype !== "float32") {
    throw new Error(`tensor dtype ${t.dtype} is not supported by this client: only float32`);
  }
  const count = t.shape.reduce((a, b) => a * b, 1);
  if (t.data.byteLength !== count * 4) {
    throw new Error(`tensor of shape [${t.shape}] needs ${count * 4} bytes, got ${t.data.byteLength}`);
  }
  // DataView: the Buffer may be unaligned, and the wire is little-endian whatever the host is.
  const view = new DataView(t.data.buffer, t.data.byteOffset, t.data.byteLength);
  const data = new Float32Array(count);
  for (let i = 0; i < count; i++) data[i] = view.getFloat32(i * 4, true);
  return { shape: t.shape.map(Number), data };
}

/** Row `i` of a 2-D tensor. */
export function row(t: Tensor, i: number): Float32Array {
  const width = t.shape[t.shape.length - 1] ?? 0;
  return t.data.subarray(i * width, (i + 1) * width);
}

/** Encode float32 values of `shape` as a wire Tensor (dense, little-endian). */
export function encodeTensor(shape: number[], data: Float32Array): TensorMessage {
  const count = shape.reduce((a, b) => a * b, 1);
  if (data.length !== count) throw new Error(`${data.length} values do not make shape [${shape}]`);
  const buffer = Buffer.alloc(count * 4);
  for (let i = 0; i < count; i++) buffer.writeFloatLE(data[i] ?? 0, i * 4);
  return { shape, dtype: "float32", data: buffer };
}
