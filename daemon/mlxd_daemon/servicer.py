"""The gRPC servicer: request -> plain call on a worker -> response. The one place where domain errors
become gRPC statuses (with a google.rpc.ErrorInfo detail)."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import grpc
import numpy as np
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from mlxd.v1 import mlxd_pb2 as pb
from mlxd.v1 import mlxd_pb2_grpc as pb_grpc

from mlxd_daemon import PROTOCOL_VERSION, __version__, hub
from mlxd_daemon.archs import architectures
from mlxd_daemon.batching import InferBatcher
from mlxd_daemon.blas import find_blas
from mlxd_daemon.errors import FailedPrecondition, InvalidArgument, MlxdError, NotFound, from_status
from mlxd_daemon.jobs import SUCCEEDED, TERMINAL, Job, JobTable
from mlxd_daemon.messages import (
    DTYPE_NAMES,
    QUANT_MODE_NAMES,
    cached_models,
    convert_result,
    infer_response,
    job_info,
    job_result,
    progress_message,
    validation_report,
)
from mlxd_daemon.quantize import MODES, RECIPES, QuantOptions
from mlxd_daemon.service import Service, generate_args
from mlxd_daemon.workers import WorkerProcess

log = structlog.get_logger()

ERROR_DOMAIN = "mlxd"
PROBE_WAIT_S = 60.0  # Initialize waits this long for the first capabilities probe (the models worker's start-up)


def abort(context: grpc.ServicerContext, err: MlxdError) -> NoReturn:
    """End the RPC with the error's status code and an ErrorInfo(reason, metadata) detail."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata))
    status = status_pb2.Status(code=code_pb2.Code.Value(err.code), message=err.message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("unreachable: abort_with_status raises")


def enum_name(context: grpc.ServicerContext, table: Mapping[Any, str], value: int, field: str) -> str:
    """The name of an enum value; INVALID_ARGUMENT for a number this daemon does not know."""
    if value not in table:
        msg = f"{field}={value} is not a known value; this daemon knows {sorted(table)}"
        abort(context, InvalidArgument(msg, reason="BAD_ENUM", field=field, value=value))
    return table[value]


def quant_options(context: grpc.ServicerContext, spec: pb.QuantizationSpec, field: str) -> QuantOptions:
    """A request's QuantizationSpec as the one value the worker's convert/quantize take (0 = the mode's default)."""
    return QuantOptions(
        bits=spec.bits,
        group_size=spec.group_size,
        mode=enum_name(context, QUANT_MODE_NAMES, spec.mode, f"{field}.mode"),
        overrides=tuple(spec.overrides),
        recipe=spec.recipe,
        method=spec.method or "rtn",
        calibration_data=spec.calibration_data or None,
        calibration_seed=spec.calibration_seed,
    )


class MlxdServicer(pb_grpc.MlxdServicer):
    def __init__(
        self,
        jobs_worker: WorkerProcess,
        models_worker: WorkerProcess,
        address: str,
        request_shutdown: Callable[[], None],
        jobs: JobTable | None = None,
        allowed_roots: tuple[str, ...] = (),
        batcher: InferBatcher | None = None,
        offline: bool = False,
        allow_hub_cache: bool = False,
        max_generations: int = 64,
    ) -> None:
        self.jobs_worker = jobs_worker
        self.models_worker = models_worker
        self.jobs = jobs or JobTable()
        self.batcher = batcher or InferBatcher(models_worker)
        self.service = Service(
            models_worker,
            self.batcher,
            self.jobs,
            allowed_roots,
            offline=offline,
            allow_hub_cache=allow_hub_cache,
            max_generations=max_generations,
        )
        self.http_address = ""  # set by the daemon when it serves the OpenAI-compatible HTTP front
        self.address = address
        self.started_at = time.time()
        self.request_shutdown = request_shutdown
        self._quant_support: dict[str, str | None] | None = None  # mode -> why unsupported (None: supported)
        self._probed = threading.Event()
        self._probing = threading.Lock()

    def probe_capabilities(self) -> None:
        """Ask the models worker (starting it) which quantization modes its MLX backend runs; once per daemon."""
        with self._probing:
            if self._probed.is_set():
                return
            try:
                self._quant_support = self.models_worker.call("capabilities", {})
            except MlxdError as e:
                log.warning("capabilities_probe_failed", error=e.message)
            self._probed.set()

    def _capabilities(self) -> pb.Capabilities:
        """From the tables the code uses: quantize.MODES, filtered by what the backend was probed to run."""
        if not self._probed.is_set():
            threading.Thread(target=self.probe_capabilities, daemon=True).start()
            self._probed.wait(PROBE_WAIT_S)
        support = self._quant_support
        if support is None:  # the probe failed or is late: the table, unfiltered (logged)
            log.warning("capabilities_unprobed")
        modes = [m for m in MODES if support is None or support.get(m) is None]
        enums = {name: num for num, name in QUANT_MODE_NAMES.items() if num != pb.QUANT_MODE_UNSPECIFIED}
        details = [
            pb.QuantModeCapability(mode=enums[m], bits=MODES[m][0], group_sizes=MODES[m][1],
                                   default_bits=MODES[m][2][0], default_group_size=MODES[m][2][1])
            for m in modes
        ]  # fmt: skip
        return pb.Capabilities(
            architectures=architectures(),
            dtypes=list(DTYPE_NAMES),
            quant_modes=[enums[m] for m in modes],
            quant_bits=sorted({b for m in modes for b in MODES[m][0]}),
            quant_group_sizes=sorted({g for m in modes for g in MODES[m][1]}),
            quant_recipes=list(RECIPES),
            quant_mode_details=details,
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def Initialize(self, request: pb.InitializeRequest, context: grpc.ServicerContext) -> pb.InitializeResponse:
        if request.protocol_version and request.protocol_version != PROTOCOL_VERSION:
            abort(
                context,
                FailedPrecondition(
                    f"client speaks protocol {request.protocol_version}, this daemon {PROTOCOL_VERSION} "
                    f"(mlxd {__version__}): restart the daemon from the client's installation",
                    reason="PROTOCOL_MISMATCH",
                    daemon_protocol=PROTOCOL_VERSION,
                ),
            )
        caps = self._capabilities()
        return pb.InitializeResponse(
            protocol_version=PROTOCOL_VERSION,
            daemon_version=__version__,
            capabilities=caps,
            pid=os.getpid(),
            address=self.address,
            started_at_unix=self.started_at,
            blas=find_blas(),
            http_address=self.http_address,
        )

    def Shutdown(self, request: pb.ShutdownRequest, context: grpc.ServicerContext) -> pb.ShutdownResponse:
        self.request_shutdown()
        return pb.ShutdownResponse()

    # -- jobs ------------------------------------------------------------------------------------
    def Convert(self, request: pb.ConvertRequest, context: grpc.ServicerContext) -> Iterator[pb.ConvertResponse]:
        args: dict[str, Any] = {
            "src": request.src,
            "dst": request.dst,
            "dtype": enum_name(context, DTYPE_NAMES, request.dtype, "dtype"),
            "overwrite": request.overwrite,
            "dry_run": request.dry_run,
            "hub": self._hub_args(context, request.src, request.revision),
            "strict": request.strict,
        }
        if request.max_shard_size:
            args["max_shard_size"] = request.max_shard_size
        if request.input_spec:
            args["input_spec"] = request.input_spec
        if request.HasField("quantize"):
            args["quantize"] = quant_options(context, request.quantize, "quantize")
        self._require_paths(context, *([] if args["hub"] else [request.src]), request.dst)
        for kind, value in self._run_job("convert", args, context):
            yield pb.ConvertResponse(**{kind: value if kind == "progress" else convert_result(value)})

    def Quantize(self, request: pb.QuantizeRequest, context: grpc.ServicerContext) -> Iterator[pb.QuantizeResponse]:
        args = {
            "src": request.src,
            "dst": request.dst,
            "overwrite": request.overwrite,
            "quantize": quant_options(context, request.spec, "spec"),
            "dequantize": request.dequantize,
            "dtype": enum_name(context, DTYPE_NAMES, request.dtype, "dtype"),
            "hub": self._hub_args(context, request.src, request.revision),
            "strict": request.strict,
        }
        self._require_paths(context, *([] if args["hub"] else [request.src]), request.dst)
        for kind, value in self._run_job("quantize", args, context):
            yield pb.QuantizeResponse(**{kind: value if kind == "progress" else convert_result(value)})

    def Validate(self, request: pb.ValidateRequest, context: grpc.ServicerContext) -> Iterator[pb.ValidateResponse]:
        args = {
            "model_dir": request.model_dir,
            "reference": request.reference,
            "texts": list(request.texts),
            "images": list(request.images),
            "inputs_npz": request.inputs_npz,
            "hub": self._hub_args(context, request.reference, request.reference_revision),
        }
        self._require_paths(context, request.model_dir, *([] if args["hub"] else [request.reference]))
        for kind, value in self._run_job("validate", args, context):
            if kind == "result":
                value = validation_report(value, request.model_dir)
            yield pb.ValidateResponse(**{kind: value})

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(cancelled=self.jobs.cancel(self._job(context, request.job_id)))

    def _hub_args(self, context: grpc.ServicerContext, source: str, revision: str) -> dict[str, Any] | None:
        try:
            return self.service.hub_args(source, revision)
        except MlxdError as e:
            abort(context, e)

    def _require_paths(self, context: grpc.ServicerContext, *paths: str) -> None:
        try:
            self.service.check_paths(*paths)
        except MlxdError as e:
            abort(context, e)

    def _run_job(self, kind: str, args: dict[str, Any], context: grpc.ServicerContext) -> Iterator[tuple[str, Any]]:
        """Start a job on the jobs worker; yield ("progress", Progress) events then ("result", dict)."""
        src = args.get("src") or args.get("reference", "")
        dst = args.get("dst") or args.get("model_dir", "")
        try:
            job = self.jobs.create(kind, src, dst)
        except MlxdError as e:
            abort(context, e)
        structlog.contextvars.bind_contextvars(job=job.id)
        context.set_trailing_metadata((("mlxd-job-id", job.id),))
        threading.Thread(target=self._execute, args=(job, args), name=f"job-{job.id}", daemon=True).start()
        yield from self._follow(job, 0, context)

    def _execute(self, job: Job, args: dict[str, Any]) -> None:
        try:
            result = self.jobs_worker.call(
                job.kind,
                args,
                on_event=lambda e: self.jobs.event(job, e),
                is_cancelled=job.is_cancelled,
                on_start=lambda: self.jobs.start(job, self.jobs_worker),
            )
            self.jobs.succeed(job, {**result, "job_id": job.id})
        except MlxdError as e:
            self.jobs.fail(job, e)
        except Exception as e:  # never leave a job without a terminal state
            log.error("job_crashed", job=job.id, error=repr(e))
            self.jobs.fail(job, MlxdError(f"internal error: {type(e).__name__}: {e}", reason="INTERNAL"))

    def _follow(self, job: Job, from_seq: int, context: grpc.ServicerContext) -> Iterator[tuple[str, Any]]:
        """Relay a job's events to one RPC. A dropped stream leaves the job running; a deadline cancels it."""

        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining

        def detach() -> None:
            if deadline is not None and time.monotonic() >= deadline - 0.1 and job.state not in TERMINAL:
                log.info("job_deadline_exceeded", job=job.id)
                self.jobs.cancel(job)

        try:
            for event in self.jobs.watch(job, from_seq):
                if not context.is_active():
                    detach()
                    return
                if event is not None:
                    yield "progress", progress_message(job, event)
        except GeneratorExit:  # gRPC dropped the stream (client gone or deadline passed)
            detach()
            raise
        if job.state == SUCCEEDED:
            yield "result", job.result
        else:
            error = job.error or {"code": "INTERNAL", "reason": "INTERNAL", "message": "job ended without a result"}
            abort(context, from_status(error["code"], error["message"], error["reason"], error.get("metadata")))

    def _job(self, context: grpc.ServicerContext, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            abort(
                context, NotFound(f"no job {job_id!r}; mlxctl jobs lists them", reason="JOB_NOT_FOUND", job_id=job_id)
            )
        return job

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[job_info(j) for j in self.jobs.newest_first()])

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        job = self._job(context, request.job_id)
        reply = pb.GetJobResponse(job=job_info(job))
        if job.state == SUCCEEDED and job.result is not None:
            reply.MergeFrom(pb.GetJobResponse(**job_result(job)))
        return reply

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchJobResponse]:
        job = self._job(context, request.job_id)
        for kind, value in self._follow(job, request.from_seq, context):
            yield pb.WatchJobResponse(progress=value) if kind == "progress" else pb.WatchJobResponse(**job_result(job))

    # -- models ----------------------------------------------------------------------------------
    def _models_call(self, context: grpc.ServicerContext, op: str, args: dict[str, Any]) -> Any:
        try:
            return self.service.call(op, args)
        except MlxdError as e:
            abort(context, e)

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferResponse:
        self._require_paths(context, request.model)
        if request.inputs:  # named tensors: an exported program, or an architecture's preprocessed inputs; unbatched
            if request.texts or request.images:
                msg = "send texts/images or named tensors (`inputs`), not both in one request"
                abort(context, InvalidArgument(msg, reason="MIXED_INPUTS"))
            inputs = {name: numpy_of(context, name, t) for name, t in request.inputs.items()}
            return infer_response(self._models_call(context, "run", {"model": request.model, "inputs": inputs}))
        try:
            reply = self.service.infer(request.model, list(request.texts), list(request.images))
        except MlxdError as e:
            abort(context, e)
        return infer_response(reply)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        args = generate_args(
            request.model, request.prompt, [{"role": m.role, "content": m.content} for m in request.messages],
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, seed=request.seed,
            stop=list(request.stop),
        )  # fmt: skip
        for kind, value in self._stream(self.service.generate, args, context):
            if kind == "token":
                yield pb.GenerateResponse(token=pb.GeneratedToken(token_id=value["token_id"], text=value["text"]))
            else:
                yield pb.GenerateResponse(result=pb.GenerateResult(**value))

    def GenerateImage(
        self, request: pb.GenerateImageRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateImageResponse]:
        args = {
            "model": request.model, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "steps": request.steps or 20, "guidance": request.guidance if request.HasField("guidance") else 7.5,
            "seed": request.seed, "width": request.width, "height": request.height,
            "num_images": request.num_images or 1, "scheduler": request.scheduler,
            "latents": numpy_of(context, "latents", request.latents) if request.HasField("latents") else None,
            "image": request.image or None, "strength": request.strength or 0.8,
        }  # fmt: skip
        for kind, value in self._stream(self.service.generate_image, args, context):
            if kind == "step":
                step = pb.ImageStep(step=value["step"], total=value["total"], seconds=value["seconds"])
                yield pb.GenerateImageResponse(step=step)
                continue
            for i, png in enumerate(value.pop("images")):
                image = pb.GeneratedImage(index=i, png=png, width=value["width"], height=value["height"])
                yield pb.GenerateImageResponse(image=image)
            yield pb.GenerateImageResponse(result=pb.GenerateImageResult(**value))

    def _stream(self, start: Callable[..., Any], args: dict[str, Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """(kind, value) events of a streamed worker call ``start(args, sink)`` up to and including ("result", r);
        an error aborts the RPC, a client that goes away cancels the call between its steps."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        try:
            generation = start(args, lambda kind, value: events.put((kind, value)))
        except MlxdError as e:
            abort(context, e)
        try:
            while True:
                try:
                    kind, value = events.get(timeout=0.25)
                except queue.Empty:
                    if not context.is_active():
                        raise GeneratorExit from None
                    continue
                if kind == "error":
                    abort(context, value)
                yield kind, value
                if kind == "result":
                    return
        except GeneratorExit:  # the client went away: stop generating for nobody
            generation.cancel()
            raise

    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> pb.LoadModelResponse:
        self._require_paths(context, request.path, *([request.hosts_file] if request.hosts_file else []))
        args = {"path": request.path, "keep_alive": request.keep_alive_seconds or None,
                "tensor_parallel": request.tensor_parallel, "hosts_file": request.hosts_file}  # fmt: skip
        reply = self._models_call(context, "load", args)
        return pb.LoadModelResponse(model=pb.ModelInfo(**reply["model"]), evicted=reply["evicted"])

    def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.ServicerContext) -> pb.UnloadModelResponse:
        return pb.UnloadModelResponse(freed_bytes=self._models_call(context, "unload", {"id": request.id}))

    def ListCachedModels(
        self, request: pb.ListCachedModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListCachedModelsResponse:
        try:
            listing = self.service.cached_models()
        except MlxdError as e:
            abort(context, e)
        return cached_models(listing, hub.downloads_disabled(self.service.offline))

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        reply = self._models_call(context, "list", {})
        return pb.ListModelsResponse(
            models=[pb.ModelInfo(**m) for m in reply["models"]],
            budget_bytes=reply["budget_bytes"],
            used_bytes=reply["used_bytes"],
            recent_evictions=[pb.Eviction(**e) for e in reply["recent_evictions"]],
            worker_rss_bytes=reply["worker_rss_bytes"],
        )


def numpy_of(context: grpc.ServicerContext, name: str, t: pb.Tensor) -> np.ndarray:
    """A wire Tensor as a numpy array; INVALID_ARGUMENT when dtype, shape and byte count disagree."""
    try:
        dtype = np.dtype(t.dtype).newbyteorder("<")
        return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))
    except (TypeError, ValueError) as e:
        msg = f"input {name!r}: {len(t.data)} bytes of {t.dtype!r} do not make shape {list(t.shape)}: {e}"
        abort(context, InvalidArgument(msg, reason="BAD_TENSOR", input=name))
