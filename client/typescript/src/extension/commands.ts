/**
 * Editor command logic, free of any editor API: each command takes a `Ui` (the editor's dialogs and progress
 * bar) and an `MlxdClient`, so it runs unchanged in VS Code (src/extension/vscode.ts) and in tests (a fake Ui).
 */
import { readFile } from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { MlxdClient, type ClientOptions } from "../client.js";
import { FailedPreconditionError, MlxdError } from "../errors.js";
import { row } from "../tensor.js";
import type { ConvertResult, ValidationReport } from "../types.js";
import { ProgressIncrements, type ProgressStep } from "./progress.js";

export type { ProgressStep } from "./progress.js";

/** What the commands need from an editor. */
export interface Ui {
  /** Run `task` under a progress bar titled `title`; `signal` aborts when the user cancels. */
  showProgress<T>(
    title: string,
    task: (report: (step: ProgressStep) => void, signal: AbortSignal) => Promise<T>,
  ): Promise<T>;
  /** A folder chosen by the user, or undefined if they dismissed the dialog. */
  pickFolder(title: string): Promise<string | undefined>;
  /** Files chosen by the user (possibly none), or undefined if dismissed. */
  pickFiles(title: string): Promise<string[] | undefined>;
  /** One of `items` chosen by the user, or undefined if dismissed. */
  pickOne(title: string, items: string[]): Promise<string | undefined>;
  /** Free text from the user, pre-filled with `value`; undefined if dismissed. */
  inputText(prompt: string, value?: string): Promise<string | undefined>;
  /** A yes/no question; true when the user chose `action`. */
  confirm(message: string, action: string): Promise<boolean>;
  showInfo(message: string): void;
  showError(message: string): void;
}

/** The client a command uses: connected (handshake done) on first use, shared afterwards. */
export type ClientProvider = () => Promise<MlxdClient>;

/** A provider that connects once and connects again after a failed attempt; `close()` drops the connection. */
export function lazyClient(address?: string, options: ClientOptions = {}): ClientProvider & { close(): void } {
  let pending: Promise<MlxdClient> | undefined;
  const provider = () => {
    pending ??= MlxdClient.connect(address, options).catch((err: unknown) => {
      pending = undefined;
      throw err;
    });
    return pending;
  };
  const close = () => {
    pending?.then((c) => c.close()).catch(() => undefined);
    pending = undefined;
  };
  return Object.assign(provider, { close });
}

/** Command ids, as contributed in extension/package.json. */
export const COMMANDS = {
  convertModel: "mlx.convertModel",
  validateModel: "mlx.validateModel",
  infer: "mlx.infer",
  showModels: "mlx.showModels",
} as const;

/** The entry of `pickSource`'s list that opens a folder dialog instead of using a cached model. */
export const BROWSE = "Browse for a folder…";

/**
 * A source to convert: a model from the daemon's Hugging Face cache (as a Hub id "org/name@ref") when it has
 * convertible ones, else (or on "Browse…") a folder.
 */
export async function pickSource(ui: Ui, client: ClientProvider): Promise<string | undefined> {
  let cached: string[] = [];
  try {
    const listing = await (await client()).listCachedModels();
    cached = listing.models
      .filter((m) => m.support !== "" && (m.complete || !listing.offline))
      .map((m) => `${m.repoId}@${m.refs[0] ?? m.commitHash}`);
  } catch {
    cached = []; // no daemon yet, or one that cannot list its cache: folders still work
  }
  if (cached.length === 0) return ui.pickFolder("Hugging Face model folder to convert");
  const choice = await ui.pickOne("Model to convert (from the Hugging Face cache)", [...cached, BROWSE]);
  if (choice !== BROWSE) return choice;
  return ui.pickFolder("Hugging Face model folder to convert");
}

/** "MLX: Convert model…": pick a cached Hub model or a folder, and a destination; convert with progress. */
export async function convertModel(ui: Ui, client: ClientProvider): Promise<ConvertResult | undefined> {
  const src = await pickSource(ui, client);
  if (!src) return undefined;
  const isHubId = !path.isAbsolute(src);
  const suggested = isHubId ? path.join(os.homedir(), "mlx-models", src.replace(/[@/]/g, "--")) : src;
  const dst = await ui.inputText("Write the MLX model to", `${suggested.replace(/\/+$/, "")}-mlx`);
  if (!dst) return undefined;
  return reportErrors(ui, async () => {
    const c = await client();
    const run = (overwrite: boolean) =>
      ui.showProgress(`Converting ${path.basename(src)} to MLX`, (report, signal) => {
        const bar = new ProgressIncrements("convert");
        return c.convert(src, dst, { overwrite }, { onProgress: (p) => report(bar.step(p)), signal });
      });
    let result: ConvertResult;
    try {
      result = await run(false);
    } catch (err) {
      const exists = err instanceof FailedPreconditionError && err.reason === "OUTPUT_EXISTS";
      if (!exists || !(await ui.confirm(`${dst} already exists. Replace it?`, "Replace"))) throw err;
      result = await run(true);
    }
    ui.showInfo(
      `Wrote ${result.dst}: ${result.modelType} ${dtypeName(result.dtype)}, ${result.numTensors} tensors, ` +
        `${result.numParameters.toLocaleString("en-US")} parameters in ${result.seconds.toFixed(2)} s`,
    );
    return result;
  });
}

/** "MLX: Validate model": compare an MLX model against its source checkpoint. */
export async function validateModel(ui: Ui, client: ClientProvider): Promise<ValidationReport | undefined> {
  const model = await ui.pickFolder("MLX model folder to validate");
  if (!model) return undefined;
  const reference = await ui.pickFolder("Hugging Face folder it was converted from");
  if (!reference) return undefined;
  return reportErrors(ui, async () => {
    const c = await client();
    const report = await ui.showProgress(`Validating ${path.basename(model)}`, (step, signal) => {
      const bar = new ProgressIncrements("validate");
      return c.validate(model, reference, {}, { onProgress: (p) => step(bar.step(p)), signal });
    });
    const worst = report.outputs.reduce((m, o) => Math.max(m, o.maxAbs), 0);
    const summary = `${report.outputs.length} outputs, max abs error ${worst.toExponential(2)} (${report.band})`;
    if (report.passed) ui.showInfo(`Validation passed: ${summary}`);
    else {
      const where = report.firstDivergentLayer ? `; first divergent layer ${report.firstDivergentLayer}` : "";
      ui.showError(`Validation failed: ${summary}${where}. Report: ${report.reportPath}`);
    }
    return report;
  });
}

/** "MLX: Run model on text / images": embed texts and images, say which text matches each image best. */
export async function inferModel(ui: Ui, client: ClientProvider): Promise<string | undefined> {
  const model = await ui.pickFolder("MLX model folder");
  if (!model) return undefined;
  const text = await ui.inputText("Texts, separated by |", "a photo of a cat | a photo of a dog");
  if (text === undefined) return undefined;
  const imagePaths = (await ui.pickFiles("Images (optional)")) ?? [];
  const texts = text.split("|").map((t) => t.trim()).filter(Boolean);
  return reportErrors(ui, async () => {
    const images = await Promise.all(imagePaths.map((p) => readFile(p)));
    const out = await (await client()).infer(model, { texts, images });
    const shapes = (["textEmbeds", "imageEmbeds", "logitsPerImage", "logits"] as const)
      .filter((k) => out[k] && out[k].data.length > 0)
      .map((k) => `${k} [${out[k]!.shape.join(", ")}]`);
    const lines = [shapes.join(", ")];
    const logits = out.logitsPerImage;
    if (logits && logits.data.length > 0) {
      imagePaths.forEach((p, i) => {
        const scores = row(logits, i);
        const best = scores.indexOf(Math.max(...scores));
        lines.push(`${path.basename(p)}: best text '${texts[best]}'`);
      });
    }
    const message = lines.join("; ");
    ui.showInfo(message);
    return message;
  });
}

/** "MLX: Show loaded models". */
export async function showModels(ui: Ui, client: ClientProvider): Promise<void> {
  await reportErrors(ui, async () => {
    const res = await (await client()).listModels();
    const mb = (b: number) => `${(b / 1e6).toFixed(1)} MB`;
    const models = res.models.map((m) => `${m.id} (${m.modelType}, ${mb(m.residentBytes)})`);
    ui.showInfo(`${models.length} loaded, ${mb(res.usedBytes)} of ${mb(res.budgetBytes)}: ${models.join(", ")}`);
  });
}

/** Every command, by id: what an editor registers. */
export function commandTable(ui: Ui, client: ClientProvider): Record<string, () => Promise<unknown>> {
  return {
    [COMMANDS.convertModel]: () => convertModel(ui, client),
    [COMMANDS.validateModel]: () => validateModel(ui, client),
    [COMMANDS.infer]: () => inferModel(ui, client),
    [COMMANDS.showModels]: () => showModels(ui, client),
  };
}

/** Run `body`; a failure is shown to the user (with the daemon's reason) and the command returns undefined. */
async function reportErrors<T>(ui: Ui, body: () => Promise<T>): Promise<T | undefined> {
  try {
    return await body();
  } catch (err) {
    const msg = err instanceof MlxdError ? `${err.details} (${err.reason || err.code})` : String(err);
    ui.showError(`MLX: ${msg}`);
    return undefined;
  }
}

function dtypeName(dtype: string): string {
  return dtype.replace(/^DTYPE_/, "").toLowerCase();
}
