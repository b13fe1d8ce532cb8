// Stable Diffusion through the TypeScript client: a tiny random diffusers pipeline converted by a live daemon,
// then generateImage / generateImageEvents (steps streamed, PNGs, cancel by abort).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import * as path from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { InvalidArgumentError, MlxdClient, type ImageEvent } from "../src/index.js";
import { Daemon, PYTHON, removeDir, tempDir } from "./helpers.js";

let root: string;
let daemon: Daemon;
let client: MlxdClient;
let mlx: string;
const PNG = Buffer.from([0x89, 0x50, 0x4e, 0x47]);

before(async () => {
  root = tempDir();
  const hf = path.join(root, "hf-sd");
  const script = "import sys; from mlxd_daemon.fixtures.sd import make_sd; make_sd(sys.argv[1])";
  [daemon] = await Promise.all([Daemon.start(root), promisify(execFile)(PYTHON, ["-c", script, hf])]);
  client = await MlxdClient.connect(daemon.address);
  mlx = path.join(root, "mlx-sd");
  const converted = await client.convert(hf, mlx, { dtype: "DTYPE_FLOAT32" });
  assert.equal(converted.modelType, "stable_diffusion");
});

after(async () => {
  client?.close();
  if (daemon) await daemon.stop();
  removeDir(root);
});

describe("generateImage", () => {
  const latents = { shape: [1, 4, 16, 16], data: Float32Array.from({ length: 1024 }, (_, i) => Math.sin(i)) };

  it("streams one step event per step, then a PNG per image, then the result", async () => {
    const events: ImageEvent[] = [];
    for await (const e of client.generateImageEvents(mlx, "a photo of a cat", { steps: 3, numImages: 2 })) events.push(e);
    const steps = events.flatMap((e) => ("step" in e ? [e.step.step] : []));
    assert.deepEqual(steps, [1, 2, 3]);
    const pngs = events.flatMap((e) => ("image" in e ? [e.image.png] : []));
    assert.equal(pngs.length, 2);
    for (const png of pngs) assert.ok(png.subarray(0, 4).equals(PNG));
    const last = events.at(-1);
    assert.ok(last && "result" in last && last.result.numImages === 2 && last.result.width === 32);
  });

  it("gives the same image for the same initial latents and scheduler", async () => {
    const opts = { steps: 2, latents, scheduler: "ddim" };
    const a = await client.generateImage(mlx, "a red circle", opts);
    const b = await client.generateImage(mlx, "a red circle", opts);
    assert.ok(a.images[0]?.equals(b.images[0] as Buffer));
    assert.equal(a.result.scheduler, "DDIMScheduler");
  });

  it("rejects latents of the wrong shape with InvalidArgumentError BAD_LATENTS", async () => {
    const bad = { shape: [1, 4, 8, 8], data: new Float32Array(256) };
    await assert.rejects(client.generateImage(mlx, "x", { steps: 1, latents: bad }), (err: unknown) => {
      return err instanceof InvalidArgumentError && err.reason === "BAD_LATENTS";
    });
  });

  it("stops a run when the signal aborts, and the daemon keeps serving", async () => {
    const controller = new AbortController();
    const seen: number[] = [];
    await assert.rejects(async () => {
      for await (const e of client.generateImageEvents(mlx, "cat", { steps: 200 }, controller.signal)) {
        if ("step" in e) seen.push(e.step.step);
        controller.abort();
      }
    });
    assert.ok(seen.length < 200);
    const { images } = await client.generateImage(mlx, "cat", { steps: 1 });
    assert.equal(images.length, 1);
  });
});
