// Test harness: a real mlxd subprocess on a temporary unix socket (or TCP with a token) and a tiny CLIP.
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { MlxdClient } from "../src/index.js";

const PACKAGE_ROOT = fileURLToPath(new URL("../../", import.meta.url)); // from dist/test/
export const PYTHON = process.env.MLXD_PYTHON ?? path.resolve(PACKAGE_ROOT, "../../.venv/bin/python");

/** A fresh short temporary directory (unix socket paths must stay under ~100 bytes). */
function requirePython(): void {
  if (!existsSync(PYTHON)) throw new Error(`no Python at ${PYTHON}: run make setup, or set MLXD_PYTHON`);
}

export function tempDir(prefix = "mlxd-ts-"): string {
  return mkdtempSync(path.join(tmpdir(), prefix));
}

export class Daemon {
  readonly address: string;
  readonly logFile: string;
  private readonly proc: ChildProcess;

  private constructor(address: string, logFile: string, proc: ChildProcess) {
    this.address = address;
    this.logFile = logFile;
    this.proc = proc;
  }

  /** Start `mlxd` on a unix socket in `root`, or on 127.0.0.1 with `token` when given; resolves once it answers. */
  static async start(root: string, tcp?: { token: string; tokenFile: string }): Promise<Daemon> {
    requirePython();
    const address = tcp ? `127.0.0.1:${await freePort()}` : `unix://${path.join(root, "mlxd.sock")}`;
    const logFile = path.join(root, "mlxd.log");
    const log = openSync(logFile, "w");
    const args = ["-m", "mlxd_daemon", "--address", address, "--log-format", "json"];
    if (tcp) args.push("--token-file", tcp.tokenFile, "--state-dir", root);
    // Tests never reach the Hugging Face Hub: an id resolves from the cache or fails fast (MODEL_NOT_CACHED).
    const env = { ...process.env, HF_HUB_OFFLINE: "1", MLXD_ADDRESS: address };
    const proc = spawn(PYTHON, args, { stdio: ["ignore", log, log], env });
    closeSync(log);
    proc.on("error", (err) => writeFileSync(logFile, `spawn failed: ${err}\n`, { flag: "a" }));
    const daemon = new Daemon(address, logFile, proc);
    await daemon.waitReady(60_000, tcp?.token);
    return daemon;
  }

  private async waitReady(timeoutMs: number, token?: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.proc.exitCode !== null) throw new Error(`mlxd exited ${this.proc.exitCode}:\n${this.log()}`);
      // A fresh client per attempt: a channel that failed once waits out grpc-js's reconnect backoff.
      const client = new MlxdClient(this.address, { token, timeoutMs: 2_000 });
      try {
        await client.initialize();
        return;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`mlxd did not answer: ${err}\n${this.log()}`);
      } finally {
        client.close();
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  log(): string {
    return readFileSync(this.logFile, "utf8");
  }

  /** SIGTERM (the daemon drains), SIGKILL after 30 s; resolves with the exit code. */
  async stop(): Promise<number | null> {
    if (this.proc.exitCode !== null) return this.proc.exitCode;
    const exited = new Promise<number | null>((r) => this.proc.once("exit", (code) => r(code)));
    this.proc.kill("SIGTERM");
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 30_000);
    const code = await exited;
    clearTimeout(timer);
    return code;
  }
}

/** Write a tiny random-weight Hugging Face CLIP to `root/hf-clip` and two PNG images; return their paths. */
export async function makeFixtures(root: string): Promise<{ clip: string; images: string[] }> {
  const clip = path.join(root, "hf-clip");
  requirePython();
  const images = [path.join(root, "red.png"), path.join(root, "noise.png")];
  const script = `
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from mlxd_daemon.fixtures import make_clip
make_clip(Path(sys.argv[1]), size="tiny")
Image.new("RGB", (40, 30), (220, 20, 20)).save(sys.argv[2])
Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(sys.argv[3])
`;
  await promisify(execFile)(PYTHON, ["-c", script, clip, ...images]);
  return { clip, images };
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/** L2 norm of a vector. */
export function norm(v: Float32Array): number {
  return Math.sqrt(v.reduce((s, x) => s + x * x, 0));
}
