// Loads mlxd.v1 from the .proto at runtime (no generated code): @grpc/proto-loader builds the service
// definition, and src/types.ts declares the decoded message shapes.
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

/** How messages are decoded: the shapes src/types.ts declares. */
export const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false, // camelCase field names
  longs: Number, // uint64 sizes and counts fit a double (< 2^53)
  enums: String, // enum values as their names, e.g. "KIND_BEGIN"
  bytes: Buffer,
  defaults: true,
  arrays: true,
  objects: true,
  oneofs: true,
};

/**
 * The directory holding `mlxd/v1/mlxd.proto`: `$MLXD_PROTO_DIR`, else the repository's `proto/` (this file
 * runs from client/typescript/dist/src/). An extension that bundles the client ships the proto beside it.
 */
export function defaultProtoDir(): string {
  if (process.env.MLXD_PROTO_DIR) return process.env.MLXD_PROTO_DIR;
  return fileURLToPath(new URL("../../../../proto/", import.meta.url));
}

export type MlxdStubConstructor = grpc.ServiceClientConstructor;

const cache = new Map<string, MlxdStubConstructor>();

/** The generic grpc-js client class for `mlxd.v1.Mlxd`, loaded once per proto directory. */
export function loadMlxdService(protoDir = defaultProtoDir()): MlxdStubConstructor {
  const cached = cache.get(protoDir);
  if (cached) return cached;
  const file = path.join(protoDir, "mlxd", "v1", "mlxd.proto");
  if (!existsSync(file)) {
    throw new Error(`mlxd.proto not found at ${file}: set MLXD_PROTO_DIR or pass protoDir`);
  }
  const definition = protoLoader.loadSync("mlxd/v1/mlxd.proto", { ...LOADER_OPTIONS, includeDirs: [protoDir] });
  const pkg = grpc.loadPackageDefinition(definition) as unknown as {
    mlxd: { v1: { Mlxd: MlxdStubConstructor } };
  };
  const ctor = pkg.mlxd.v1.Mlxd;
  cache.set(protoDir, ctor);
  return ctor;
}
