// The client and the extension commands against a live daemon on a temporary unix socket.
// Tests in a describe run in order: later ones use the model the convert test wrote.
import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import * as path from "node:path";
import { after, before, describe, it } from "node:test";
import {
  CancelledError,
  FailedPreconditionError,
  InvalidArgumentError,
  MlxdClient,
  MlxdError,
  NotFoundError,
  ProtocolMismatchError,
  UnsupportedError,
  type ConvertResult,
  type Progress,
} from "../src/index.js";
import { convertModel, inferModel, lazyClient, validateModel, type ProgressStep, type Ui } from "../src/extension/commands.js";
import { Daemon, makeFixtures, norm, removeDir, tempDir } from "./helpers.js";
import { encodeTensor, row } from "../src/tensor.js";

let root: string;
let daemon: Daemon;
let hf: string;
let images: string[];
let client: MlxdClient;

before(async () => {
  root = tempDir();
  let fixtures: Awaited<ReturnType<typeof makeFixtures>>;
  [daemon, fixtures] = await Promise.all([Daemon.start(root), makeFixtures(root)]);
  ({ clip: hf, images } = fixtures);
  client = await MlxdClient.connect(daemon.address);
});

after(async () => {
  client?.close();
  if (daemon) assert.equal(await daemon.stop(), 0, "the daemon drains and exits 0 on SIGTERM");
  removeDir(root);
});

/** Assert `promise` rejects with an instance of `cls` carrying `reason`; return the error. */
async function rejectsWith<E extends MlxdError>(promise: Promise<unknown>, cls: new (...a: never[]) => E, reason: string) {
  const err = await promise.then(
    () => assert.fail(`expected ${cls.name} ${reason}`),
    (e: unknown) => e,
  );
  assert.ok(err instanceof cls, `expected ${cls.name}, got ${err}`);
  assert.equal(err.reason, reason);
  return err;
}

describe("MlxdClient", () => {
  let mlx: string;
  let converted: ConvertResult;
  const events: Progress[] = [];

  it("does the Initialize handshake", async () => {
    const info = await client.initialize();
    assert.equal(info.protocolVersion, 1);
    assert.ok(info.capabilities?.architectures.includes("clip"));
    assert.ok(info.capabilities?.dtypes.includes("DTYPE_BFLOAT16"));
    assert.equal(info.address, daemon.address);
  });

  it("rejects another protocol version with ProtocolMismatchError", async () => {
    const other = new MlxdClient(daemon.address, { protocolVersion: 99 });
    try {
      const err = await rejectsWith(other.initialize(), ProtocolMismatchError, "PROTOCOL_MISMATCH");
      assert.ok(err instanceof FailedPreconditionError);
      assert.equal(err.code, "FAILED_PRECONDITION");
      assert.equal(err.metadata.daemon_protocol, "1");
    } finally {
      other.close();
    }
  });

  it("converts with progress events in order, then returns the result", async () => {
    mlx = path.join(root, "mlx-clip");
    converted = await client.convert(hf, mlx, {}, (p) => events.push(p));
    assert.deepEqual(
      events.map((e) => e.seq),
      events.map((_, i) => i),
      "seq counts from 0 without gaps",
    );
    assert.equal(events[0]?.kind, "KIND_BEGIN");
    const last = events.at(-1)!;
    assert.equal(last.kind, "KIND_END");
    assert.equal(last.stage, "convert");
    assert.ok(last.itemsTotal > 0);
    assert.equal(last.itemsDone, last.itemsTotal);
    const stage = events.filter((e) => e.stage === "convert");
    assert.equal(stage[0]?.kind, "KIND_BEGIN");
    stage.slice(1).forEach((e, i) => assert.ok(e.itemsDone >= stage[i]!.itemsDone, "items_done never goes back"));
    assert.ok(events.every((e) => e.jobId === converted.jobId));

    assert.equal(converted.dst, mlx);
    assert.equal(converted.modelType, "clip");
    assert.equal(converted.dtype, "DTYPE_FLOAT32");
    assert.equal(converted.numTensors, last.itemsTotal);
    assert.ok(converted.numParameters > 0);
    assert.equal(converted.shards.reduce((s, x) => s + x.bytes, 0), converted.totalBytes);
    assert.ok(converted.copiedFiles.includes("tokenizer.json"));
    assert.equal(converted.quantization, null);
    assert.equal(converted.dryRun, false);
  });

  it("streams the same events as an async iterator (dry run)", async () => {
    const kinds: string[] = [];
    let result: ConvertResult | undefined;
    for await (const event of client.convertEvents(hf, path.join(root, "never-written"), { dryRun: true })) {
      if (event.progress) kinds.push(event.progress.kind);
      else result = event.result;
    }
    assert.equal(kinds[0], "KIND_BEGIN");
    assert.equal(result?.dryRun, true);
    assert.equal(result?.numTensors, converted.numTensors);
  });

  it("lists the job and replays its events with watchJob from a sequence number", async () => {
    const jobs = await client.listJobs();
    const job = jobs.find((j) => j.jobId === converted.jobId);
    assert.equal(job?.state, "JOB_STATE_SUCCEEDED");
    assert.equal(job?.kind, "convert");
    assert.equal(job?.events, events.length);
    const replayed: Progress[] = [];
    const result = await client.watchJob(converted.jobId, 2, (p) => replayed.push(p));
    assert.deepEqual(replayed, events.slice(2));
    assert.equal((result as ConvertResult).jobId, converted.jobId);
    const got = await client.getJob(converted.jobId);
    assert.equal(got.convertResult?.numTensors, converted.numTensors);
  });

  it("cancelJob says false for a finished job and NOT_FOUND for an unknown one", async () => {
    assert.equal(await client.cancelJob(converted.jobId), false);
    await rejectsWith(client.cancelJob("convert-0-nope"), NotFoundError, "JOB_NOT_FOUND");
  });

  it("validates the converted model against the checkpoint", async () => {
    const stages: string[] = [];
    const report = await client.validate(mlx, hf, {}, (p) => {
      if (p.kind === "KIND_BEGIN") stages.push(p.stage);
    });
    assert.equal(report.passed, true, JSON.stringify(report.outputs));
    assert.deepEqual(stages, ["queued", "mlx", "reference", "compare"]);
    assert.equal(report.modelType, "clip");
    const names = report.outputs.map((o) => o.name);
    for (const name of ["text_embeds", "image_embeds", "logits_per_image"]) assert.ok(names.includes(name), name);
    assert.ok(report.outputs.every((o) => o.passed && o.cosine > 0.999));
  });

  it("infers unit-norm embeddings of the right shapes from texts and PNG images", async () => {
    const texts = ["a red square", "static noise", "a cat"];
    const out = await client.infer(mlx, { texts, images: images.map((p) => readFileSync(p)) });
    const d = out.textEmbeds!.shape[1]!;
    assert.deepEqual(out.textEmbeds?.shape, [3, d]);
    assert.deepEqual(out.imageEmbeds?.shape, [2, d]);
    assert.deepEqual(out.logitsPerImage?.shape, [2, 3]);
    assert.equal(out.logits, undefined, "CLIP has no classifier logits");
    for (let i = 0; i < 3; i++) assert.ok(Math.abs(norm(row(out.textEmbeds!, i)) - 1) < 1e-4);
    for (let i = 0; i < 2; i++) assert.ok(Math.abs(norm(row(out.imageEmbeds!, i)) - 1) < 1e-4);
    const models = await client.listModels();
    assert.ok(models.models.some((m) => m.id === mlx && m.inferCount >= 1));
  });

  it("infers from token ids and uint8 pixels as from texts and images", async () => {
    const vocab = JSON.parse(readFileSync(path.join(mlx, "vocab.json"), "utf8")) as Record<string, number>;
    const size = JSON.parse(readFileSync(path.join(mlx, "config.json"), "utf8")).vision_config.image_size as number;
    const ids = new BigInt64Array([vocab["<|startoftext|>"]!, vocab["<|endoftext|>"]!].map(BigInt)); // the text ""
    const pixels = encodeTensor([1, size, size, 3], new Uint8Array(size * size * 3).fill(128));
    const out = await client.infer(mlx, { inputs: { input_ids: encodeTensor([1, 2], ids), pixels } });
    const same = await client.infer(mlx, { texts: [""] });
    const d = same.textEmbeds!.shape[1]!;
    assert.deepEqual(out.textEmbeds?.shape, [1, d]);
    assert.deepEqual(out.imageEmbeds?.shape, [1, d]);
    assert.deepEqual(out.logitsPerImage?.shape, [1, 1]);
    out.textEmbeds!.data.forEach((x, i) => assert.ok(Math.abs(x - same.textEmbeds!.data[i]!) < 1e-6));
    const floatIds = { input_ids: encodeTensor([1, 2], new Float32Array(2)) };
    await rejectsWith(client.infer(mlx, { inputs: floatIds }), InvalidArgumentError, "BAD_INPUT_DTYPE");
  });

  it("maps errors to typed errors carrying the daemon's reason", async () => {
    const exists = await rejectsWith(client.convert(hf, mlx), FailedPreconditionError, "OUTPUT_EXISTS");
    assert.equal(exists.code, "FAILED_PRECONDITION");
    assert.match(exists.details, /already exists/);
    await rejectsWith(client.convert(path.join(root, "missing"), path.join(root, "x")), NotFoundError, "SOURCE_NOT_FOUND");
    await rejectsWith(client.convert("./relative/src", path.join(root, "x")), InvalidArgumentError, "RELATIVE_PATH");
    // "org/name" is a Hugging Face Hub id; the test daemon is offline, so an uncached one is not found.
    await rejectsWith(client.convert("acme/uncached", path.join(root, "x")), NotFoundError, "MODEL_NOT_CACHED");
    const alien = path.join(root, "alien");
    mkdirSync(alien);
    writeFileSync(path.join(alien, "config.json"), JSON.stringify({ model_type: "not-a-model" }));
    await rejectsWith(client.convert(alien, path.join(root, "x")), UnsupportedError, "UNSUPPORTED_ARCHITECTURE");
  });

  it("an aborted job rejects with CancelledError", async () => {
    const abort = new AbortController();
    const job = client.convert(hf, path.join(root, "aborted"), {}, {
      onProgress: () => abort.abort(),
      signal: abort.signal,
    });
    await assert.rejects(job, CancelledError);
  });
});

/** A scripted editor: answers dialogs from queues and records what the commands show. */
class FakeUi implements Ui {
  folders: (string | undefined)[] = [];
  files: string[][] = [];
  inputs: (string | undefined)[] = [];
  confirmAnswer = false;
  readonly titles: string[] = [];
  readonly steps: ProgressStep[] = [];
  readonly confirms: string[] = [];
  readonly infos: string[] = [];
  readonly errors: string[] = [];

  async showProgress<T>(title: string, task: (r: (s: ProgressStep) => void, s: AbortSignal) => Promise<T>) {
    this.titles.push(title);
    return task((s) => this.steps.push(s), new AbortController().signal);
  }
  async pickFolder() {
    return this.folders.shift();
  }
  async pickOne(_title: string, items: string[]) {
    return items.at(-1); // "Browse for a folder…": these tests convert folders
  }
  async pickFiles() {
    return this.files.shift();
  }
  async inputText(_prompt: string, value?: string) {
    return this.inputs.length ? this.inputs.shift() : value;
  }
  async confirm(message: string) {
    this.confirms.push(message);
    return this.confirmAnswer;
  }
  showInfo(message: string) {
    this.infos.push(message);
  }
  showError(message: string) {
    this.errors.push(message);
  }
}

describe("extension commands with a fake editor", () => {
  let clients: ReturnType<typeof lazyClient>;
  before(() => {
    clients = lazyClient(daemon.address);
  });
  after(() => clients.close());

  it("MLX: Convert model… converts with progress increments adding up to 100%", async () => {
    const ui = new FakeUi();
    ui.folders = [hf];
    const dst = path.join(root, "ext-mlx");
    ui.inputs = [dst];
    const result = await convertModel(ui, clients);
    assert.equal(result?.dst, dst);
    assert.deepEqual(ui.errors, []);
    assert.deepEqual(ui.titles, ["Converting hf-clip to MLX"]);
    const increments = ui.steps.map((s) => s.increment ?? 0);
    assert.ok(increments.every((i) => i >= 0));
    assert.ok(increments.filter((i) => i > 0).length > 10, "the bar moves tensor by tensor");
    assert.ok(Math.abs(increments.reduce((a, b) => a + b, 0) - 100) < 1e-9);
    assert.match(ui.steps.at(-1)?.message ?? "", /^convert (\d+)\/\1\b/);
    assert.match(ui.infos[0] ?? "", /^Wrote .*ext-mlx: clip float32, \d+ tensors/);
  });

  it("asks before replacing an existing output, and reports the reason when declined", async () => {
    const dst = path.join(root, "ext-mlx");
    const declined = new FakeUi();
    declined.folders = [hf];
    declined.inputs = [dst];
    assert.equal(await convertModel(declined, clients), undefined);
    assert.equal(declined.confirms.length, 1);
    assert.match(declined.errors[0] ?? "", /OUTPUT_EXISTS/);

    const accepted = new FakeUi();
    accepted.folders = [hf];
    accepted.inputs = [dst];
    accepted.confirmAnswer = true;
    assert.equal((await convertModel(accepted, clients))?.dst, dst);
    assert.deepEqual(accepted.errors, []);
  });

  it("MLX: Validate model reports a pass", async () => {
    const ui = new FakeUi();
    ui.folders = [path.join(root, "ext-mlx"), hf];
    const report = await validateModel(ui, clients);
    assert.equal(report?.passed, true);
    assert.match(ui.infos[0] ?? "", /^Validation passed: 5 outputs/);
    assert.ok(Math.abs(ui.steps.reduce((a, s) => a + (s.increment ?? 0), 0) - 100) < 1e-9);
  });

  it("MLX: Run model names the best text for each image", async () => {
    const ui = new FakeUi();
    ui.folders = [path.join(root, "ext-mlx")];
    ui.inputs = ["a red square | static noise"];
    ui.files = [images];
    const message = await inferModel(ui, clients);
    assert.deepEqual(ui.errors, []);
    assert.match(message ?? "", /^textEmbeds \[2, \d+\], imageEmbeds \[2, \d+\], logitsPerImage \[2, 2\]; red\.png: best text '.+'; noise\.png: best text/);
  });

  it("shows a missing source as an error, not an exception", async () => {
    const ui = new FakeUi();
    ui.folders = [path.join(root, "does-not-exist")];
    assert.equal(await convertModel(ui, clients), undefined);
    assert.match(ui.errors[0] ?? "", /SOURCE_NOT_FOUND/);
  });
});
