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

/**
 * Encode `data` of `shape` as a wire Tensor (dense, little-endian); the dtype follows the array: Float32Array
 * float32, Int32Array int32, BigInt64Array int64, Uint8Array uint8 (token ids, masks, pixels for Infer's `inputs`).
 */
export function encodeTensor(shape: number[], data: Float32Array | Int32Array | BigInt64Array | Uint8Array): TensorMessage {
  const count = shape.reduce((a, b) => a * b, 1);
  if (data.length !== count) throw new Error(`${data.length} values do not make shape [${shape}]`);
  const buffer = Buffer.alloc(count * data.BYTES_PER_ELEMENT);
  const view = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  if (data instanceof BigInt64Array) {
    data.forEach((x, i) => view.setBigInt64(i * 8, x, true));
    return { shape, dtype: "int64", data: buffer };
  }
  if (data instanceof Int32Array) {
    data.forEach((x, i) => view.setInt32(i * 4, x, true));
    return { shape, dtype: "int32", data: buffer };
  }
  if (data instanceof Uint8Array) {
    buffer.set(data);
    return { shape, dtype: "uint8", data: buffer };
  }
  data.forEach((x, i) => view.setFloat32(i * 4, x, true));
  return { shape, dtype: "float32", data: buffer };
}
