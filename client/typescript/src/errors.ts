/**
 * Typed errors for failed mlxd calls: one class per gRPC status code a caller may want to catch, carrying the
 * `google.rpc.ErrorInfo` reason and metadata the daemon attaches (domain "mlxd").
 *
 * MlxdError                  any failed RPC; .code (status name), .reason, .metadata, .details
 * ├── NotFoundError          NOT_FOUND (SOURCE_NOT_FOUND, MODEL_NOT_FOUND, JOB_NOT_FOUND)
 * ├── InvalidArgumentError   INVALID_ARGUMENT (BAD_CONFIG, RELATIVE_PATH, ...)
 * ├── FailedPreconditionError FAILED_PRECONDITION (OUTPUT_EXISTS, ...)
 * │   └── ProtocolMismatchError  PROTOCOL_MISMATCH, or a daemon answering another protocol version
 * ├── UnsupportedError       UNIMPLEMENTED (UNSUPPORTED_ARCHITECTURE, UNSUPPORTED_QUANT_MODE)
 * ├── ResourceExhaustedError RESOURCE_EXHAUSTED (QUEUE_FULL with metadata.retry_after_s, MODEL_TOO_LARGE)
 * ├── PermissionDeniedError  PERMISSION_DENIED (PATH_NOT_ALLOWED)
 * ├── UnauthenticatedError   UNAUTHENTICATED (BAD_TOKEN: TCP without the daemon's token)
 * ├── CancelledError         CANCELLED, DEADLINE_EXCEEDED
 * ├── AbortedError           ABORTED (DAEMON_RESTART)
 * └── UnavailableError       UNAVAILABLE (no daemon at the address, WORKER_CRASHED)
 */
import { Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";
import protobuf from "protobufjs";

export const ERROR_DOMAIN = "mlxd";

export class MlxdError extends Error {
  /** gRPC status code name, e.g. "NOT_FOUND". */
  readonly code: string;
  /** Numeric gRPC status code. */
  readonly grpcCode: number;
  /** The daemon's ErrorInfo reason, e.g. "SOURCE_NOT_FOUND" ("" when the status carried none). */
  readonly reason: string;
  readonly metadata: Record<string, string>;
  /** The status message alone, without the code and reason suffix. */
  readonly details: string;

  constructor(grpcCode: number, details: string, reason = "", metadata: Record<string, string> = {}) {
    const code = Status[grpcCode] ?? "UNKNOWN";
    super(`${details} [${code}${reason ? ` ${reason}` : ""}]`);
    this.name = new.target.name;
    this.code = code;
    this.grpcCode = grpcCode;
    this.reason = reason;
    this.metadata = metadata;
    this.details = details;
  }

  toJSON(): { code: string; reason: string; message: string; metadata: Record<string, string> } {
    return { code: this.code, reason: this.reason, message: this.details, metadata: this.metadata };
  }
}

export class NotFoundError extends MlxdError {}
export class InvalidArgumentError extends MlxdError {}
export class FailedPreconditionError extends MlxdError {}
export class ProtocolMismatchError extends FailedPreconditionError {}
export class UnsupportedError extends MlxdError {}
export class ResourceExhaustedError extends MlxdError {}
export class PermissionDeniedError extends MlxdError {}
export class UnauthenticatedError extends MlxdError {}
export class CancelledError extends MlxdError {}
export class AbortedError extends MlxdError {}
export class UnavailableError extends MlxdError {}

const BY_CODE: Partial<Record<number, new (...args: ConstructorParameters<typeof MlxdError>) => MlxdError>> = {
  [Status.NOT_FOUND]: NotFoundError,
  [Status.INVALID_ARGUMENT]: InvalidArgumentError,
  [Status.FAILED_PRECONDITION]: FailedPreconditionError,
  [Status.UNIMPLEMENTED]: UnsupportedError,
  [Status.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [Status.PERMISSION_DENIED]: PermissionDeniedError,
  [Status.UNAUTHENTICATED]: UnauthenticatedError,
  [Status.CANCELLED]: CancelledError,
  [Status.DEADLINE_EXCEEDED]: CancelledError,
  [Status.ABORTED]: AbortedError,
  [Status.UNAVAILABLE]: UnavailableError,
};

// google/rpc/status.proto and error_details.proto are not vendored: only these fields are read, so they are
// declared here (same field numbers, so the wire format is the published one).
const RPC = protobuf.Root.fromJSON(<protobuf.INamespace>{
  nested: {
    google: {
      nested: {
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "Any", id: 3 },
              },
            },
            Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
          },
        },
      },
    },
  },
});
const STATUS = RPC.lookupType("google.rpc.Status");
const ERROR_INFO = RPC.lookupType("google.rpc.ErrorInfo");
const ERROR_INFO_URL = "type.googleapis.com/google.rpc.ErrorInfo";

export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

/** The ErrorInfo detail of a `grpc-status-details-bin` trailer, or undefined when there is none. */
export function decodeErrorInfo(statusDetails: Uint8Array): ErrorInfo | undefined {
  const status = STATUS.toObject(STATUS.decode(statusDetails), { defaults: true }) as {
    details: { type_url: string; value: Uint8Array }[];
  };
  const any = status.details.find((d) => d.type_url === ERROR_INFO_URL);
  if (!any) return undefined;
  return ERROR_INFO.toObject(ERROR_INFO.decode(any.value), { defaults: true, objects: true }) as ErrorInfo;
}

function isServiceError(err: unknown): err is ServiceError {
  return err instanceof Error && typeof (err as Partial<ServiceError>).code === "number";
}

/** The typed error for a failed call; anything that is not a gRPC error is returned unchanged. */
export function fromServiceError(err: unknown): unknown {
  if (err instanceof MlxdError || !isServiceError(err)) return err;
  let info: ErrorInfo | undefined;
  const raw = err.metadata instanceof Metadata ? err.metadata.get("grpc-status-details-bin")[0] : undefined;
  if (raw instanceof Uint8Array) {
    try {
      info = decodeErrorInfo(raw);
    } catch {
      // A malformed detail must not hide the status itself.
    }
  }
  const cls = BY_CODE[err.code] ?? MlxdError;
  const typed =
    info?.reason === "PROTOCOL_MISMATCH"
      ? new ProtocolMismatchError(err.code, err.details, info.reason, info.metadata)
      : new cls(err.code, err.details, info?.reason ?? "", info?.metadata ?? {});
  typed.cause = err;
  return typed;
}
