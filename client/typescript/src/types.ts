// Hand-written shapes of the mlxd.v1 messages this client uses, as @grpc/proto-loader decodes them with
// LOADER_OPTIONS (camelCase fields, enums as their names, 64-bit integers as numbers, bytes as Buffer).
// Keep in step with proto/mlxd/v1/mlxd.proto; the end-to-end tests read every field listed here.

export type Dtype = "DTYPE_UNSPECIFIED" | "DTYPE_FLOAT32" | "DTYPE_FLOAT16" | "DTYPE_BFLOAT16";
export type QuantMode =
  | "QUANT_MODE_UNSPECIFIED"
  | "QUANT_MODE_AFFINE"
  | "QUANT_MODE_MXFP4"
  | "QUANT_MODE_MXFP8"
  | "QUANT_MODE_NVFP4";
export type ProgressKind = "KIND_UNSPECIFIED" | "KIND_BEGIN" | "KIND_REPORT" | "KIND_END";
export type JobState =
  | "JOB_STATE_UNSPECIFIED"
  | "JOB_STATE_QUEUED"
  | "JOB_STATE_RUNNING"
  | "JOB_STATE_SUCCEEDED"
  | "JOB_STATE_FAILED"
  | "JOB_STATE_CANCELLED";

export interface Capabilities {
  architectures: string[];
  dtypes: Dtype[];
  /** Only the modes the daemon's MLX backend was probed to run. */
  quantModes: QuantMode[];
  quantBits: number[];
  quantGroupSizes: number[];
  quantRecipes: string[];
  quantModeDetails: QuantModeCapability[];
}

/** What one quantization mode accepts (the daemon's quantize.MODES table). */
export interface QuantModeCapability {
  mode: QuantMode;
  bits: number[];
  groupSizes: number[];
  defaultBits: number;
  defaultGroupSize: number;
}

export interface InitializeResponse {
  protocolVersion: number;
  daemonVersion: string;
  capabilities: Capabilities | null;
  pid: number;
  address: string;
  startedAtUnix: number;
  blas: string;
}

export interface Progress {
  kind: ProgressKind;
  jobId: string;
  stage: string;
  itemsDone: number;
  itemsTotal: number;
  bytesDone: number;
  bytesTotal: number;
  message: string;
  seq: number;
}

export interface QuantizationSpec {
  bits: number;
  groupSize: number;
  mode: QuantMode;
  overrides: string[];
  recipe: string;
  /** "rtn" (default), "awq", "gptq" (calibrated). */
  method: string;
  /** For awq/gptq: a text file (one sample a line), an image folder, or an .npz. */
  calibrationData: string;
  calibrationSeed: number;
}

export interface ShardInfo {
  file: string;
  bytes: number;
  tensors: number;
}

export interface SkippedLayer {
  name: string;
  reason: string;
}

export interface LayerQuantReport {
  name: string;
  bits: number;
  groupSize: number;
  mode: QuantMode;
  /** Absent where not measured: a dry run, or a weight holding NaN/Inf. */
  relError?: number;
  bytesBefore: number;
  bytesAfter: number;
  note: string;
}

export interface ConvertOptions {
  /** With a Hugging Face Hub id as `src` ("org/name", or "org/name@rev"): branch, tag or commit. */
  revision?: string;
  dtype?: Dtype;
  maxShardSize?: string;
  overwrite?: boolean;
  dryRun?: boolean;
  quantize?: Partial<QuantizationSpec>;
}

export interface ConvertResult {
  jobId: string;
  dst: string;
  modelType: string;
  dtype: Dtype;
  numTensors: number;
  numParameters: number;
  totalBytes: number;
  shards: ShardInfo[];
  copiedFiles: string[];
  droppedTensors: string[];
  quantization: QuantizationSpec | null;
  quantizedLayers: string[];
  skippedLayers: SkippedLayer[];
  seconds: number;
  peakRssBytes: number;
  dryRun: boolean;
  layerReports: LayerQuantReport[];
  bitsPerWeight: number;
  bytesBefore: number;
  /** Set when the source was a Hugging Face Hub id. */
  hubSource: HubSource | null;
}

/** A Hub id as the daemon resolved it (also recorded in mlxd_manifest.json). */
export interface HubSource {
  repoId: string;
  revision: string;
  commitHash: string;
  path: string;
}

/** A snapshot in the daemon's Hugging Face cache. */
export interface CachedModel {
  repoId: string;
  refs: string[];
  commitHash: string;
  snapshotPath: string;
  modelType: string;
  /** "native", "export" (the torch.export path) or "" (mlxd does not convert it). */
  support: string;
  sizeOnDisk: number;
  complete: boolean;
}

export interface ListCachedModelsResponse {
  cacheDir: string;
  models: CachedModel[];
  offline: boolean;
  nonFinite: NonFiniteTensor[];
}

/** A source tensor holding NaN/Inf values (listed by Convert/Quantize; refused with `strict`). */
export interface NonFiniteTensor {
  name: string;
  nanCount: number;
  infCount: number;
  firstIndex: number[];
  note: string;
}

export interface OutputReport {
  name: string;
  maxAbs: number;
  maxRel: number;
  cosine: number;
  nmse: number;
  atol: number;
  rtol: number;
  passed: boolean;
  note: string;
}

export interface LayerReport {
  name: string;
  relError: number;
  maxAbs: number;
  cosine: number;
  tolerance: number;
  passed: boolean;
  note: string;
}

export interface ValidationReport {
  jobId: string;
  passed: boolean;
  modelType: string;
  dtype: string;
  outputs: OutputReport[];
  /** Absent where nothing was matched (proto3 `optional`): embedding models, decoders, NaN outputs. */
  matchingAgreement?: number;
  numTexts: number;
  numImages: number;
  seconds: number;
  reportPath: string;
  layers: LayerReport[];
  firstDivergentLayer: string;
  band: string;
  referenceHub: HubSource | null;
}

export interface JobInfo {
  jobId: string;
  kind: string;
  state: JobState;
  src: string;
  dst: string;
  createdAtUnix: number;
  startedAtUnix: number;
  finishedAtUnix: number;
  errorCode: string;
  errorReason: string;
  errorMessage: string;
  lastProgress: Progress | null;
  events: number;
}

export interface GetJobResponse {
  job: JobInfo | null;
  convertResult: ConvertResult | null;
  validationReport: ValidationReport | null;
}

/** The wire form of a tensor: a dense little-endian array. */
export interface TensorMessage {
  shape: number[];
  dtype: string;
  data: Buffer;
}

export interface InferResponseMessage {
  model: string;
  textEmbeds: TensorMessage | null;
  imageEmbeds: TensorMessage | null;
  logitsPerImage: TensorMessage | null;
  seconds: number;
  logits: TensorMessage | null;
  labels: string[];
}

export interface ModelInfo {
  id: string;
  modelType: string;
  dtype: string;
  computeDtype: string;
  residentBytes: number;
  loadedAtUnix: number;
  lastUsedUnix: number;
  inferCount: number;
}

export interface Eviction {
  id: string;
  reason: string;
  atUnix: number;
}

export interface ListModelsResponse {
  models: ModelInfo[];
  budgetBytes: number;
  usedBytes: number;
  recentEvictions: Eviction[];
  workerRssBytes: number;
}

export interface LoadModelResponse {
  model: ModelInfo | null;
  evicted: string[];
}

/** Options of GenerateImage (Stable Diffusion); defaults as the daemon's (20 steps, guidance 7.5, one image). */
export interface GenerateImageOptions {
  negativePrompt?: string;
  steps?: number;
  guidance?: number;
  seed?: number;
  width?: number;
  height?: number;
  numImages?: number;
  /** Initial latents, NCHW float32 (diffusers' `latents=`). */
  latents?: { shape: number[]; data: Float32Array };
  /** "" = the pipeline's own; euler, euler_ancestral, ddim, pndm, dpmsolver_multistep. */
  scheduler?: string;
  /** img2img: the encoded init image, and the fraction of the schedule to run. */
  image?: Uint8Array;
  strength?: number;
}

export interface ImageStep {
  step: number;
  total: number;
  seconds: number;
}

export interface GeneratedImage {
  index: number;
  png: Buffer;
  width: number;
  height: number;
}

export interface GenerateImageResult {
  model: string;
  numImages: number;
  width: number;
  height: number;
  steps: number;
  scheduler: string;
  seed: number;
  seconds: number;
  secondsPerStep: number;
  truncated: boolean;
  truncatedText: string;
  negativeTruncated: boolean;
}

/** One event of a GenerateImage stream. */
export type ImageEvent = { step: ImageStep } | { image: GeneratedImage } | { result: GenerateImageResult };

/** One event of a job stream: a progress report, or the job's single result. */
export type JobEvent<R> = { progress: Progress; result?: undefined } | { progress?: undefined; result: R };
