export * from "./client.js";
export * from "./errors.js";
export * from "./tensor.js";
export type * from "./types.js";
export { defaultProtoDir, loadMlxdService } from "./proto.js";
