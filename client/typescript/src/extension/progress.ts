import type { Progress } from "../types.js";

/** One step for an editor progress bar: VS Code's `{ message, increment }`, increments summing to 100. */
export interface ProgressStep {
  message?: string;
  increment?: number;
}

/** Relative duration of each stage a job reports; stages not listed (e.g. "queued") only update the message. */
export const STAGE_WEIGHTS: Record<string, Record<string, number>> = {
  convert: { convert: 1 },
  quantize: { quantize: 1 },
  dequantize: { dequantize: 1 },
  validate: { mlx: 1, reference: 2, compare: 1 }, // the PyTorch reference run dominates
};

/**
 * Turns a job's Progress events into increments of an overall percentage: the editor's API adds increments up,
 * while the daemon restarts items_done at every stage.
 */
export class ProgressIncrements {
  private readonly weights: Record<string, number>;
  private readonly total: number;
  private readonly finished = new Set<string>();
  private reported = 0;

  constructor(kind: keyof typeof STAGE_WEIGHTS | Record<string, number>) {
    this.weights = typeof kind === "string" ? (STAGE_WEIGHTS[kind] ?? {}) : kind;
    this.total = sum(Object.values(this.weights));
  }

  /** The step for one event; `increment` is 0 when the bar does not move. */
  step(p: Progress): ProgressStep {
    const weight = this.weights[p.stage] ?? 0;
    let fraction = 0;
    if (p.kind === "KIND_END") fraction = 1;
    else if (p.bytesTotal > 0) fraction = p.bytesDone / p.bytesTotal;
    else if (p.itemsTotal > 0) fraction = p.itemsDone / p.itemsTotal;
    if (p.kind === "KIND_END") this.finished.add(p.stage);
    const done = sum([...this.finished].filter((s) => s !== p.stage).map((s) => this.weights[s] ?? 0));
    const percent = this.total > 0 ? Math.min(100, (100 * (done + weight * fraction)) / this.total) : 0;
    const increment = Math.max(0, percent - this.reported);
    this.reported += increment;
    return { message: describe(p), increment };
  }

  /** The percentage reported so far. */
  get percent(): number {
    return this.reported;
  }
}

/** "convert 12/78 tensors"-style text for one event. */
export function describe(p: Progress): string {
  if (p.kind === "KIND_BEGIN" && p.itemsTotal === 0) return p.message || p.stage;
  const count = p.itemsTotal > 0 ? ` ${p.itemsDone}/${p.itemsTotal}` : "";
  return `${p.stage}${count}${p.message ? `: ${p.message}` : ""}`;
}

function sum(xs: number[]): number {
  return xs.reduce((a, b) => a + b, 0);
}
