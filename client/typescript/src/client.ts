/**
 * MlxdClient: a typed client for the mlxd daemon over its unix socket or TCP (with token).
 *
 *   const c = await MlxdClient.connect("unix:///run/user/1000/mlxd/mlxd.sock");
 *   const result = await c.convert("/hf/clip", "/mlx/clip", { dtype: "DTYPE_BFLOAT16" }, (p) => console.log(p));
 *
 * Every failed call rejects with an MlxdError subclass (src/errors.ts).
 */
import * as grpc from "@grpc/grpc-js";
import { fromServiceError, MlxdError, ProtocolMismatchError } from "./errors.js";
import { loadMlxdService } from "./proto.js";
import { decodeTensor, encodeTensor, type Tensor } from "./tensor.js";
import type {
  ConvertOptions,
  ConvertResult,
  GeneratedImage,
  GenerateImageOptions,
  GenerateImageResult,
  ImageEvent,
  ImageStep,
  GetJobResponse,
  InferResponseMessage,
  InitializeResponse,
  JobEvent,
  JobInfo,
  ListCachedModelsResponse,
  ListModelsResponse,
  LoadModelResponse,
  Progress,
  QuantizationSpec,
  TensorMessage,
  ValidationReport,
} from "./types.js";

export const PROTOCOL_VERSION = 1;
export const CLIENT_NAME = "@mlxd/client";
export const CLIENT_VERSION = "0.1.0";
const MAX_MESSAGE_BYTES = 256 * 1024 * 1024; // the daemon's own limit, both ways

export interface ClientOptions {
  /** Bearer token for a TCP daemon (its --token-file); default `$MLXD_TOKEN`. Not needed on a unix socket. */
  token?: string;
  /** Directory holding mlxd/v1/mlxd.proto; default the repository's proto/ or `$MLXD_PROTO_DIR`. */
  protoDir?: string;
  /** Deadline for unary calls, in milliseconds (default: none). */
  timeoutMs?: number;
  /** Protocol version sent by initialize(); only tests change it. */
  protocolVersion?: number;
}

export interface JobOptions {
  /** Called with every Progress event, in order. */
  onProgress?: (progress: Progress) => void;
  /** Aborting cancels the job on the daemon (CancelJob) and rejects with CancelledError. */
  signal?: AbortSignal;
}

export interface InferInput {
  texts?: string[];
  /** Encoded images (PNG, JPEG, ...). */
  images?: Uint8Array[];
  /**
   * Instead of texts and images: preprocessed tensors by name (`encodeTensor`), as Hugging Face's processors give
   * them: `input_ids`, `attention_mask`, `token_type_ids`, `pixel_values` or uint8 `pixels` (InferRequest.inputs).
   */
  inputs?: Record<string, TensorMessage>;
}

export interface InferOutput {
  model: string;
  seconds: number;
  textEmbeds?: Tensor;
  imageEmbeds?: Tensor;
  logitsPerImage?: Tensor;
  logits?: Tensor;
  labels: string[];
}

/** Where mlxctl looks: `$MLXD_ADDRESS`, else the per-user socket under `$XDG_RUNTIME_DIR` or /tmp. */
export function defaultAddress(): string {
  if (process.env.MLXD_ADDRESS) return process.env.MLXD_ADDRESS;
  if (process.env.XDG_RUNTIME_DIR) return `unix://${process.env.XDG_RUNTIME_DIR}/mlxd/mlxd.sock`;
  return `unix:///tmp/mlxd-${process.getuid?.() ?? 0}/mlxd.sock`;
}

type Stub = grpc.Client & Record<string, (...args: unknown[]) => unknown>;
type UnaryMethod = (req: unknown, md: grpc.Metadata, opts: grpc.CallOptions, cb: grpc.requestCallback<unknown>) => void;
type StreamMethod = (req: unknown, md: grpc.Metadata, opts: grpc.CallOptions) => grpc.ClientReadableStream<unknown>;
type StreamMessage = Record<string, unknown> & { progress?: Progress | null };

export class MlxdClient {
  readonly address: string;
  private readonly stub: Stub;
  private readonly token: string | undefined;
  private readonly options: ClientOptions;

  /** A client for `address` ("unix:///path" or "host:port"); no call is made until the first method. */
  constructor(address: string = defaultAddress(), options: ClientOptions = {}) {
    this.address = address;
    this.options = options;
    this.token = options.token ?? process.env.MLXD_TOKEN;
    const Ctor = loadMlxdService(options.protoDir);
    this.stub = new Ctor(address, grpc.credentials.createInsecure(), {
      "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
      "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    }) as Stub;
  }

  /** Construct and run the initialize() handshake; the client is closed again if it fails. */
  static async connect(address?: string, options: ClientOptions = {}): Promise<MlxdClient> {
    const client = new MlxdClient(address, options);
    try {
      await client.initialize();
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  close(): void {
    this.stub.close();
  }

  /** Version handshake; rejects with ProtocolMismatchError when the daemon speaks another protocol. */
  async initialize(): Promise<InitializeResponse> {
    const wanted = this.options.protocolVersion ?? PROTOCOL_VERSION;
    const res = await this.unary<InitializeResponse>("Initialize", {
      protocolVersion: wanted,
      clientName: CLIENT_NAME,
      clientVersion: CLIENT_VERSION,
    });
    if (res.protocolVersion !== wanted) {
      const msg = `daemon speaks protocol ${res.protocolVersion}, this client ${wanted}: restart the daemon`;
      throw new ProtocolMismatchError(grpc.status.FAILED_PRECONDITION, msg, "PROTOCOL_MISMATCH", {
        daemon_protocol: String(res.protocolVersion),
      });
    }
    return res;
  }

  /**
   * Convert a Hugging Face checkpoint to MLX; resolves with the result once the job ends. `src` is a directory
   * on the daemon's machine or a Hub id ("org/name[@revision]") the daemon resolves from its cache (or downloads).
   */
  convert(src: string, dst: string, opts: ConvertOptions = {}, job: JobOptions | JobOptions["onProgress"] = {}) {
    return this.runJob<ConvertResult>(this.convertEvents(src, dst, opts, jobOptions(job)), jobOptions(job));
  }

  /** Convert as a stream: Progress events, then exactly one result. */
  convertEvents(src: string, dst: string, opts: ConvertOptions = {}, job: JobOptions = {}) {
    const req = { src, dst, ...opts, quantize: opts.quantize };
    return this.jobStream<ConvertResult>("Convert", req, ["result"], job.signal);
  }

  /** Quantize an MLX directory (0 bits / group size: the mode's default), or dequantize one. */
  quantize(
    src: string,
    dst: string,
    opts: {
      spec?: Partial<QuantizationSpec>;
      overwrite?: boolean;
      dequantize?: boolean;
      dtype?: string;
      revision?: string;
    } = {},
    job: JobOptions | JobOptions["onProgress"] = {},
  ) {
    const req = { src, dst, ...opts, spec: opts.spec };
    const j = jobOptions(job);
    return this.runJob<ConvertResult>(this.jobStream<ConvertResult>("Quantize", req, ["result"], j.signal), j);
  }

  /** Validate an MLX model against its source checkpoint (numerics, per output and per layer). */
  validate(
    modelDir: string,
    reference: string,
    inputs: InferInput = {},
    job: JobOptions | JobOptions["onProgress"] = {},
  ): Promise<ValidationReport> {
    return this.runJob(this.validateEvents(modelDir, reference, inputs, jobOptions(job)), jobOptions(job));
  }

  validateEvents(modelDir: string, reference: string, inputs: InferInput = {}, job: JobOptions = {}) {
    const req = { modelDir, reference, texts: inputs.texts ?? [], images: (inputs.images ?? []).map(toBuffer) };
    return this.jobStream<ValidationReport>("Validate", req, ["result"], job.signal);
  }

  /** Re-attach to a job: its events from `fromSeq` (0: all), then its result; a failed job rejects. */
  watchJob(jobId: string, fromSeq = 0, job: JobOptions | JobOptions["onProgress"] = {}) {
    return this.runJob(this.watchJobEvents(jobId, fromSeq, jobOptions(job)), jobOptions(job));
  }

  watchJobEvents(jobId: string, fromSeq = 0, job: JobOptions = {}) {
    return this.jobStream<ConvertResult | ValidationReport>(
      "WatchJob",
      { jobId, fromSeq },
      ["convertResult", "validationReport"],
      job.signal,
    );
  }

  /** Stop a running or queued job; false if it had already finished. */
  async cancelJob(jobId: string): Promise<boolean> {
    return (await this.unary<{ cancelled: boolean }>("CancelJob", { jobId })).cancelled;
  }

  /** Jobs this daemon knows, newest first. */
  async listJobs(): Promise<JobInfo[]> {
    return (await this.unary<{ jobs: JobInfo[] }>("ListJobs", {})).jobs;
  }

  getJob(jobId: string): Promise<GetJobResponse> {
    return this.unary<GetJobResponse>("GetJob", { jobId });
  }

  /** Run a model on texts and/or encoded images, or on preprocessed tensors; tensors come back decoded to Float32Array. */
  async infer(model: string, input: InferInput = {}): Promise<InferOutput> {
    const res = await this.unary<InferResponseMessage>("Infer", {
      model,
      texts: input.texts ?? [],
      images: (input.images ?? []).map(toBuffer),
      inputs: input.inputs ?? {},
    });
    return {
      model: res.model,
      seconds: res.seconds,
      textEmbeds: decodeTensor(res.textEmbeds),
      imageEmbeds: decodeTensor(res.imageEmbeds),
      logitsPerImage: decodeTensor(res.logitsPerImage),
      logits: decodeTensor(res.logits),
      labels: res.labels,
    };
  }

  /**
   * Stable Diffusion on a converted pipeline: a `step` event per denoising step, an `image` (PNG) per image, then
   * the `result`. Stopping the iteration early, or aborting `signal`, cancels the run between steps.
   */
  async *generateImageEvents(
    model: string,
    prompt: string,
    opts: GenerateImageOptions = {},
    signal?: AbortSignal,
  ): AsyncGenerator<ImageEvent> {
    signal?.throwIfAborted();
    const request = {
      model,
      prompt,
      negativePrompt: opts.negativePrompt ?? "",
      steps: opts.steps ?? 20,
      guidance: opts.guidance ?? 7.5,
      seed: opts.seed ?? 0,
      width: opts.width ?? 0,
      height: opts.height ?? 0,
      numImages: opts.numImages ?? 1,
      latents: opts.latents ? encodeTensor(opts.latents.shape, opts.latents.data) : null,
      scheduler: opts.scheduler ?? "",
      image: opts.image ? toBuffer(opts.image) : Buffer.alloc(0),
      strength: opts.strength ?? 0.8,
    };
    const fn = this.stub.GenerateImage as unknown as StreamMethod;
    const call = fn.call(this.stub, request, this.metadata(), {});
    const onAbort = () => call.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for await (const message of call as AsyncIterable<Record<string, unknown>>) {
        if (message.step) yield { step: message.step as ImageStep };
        else if (message.image) yield { image: message.image as GeneratedImage };
        else if (message.result) yield { result: message.result as GenerateImageResult };
      }
    } catch (err) {
      throw fromServiceError(err);
    } finally {
      signal?.removeEventListener("abort", onAbort);
      call.cancel(); // the daemon sees the stream close and stops between steps
    }
  }

  /** Generate images; resolves with the PNG bytes of each and the result. `onStep` sees each step. */
  async generateImage(
    model: string,
    prompt: string,
    opts: GenerateImageOptions = {},
    onStep?: (step: { step: number; total: number; seconds: number }) => void,
  ): Promise<{ images: Buffer[]; result: GenerateImageResult }> {
    const images: Buffer[] = [];
    let result: GenerateImageResult | undefined;
    for await (const event of this.generateImageEvents(model, prompt, opts)) {
      if ("step" in event) onStep?.(event.step);
      else if ("image" in event) images.push(event.image.png);
      else result = event.result;
    }
    if (!result) throw new MlxdError(grpc.status.UNKNOWN, "the stream ended without a result", "NO_RESULT");
    return { images, result };
  }

  loadModel(path: string, keepAliveSeconds = 0): Promise<LoadModelResponse> {
    return this.unary<LoadModelResponse>("LoadModel", { path, keepAliveSeconds });
  }

  async unloadModel(id: string): Promise<number> {
    return (await this.unary<{ freedBytes: number }>("UnloadModel", { id })).freedBytes;
  }

  listModels(): Promise<ListModelsResponse> {
    return this.unary<ListModelsResponse>("ListModels", {});
  }

  /** Models in the daemon's Hugging Face cache, with their model_type and whether mlxd converts them. */
  listCachedModels(): Promise<ListCachedModelsResponse> {
    return this.unary<ListCachedModelsResponse>("ListCachedModels", {});
  }

  // -- plumbing --------------------------------------------------------------------------------

  private metadata(): grpc.Metadata {
    const md = new grpc.Metadata();
    if (this.token) md.set("authorization", `Bearer ${this.token}`);
    return md;
  }

  private unary<R>(method: string, request: object): Promise<R> {
    const opts: grpc.CallOptions = {};
    if (this.options.timeoutMs) opts.deadline = Date.now() + this.options.timeoutMs;
    const fn = this.stub[method] as unknown as UnaryMethod;
    return new Promise<R>((resolve, reject) => {
      fn.call(this.stub, request, this.metadata(), opts, (err, res) => {
        if (err) reject(fromServiceError(err));
        else resolve(res as R);
      });
    });
  }

  /** Progress events, then the one result found under any of `resultFields`; gRPC errors become MlxdErrors. */
  private async *jobStream<R>(
    method: string,
    request: object,
    resultFields: string[],
    signal?: AbortSignal,
  ): AsyncGenerator<JobEvent<R>> {
    signal?.throwIfAborted();
    const fn = this.stub[method] as unknown as StreamMethod;
    const call = fn.call(this.stub, request, this.metadata(), {});
    let jobId = "";
    // Dropping a stream leaves its job running on the daemon, so an abort cancels the job too.
    const onAbort = () => {
      if (jobId) this.cancelJob(jobId).catch(() => undefined);
      call.cancel();
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for await (const message of call as AsyncIterable<StreamMessage>) {
        if (message.progress) {
          jobId ||= message.progress.jobId;
          yield { progress: message.progress };
          continue;
        }
        const field = resultFields.find((f) => message[f]);
        if (field) yield { result: message[field] as R };
      }
    } catch (err) {
      throw fromServiceError(err);
    } finally {
      signal?.removeEventListener("abort", onAbort);
      call.cancel(); // no-op once the stream has ended; frees it when the consumer stops early
    }
  }

  private async runJob<R>(events: AsyncIterable<JobEvent<R>>, job: JobOptions): Promise<R> {
    let result: R | undefined;
    for await (const event of events) {
      if (event.progress) job.onProgress?.(event.progress);
      else result = event.result;
    }
    if (result === undefined) {
      throw new MlxdError(grpc.status.UNKNOWN, "the job's stream ended without a result", "NO_RESULT");
    }
    return result;
  }
}

function jobOptions(job: JobOptions | JobOptions["onProgress"]): JobOptions {
  return typeof job === "function" ? { onProgress: job } : (job ?? {});
}

function toBuffer(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}
