// Pieces that need no daemon: error decoding, tensor decoding, progress increments, the VS Code adapter.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { Metadata, status } from "@grpc/grpc-js";
import protobuf from "protobufjs";
import {
  decodeTensor,
  encodeTensor,
  FailedPreconditionError,
  fromServiceError,
  MlxdError,
  NotFoundError,
  ProtocolMismatchError,
  ResourceExhaustedError,
  type Progress,
} from "../src/index.js";
import { BROWSE, COMMANDS, commandTable, pickSource, type ClientProvider, type Ui } from "../src/extension/commands.js";
import type { MlxdClient } from "../src/client.js";
import type { ListCachedModelsResponse } from "../src/types.js";
import { ProgressIncrements } from "../src/extension/progress.js";
import { activateWith, deactivate, vscodeUi, type VscodeApi } from "../src/extension/vscode.js";

/** google.rpc.Status{code, message, details: [Any(ErrorInfo{reason, domain "mlxd", metadata})]}, encoded by hand. */
function statusDetails(code: number, reason: string, metadata: Record<string, string>): Buffer {
  const info = protobuf.Writer.create().uint32((1 << 3) | 2).string(reason).uint32((2 << 3) | 2).string("mlxd");
  for (const [k, v] of Object.entries(metadata)) {
    const entry = protobuf.Writer.create().uint32((1 << 3) | 2).string(k).uint32((2 << 3) | 2).string(v).finish();
    info.uint32((3 << 3) | 2).bytes(entry);
  }
  const any = protobuf.Writer.create()
    .uint32((1 << 3) | 2)
    .string("type.googleapis.com/google.rpc.ErrorInfo")
    .uint32((2 << 3) | 2)
    .bytes(info.finish())
    .finish();
  const st = protobuf.Writer.create().uint32(1 << 3).int32(code).uint32((2 << 3) | 2).string("msg");
  return Buffer.from(st.uint32((3 << 3) | 2).bytes(any).finish());
}

function serviceError(code: number, details: string, trailer?: Buffer): Error {
  const metadata = new Metadata();
  if (trailer) metadata.set("grpc-status-details-bin", trailer);
  return Object.assign(new Error(`${code} ${details}`), { code, details, metadata });
}

describe("fromServiceError", () => {
  it("maps the status code to its class and reads reason and metadata from ErrorInfo", () => {
    const trailer = statusDetails(status.RESOURCE_EXHAUSTED, "QUEUE_FULL", { retry_after_s: "5" });
    const err = fromServiceError(serviceError(status.RESOURCE_EXHAUSTED, "queue full", trailer));
    assert.ok(err instanceof ResourceExhaustedError);
    assert.equal(err.code, "RESOURCE_EXHAUSTED");
    assert.equal(err.reason, "QUEUE_FULL");
    assert.deepEqual(err.metadata, { retry_after_s: "5" });
    assert.equal(err.message, "queue full [RESOURCE_EXHAUSTED QUEUE_FULL]");
    assert.deepEqual(err.toJSON(), {
      code: "RESOURCE_EXHAUSTED",
      reason: "QUEUE_FULL",
      message: "queue full",
      metadata: { retry_after_s: "5" },
    });
  });

  it("gives PROTOCOL_MISMATCH its own FailedPreconditionError subclass", () => {
    const trailer = statusDetails(status.FAILED_PRECONDITION, "PROTOCOL_MISMATCH", {});
    const err = fromServiceError(serviceError(status.FAILED_PRECONDITION, "old daemon", trailer));
    assert.ok(err instanceof ProtocolMismatchError && err instanceof FailedPreconditionError);
  });

  it("keeps the status when there is no detail or it is malformed", () => {
    const bare = fromServiceError(serviceError(status.NOT_FOUND, "gone"));
    assert.ok(bare instanceof NotFoundError);
    assert.equal(bare.reason, "");
    const bad = fromServiceError(serviceError(status.INTERNAL, "boom", Buffer.from([0xff, 0xff])));
    assert.ok(bad instanceof MlxdError);
    assert.equal(bad.code, "INTERNAL");
  });

  it("returns anything that is not a gRPC error unchanged", () => {
    const plain = new TypeError("nope");
    assert.equal(fromServiceError(plain), plain);
  });
});

describe("decodeTensor", () => {
  it("decodes little-endian float32 from an unaligned buffer", () => {
    const values = new Float32Array([1.5, -2, 3.25, 0, 1e-8, 7]);
    const unaligned = Buffer.concat([Buffer.from([0]), Buffer.from(values.buffer)]).subarray(1);
    const t = decodeTensor({ shape: [2, 3], dtype: "float32", data: unaligned });
    assert.deepEqual(t?.shape, [2, 3]);
    assert.deepEqual(Array.from(t!.data), Array.from(values));
  });

  it("is undefined for an unset tensor and refuses a size mismatch or another dtype", () => {
    assert.equal(decodeTensor(null), undefined);
    assert.throws(() => decodeTensor({ shape: [2], dtype: "float32", data: Buffer.alloc(4) }), /needs 8 bytes/);
    assert.throws(() => decodeTensor({ shape: [1], dtype: "float16", data: Buffer.alloc(2) }), /float16/);
  });
});

describe("encodeTensor", () => {
  it("writes little-endian values with the typed array's dtype", () => {
    const int64 = encodeTensor([2], new BigInt64Array([1n, -2n]));
    assert.equal(int64.dtype, "int64");
    assert.deepEqual([...int64.data], [1, 0, 0, 0, 0, 0, 0, 0, 254, 255, 255, 255, 255, 255, 255, 255]);
    assert.deepEqual([...encodeTensor([1], new Int32Array([258])).data], [2, 1, 0, 0]);
    assert.deepEqual(encodeTensor([1, 2], new Uint8Array([7, 255])), { shape: [1, 2], dtype: "uint8", data: Buffer.from([7, 255]) });
    const float32 = encodeTensor([2], new Float32Array([1.5, -2]));
    assert.deepEqual(Array.from(decodeTensor(float32)!.data), [1.5, -2]);
    assert.throws(() => encodeTensor([3], new Uint8Array(2)), /do not make shape/);
  });
});

function progress(kind: Progress["kind"], stage: string, itemsDone: number, itemsTotal: number): Progress {
  return { kind, jobId: "j", stage, itemsDone, itemsTotal, bytesDone: 0, bytesTotal: 0, message: "", seq: 0 };
}

describe("ProgressIncrements", () => {
  it("spreads a validate job's three stages over 100% by their weights, never going back", () => {
    const bar = new ProgressIncrements("validate");
    const events = [
      progress("KIND_BEGIN", "queued", 0, 0),
      progress("KIND_BEGIN", "mlx", 0, 1),
      progress("KIND_END", "mlx", 1, 1),
      progress("KIND_BEGIN", "reference", 0, 1),
      progress("KIND_END", "reference", 1, 1),
      progress("KIND_BEGIN", "compare", 0, 4),
      progress("KIND_REPORT", "compare", 2, 4),
      progress("KIND_END", "compare", 4, 4),
    ];
    const increments = events.map((e) => bar.step(e).increment ?? 0);
    assert.deepEqual(increments, [0, 0, 25, 0, 50, 0, 12.5, 12.5]);
    assert.equal(bar.percent, 100);
  });

  it("describes an event for the progress bar's message", () => {
    assert.equal(new ProgressIncrements("convert").step(progress("KIND_REPORT", "convert", 3, 78)).message, "convert 3/78");
  });
});

/** A VS Code stand-in recording registrations and progress options. */
function fakeVscode(cancel: boolean) {
  const registered = new Map<string, () => unknown>();
  const progressOptions: unknown[] = [];
  const api: VscodeApi = {
    window: {
      withProgress: async (options, task) => {
        progressOptions.push(options);
        const token = {
          isCancellationRequested: cancel,
          onCancellationRequested: (listener: () => unknown) => {
            if (cancel) queueMicrotask(() => listener());
            return { dispose: () => undefined };
          },
        };
        return task({ report: () => undefined }, token);
      },
      showOpenDialog: async () => [{ fsPath: "/models/clip" }],
      showInputBox: async (o) => o.value,
      showQuickPick: async (items) => items[0],
      showWarningMessage: async (_m, _o, ...items) => items[0],
      showInformationMessage: async () => undefined,
      showErrorMessage: async () => undefined,
    },
    commands: {
      registerCommand: (id, fn) => {
        registered.set(id, fn);
        return { dispose: () => registered.delete(id) };
      },
    },
    workspace: { getConfiguration: () => ({ get: () => undefined }) },
    ProgressLocation: { Notification: 15 },
  };
  return { api, registered, progressOptions };
}

describe("VS Code adapter", () => {
  it("contributes exactly the commands it registers, titled for the command palette", () => {
    const manifest = JSON.parse(readFileSync(new URL("../../extension/package.json", import.meta.url), "utf8"));
    const contributed = manifest.contributes.commands as { command: string; category: string; title: string }[];
    const titles = Object.fromEntries(contributed.map((c) => [c.command, `${c.category}: ${c.title}`]));
    assert.equal(titles[COMMANDS.convertModel], "MLX: Convert model…");
    assert.equal(titles[COMMANDS.validateModel], "MLX: Validate model");
    const table = commandTable({} as Ui, async () => assert.fail("no call expected"));
    assert.deepEqual(Object.keys(titles).sort(), Object.keys(table).sort());

    const { api, registered } = fakeVscode(false);
    const context = { subscriptions: [] as { dispose(): unknown }[] };
    activateWith(api, context); // connects lazily: no daemon needed here
    assert.deepEqual([...registered.keys()].sort(), Object.keys(titles).sort());
    assert.equal(context.subscriptions.length, registered.size);
    deactivate();
  });

  it("shows progress as a cancellable notification and turns cancellation into an aborted signal", async () => {
    const { api, progressOptions } = fakeVscode(true);
    const ui = vscodeUi(api);
    const aborted = await ui.showProgress("Converting", async (_report, signal) => {
      await new Promise((r) => setTimeout(r, 10));
      return signal.aborted;
    });
    assert.equal(aborted, true);
    assert.deepEqual(progressOptions, [{ location: 15, title: "Converting", cancellable: true }]);
    assert.equal(await ui.pickFolder("x"), "/models/clip");
    assert.equal(await ui.pickOne("x", ["a/b@main", "c/d@main"]), "a/b@main");
    assert.equal(await ui.confirm("replace?", "Replace"), true);
  });
});

describe("Convert model… source picker", () => {
  /** A provider whose client answers only ListCachedModels (the picker's one call), as the daemon would. */
  const listing = (models: Partial<ListCachedModelsResponse["models"][number]>[], offline = true): ClientProvider =>
    async () =>
      ({
        listCachedModels: async () => ({
          cacheDir: "/hf",
          offline,
          models: models.map((m) => ({
            repoId: "", refs: [], commitHash: "c0ffee", snapshotPath: "", modelType: "bert",
            support: "native", sizeOnDisk: 0, complete: true, ...m,
          })),
        }),
      }) as unknown as MlxdClient;
  const ui = (pick: (items: string[]) => string | undefined) => {
    const seen: string[][] = [];
    const u = {
      pickOne: async (_t: string, items: string[]) => (seen.push(items), pick(items)),
      pickFolder: async () => "/models/folder",
    } as unknown as Ui;
    return { u, seen };
  };

  it("offers convertible cached models as hub ids, then a folder dialog", async () => {
    const { u, seen } = ui((items) => items[0]);
    const models = [
      { repoId: "acme/bert", refs: ["main"] },
      { repoId: "acme/net", refs: ["main"], support: "" },
      { repoId: "acme/partial", refs: ["main"], complete: false },
    ];
    assert.equal(await pickSource(u, listing(models)), "acme/bert@main");
    assert.deepEqual(seen, [["acme/bert@main", BROWSE]]);
  });

  it("goes straight to the folder dialog when nothing cached converts, or on Browse", async () => {
    assert.equal(await pickSource(ui(() => assert.fail("no list")).u, listing([{ support: "" }])), "/models/folder");
    assert.equal(await pickSource(ui(() => BROWSE).u, listing([{ repoId: "acme/bert" }])), "/models/folder");
  });
});
