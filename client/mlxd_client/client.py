"""Typed Python client over the generated stubs: progress as iterators, errors as exceptions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from mlxd.v1 import mlxd_pb2 as pb
from mlxd.v1 import mlxd_pb2_grpc as pb_grpc

from mlxd_client import discovery
from mlxd_client.errors import FailedPreconditionError, from_rpc_error
from mlxd_client.wire import (
    DTYPES,
    enum_value,
    image_bytes,
    numpy_to_tensor,
    quant_spec,
    source_arg,
    tensor_to_numpy,
    top_k,
)

PROTOCOL_VERSION = 1
CLIENT_VERSION = "0.1.0"

Result = TypeVar("Result")
ProgressCallback = Callable[[pb.Progress], None]


@dataclass(frozen=True)
class InferResult:
    model: str
    text_embeds: np.ndarray
    image_embeds: np.ndarray
    logits_per_image: np.ndarray
    seconds: float
    logits: np.ndarray
    labels: list[str]
    batch_requests: int = 1
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # an exported program's, or those with no field

    def top_k(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """Classifiers: per input, the ``k`` most probable labels with their softmax probabilities, best first."""
        return top_k(self.logits, self.labels, k)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every non-empty output by name: the fields above, then ``outputs``."""
        fields = {"text_embeds": self.text_embeds, "image_embeds": self.image_embeds,
                  "logits_per_image": self.logits_per_image, "logits": self.logits}  # fmt: skip
        return {k: v for k, v in fields.items() if v.size} | self.outputs


class Client:
    """A connection to one mlxd daemon. Starts the daemon if none answers and ``autostart`` is set."""

    def __init__(
        self,
        address: str | None = None,
        *,
        autostart: bool = True,
        handshake: bool = True,
        timeout: float | None = None,
        token: str | None = None,
        tls_ca: bytes | None = None,
    ) -> None:
        self.address = address or discovery.default_address()
        if autostart:
            discovery.ensure_daemon(self.address)
        self._channel = discovery.open_channel(self.address, tls_ca)  # TLS when a CA is given or $MLXD_TLS_CA
        self._stub = pb_grpc.MlxdStub(self._channel)
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else discovery.call_metadata()
        self.server_info: pb.InitializeResponse | None = None
        if handshake:
            self.server_info = self.initialize()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        try:
            for response in method(request, timeout=self._timeout, metadata=self._metadata):
                yield getattr(response, response.WhichOneof("event"))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    @staticmethod
    def _drain(events: Iterable[Any], on_progress: ProgressCallback | None) -> Any:
        result = None
        for event in events:
            if isinstance(event, pb.Progress | pb.GeneratedToken):
                if on_progress and isinstance(event, pb.Progress):
                    on_progress(event)
            else:
                result = event
        return result

    # -- lifecycle -------------------------------------------------------------------------------
    def initialize(self) -> pb.InitializeResponse:
        """Version handshake; raises FailedPreconditionError when the daemon speaks another protocol."""
        reply: pb.InitializeResponse = self._unary(
            self._stub.Initialize,
            pb.InitializeRequest(
                protocol_version=PROTOCOL_VERSION, client_name="mlxd_client", client_version=CLIENT_VERSION
            ),
        )
        if reply.protocol_version != PROTOCOL_VERSION:
            msg = (
                f"daemon at {self.address} speaks protocol {reply.protocol_version}, this client "
                f"{PROTOCOL_VERSION}: restart the daemon (mlxctl daemon stop) or upgrade the client"
            )
            raise FailedPreconditionError("FAILED_PRECONDITION", msg, "PROTOCOL_MISMATCH")
        return reply

    def shutdown(self) -> None:
        self._unary(self._stub.Shutdown, pb.ShutdownRequest())

    # -- jobs ------------------------------------------------------------------------------------
    def convert_events(
        self,
        src: str | Path,
        dst: str | Path,
        *,
        dtype: str = "auto",
        max_shard_size: str = "",
        overwrite: bool = False,
        dry_run: bool = False,
        q_bits: int = 0,
        q_group_size: int = 0,
        q_mode: str = "affine",
        q_overrides: Iterable[str] = (),
        q_recipe: str = "",
        q_method: str = "",
        q_calibration_data: str | Path = "",
        q_calibration_seed: int = 0,
        revision: str = "",
        strict: bool = False,
        input_spec: str = "",
    ) -> Iterator[pb.Progress | pb.ConvertResult]:
        """Stream Convert: Progress events, then one ConvertResult.

        ``src`` is a checkpoint directory, or a Hugging Face Hub id ``org/name[@revision]`` (also ``revision``)
        that the daemon resolves from its cache, or downloads when it may.

        ``q_bits`` > 0 (or a non-affine ``q_mode``, or a ``q_recipe``) quantizes; a 0 bits/group size means the
        mode's default. ``input_spec`` (exported programs): JSON list of example inputs by name that replace or
        add to the ones derived from the model. ``q_overrides``: ``PATTERN=BITS[:GROUP]`` or ``PATTERN=skip`` on
        module paths.
        ``q_method``: rtn (default), awq or gptq, calibrated on ``q_calibration_data`` (text file, image folder or
        .npz; default: the architecture's built-in set drawn with ``q_calibration_seed``). Source tensors holding
        NaN/Inf are listed in the result's ``non_finite``; with ``strict`` they refuse the conversion
        (``InvalidArgumentError``, reason NON_FINITE_WEIGHTS).
        """
        request = pb.ConvertRequest(
            src=source_arg(src),
            revision=revision,
            dst=str(Path(dst).resolve()),
            dtype=enum_value(DTYPES, dtype, "dtype"),
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            dry_run=dry_run,
            strict=strict,
            input_spec=input_spec,
        )
        if q_bits or q_mode != "affine" or q_recipe:
            calibration = (q_method, q_calibration_data, q_calibration_seed)
            request.quantize.CopyFrom(quant_spec(q_bits, q_group_size, q_mode, q_overrides, q_recipe, *calibration))
        return self._stream(self._stub.Convert, request)

    def convert(
        self, src: str | Path, dst: str | Path, *, on_progress: ProgressCallback | None = None, **options: Any
    ) -> pb.ConvertResult:
        """Convert a Hugging Face checkpoint directory to an MLX model directory."""
        return self._drain(self.convert_events(src, dst, **options), on_progress)

    def quantize_events(
        self,
        src: str | Path,
        dst: str | Path,
        *,
        bits: int = 0,
        group_size: int = 0,
        mode: str = "affine",
        overrides: Iterable[str] = (),
        recipe: str = "",
        overwrite: bool = False,
        dequantize: bool = False,
        dtype: str = "auto",
        q_method: str = "",
        q_calibration_data: str | Path = "",
        q_calibration_seed: int = 0,
        revision: str = "",
        strict: bool = False,
    ) -> Iterator[pb.Progress | pb.ConvertResult]:
        """Stream Quantize on an MLX directory (0 bits/group size = the mode's default, affine 4-bit g64).

        With ``dequantize`` the reverse: a quantized MLX directory back to float ``dtype`` (spec ignored).
        ``strict``: refuse weights holding NaN/Inf (NON_FINITE_WEIGHTS) instead of listing them.
        """
        request = pb.QuantizeRequest(
            src=source_arg(src),
            revision=revision,
            dst=str(Path(dst).resolve()),
            spec=quant_spec(
                bits, group_size, mode, overrides, recipe, q_method, q_calibration_data, q_calibration_seed
            ),
            overwrite=overwrite,
            dequantize=dequantize,
            dtype=enum_value(DTYPES, dtype, "dtype"),
            strict=strict,
        )
        return self._stream(self._stub.Quantize, request)

    def quantize(
        self, src: str | Path, dst: str | Path, *, on_progress: ProgressCallback | None = None, **options: Any
    ) -> pb.ConvertResult:
        """Quantize an MLX model directory into a new directory."""
        return self._drain(self.quantize_events(src, dst, **options), on_progress)

    def validate_events(
        self,
        model_dir: str | Path,
        reference: str | Path,
        *,
        texts: Iterable[str] = (),
        images: Iterable[bytes | str | Path] = (),
        inputs_npz: bytes | str | Path | None = None,
        reference_revision: str = "",
    ) -> Iterator[pb.Progress | pb.ValidationReport]:
        """Stream Validate; ``inputs_npz`` (a path or bytes) replaces prepared inputs of the same names.

        ``reference`` may be a Hugging Face Hub id (``org/name[@revision]``, or ``reference_revision``)."""
        request = pb.ValidateRequest(
            model_dir=str(Path(model_dir).resolve()),
            reference=source_arg(reference),
            reference_revision=reference_revision,
            texts=list(texts),
            images=[image_bytes(i) for i in images],
            inputs_npz=image_bytes(inputs_npz) if inputs_npz is not None else b"",
        )
        return self._stream(self._stub.Validate, request)

    def validate(
        self,
        model_dir: str | Path,
        reference: str | Path,
        *,
        on_progress: ProgressCallback | None = None,
        **options: Any,
    ) -> pb.ValidationReport:
        """Run the PyTorch reference and the MLX model on the same inputs and compare them."""
        return self._drain(self.validate_events(model_dir, reference, **options), on_progress)

    def list_jobs(self) -> list[pb.JobInfo]:
        """Jobs the daemon remembers (also across restarts), newest first."""
        return list(self._unary(self._stub.ListJobs, pb.ListJobsRequest()).jobs)

    def get_job(self, job_id: str) -> pb.GetJobResponse:
        return self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))

    def watch_job(self, job_id: str, from_seq: int = 0) -> Iterator[Any]:
        """Re-attach to a job: its Progress events from ``from_seq``, then its result (or its error)."""
        return self._stream(self._stub.WatchJob, pb.WatchJobRequest(job_id=job_id, from_seq=from_seq))

    def cancel_job(self, job_id: str) -> bool:
        return bool(self._unary(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id)).cancelled)

    # -- models ----------------------------------------------------------------------------------
    def infer(
        self,
        model: str | Path,
        *,
        texts: Iterable[str] = (),
        images: Iterable[bytes | str | Path] = (),
        inputs: Mapping[str, Any] | None = None,
    ) -> InferResult:
        """Embed texts and images with a resident model (loaded on first use), or instead of them preprocessed
        ``inputs`` by name (numpy arrays, or anything ``np.asarray`` takes): ``input_ids``, ``attention_mask``,
        ``pixel_values``, ... as Hugging Face's processors give them (``InferRequest.inputs`` in the proto)."""
        tensors = {k: numpy_to_tensor(np.asarray(v)) for k, v in (inputs or {}).items()}
        request = pb.InferRequest(
            model=str(Path(model).resolve()), texts=list(texts), images=[image_bytes(i) for i in images], inputs=tensors
        )
        reply: pb.InferResponse = self._unary(self._stub.Infer, request)
        return InferResult(
            reply.model,
            tensor_to_numpy(reply.text_embeds),
            tensor_to_numpy(reply.image_embeds),
            tensor_to_numpy(reply.logits_per_image),
            reply.seconds,
            tensor_to_numpy(reply.logits),
            list(reply.labels),
            reply.batch_requests,
            {name: tensor_to_numpy(t) for name, t in reply.outputs.items()},
        )

    def run(self, model: str | Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named tensors through an exported program (``mlxd_program``); its named outputs."""
        return self.infer(model, inputs=inputs).outputs

    def generate_events(
        self,
        model: str | Path,
        prompt: str = "",
        *,
        messages: Iterable[dict[str, str]] = (),
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Iterable[str] = (),
    ) -> Iterator[pb.GeneratedToken | pb.GenerateResult]:
        """Stream generated tokens, then one GenerateResult (text, finish reason, tokens/s).

        ``stop`` strings end the text just before the first one. Closing the iterator early cancels the
        generation on the daemon."""
        request = pb.GenerateRequest(
            model=str(Path(model).resolve()), prompt=prompt, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, seed=seed, messages=[pb.ChatMessage(**m) for m in messages], stop=list(stop),
        )  # fmt: skip
        return self._stream(self._stub.Generate, request)

    def generate(self, model: str | Path, prompt: str = "", **options: Any) -> pb.GenerateResult:
        """Generate text and return the result (tokens are consumed silently)."""
        return self._drain(self.generate_events(model, prompt, **options), None)

    def generate_image_events(
        self,
        model: str | Path,
        prompt: str,
        *,
        negative_prompt: str = "",
        steps: int = 20,
        guidance: float = 7.5,
        seed: int = 0,
        width: int = 0,
        height: int = 0,
        num_images: int = 1,
        latents: np.ndarray | None = None,
        scheduler: str = "",
        image: bytes | str | Path | None = None,
        strength: float = 0.8,
    ) -> Iterator[pb.ImageStep | pb.GeneratedImage | pb.GenerateImageResult]:
        """Stream Stable Diffusion: an ImageStep per denoising step, one GeneratedImage (PNG) per image, then the
        GenerateImageResult. ``latents``: initial latents NCHW float32 (diffusers' ``latents=``); ``image`` (+
        ``strength``) makes it img2img. Closing the iterator early cancels between steps."""
        request = pb.GenerateImageRequest(
            model=str(Path(model).resolve()), prompt=prompt, negative_prompt=negative_prompt, steps=steps,
            guidance=guidance, seed=seed, width=width, height=height, num_images=num_images, scheduler=scheduler,
            strength=strength, image=image_bytes(image) if image is not None else b"",
        )  # fmt: skip
        if latents is not None:
            request.latents.CopyFrom(numpy_to_tensor(np.asarray(latents, dtype=np.float32)))
        return self._stream(self._stub.GenerateImage, request)

    def generate_image(
        self, model: str | Path, prompt: str, **options: Any
    ) -> tuple[list[bytes], pb.GenerateImageResult]:
        """Generate images; returns the PNG bytes of each image and the result."""
        images: list[bytes] = []
        result = None
        for event in self.generate_image_events(model, prompt, **options):
            if isinstance(event, pb.GeneratedImage):
                images.append(event.png)
            elif isinstance(event, pb.GenerateImageResult):
                result = event
        assert result is not None, "the stream ended without a result"
        return images, result

    def load_model(
        self, path: str | Path, keep_alive: float = 0.0, tensor_parallel: int = 0, hosts_file: str | Path = ""
    ) -> pb.LoadModelResponse:
        """Load a model and keep it resident; ``keep_alive`` seconds protect it from budget eviction.

        ``tensor_parallel`` N >= 2 splits a decoder over N rank processes (on the hosts of ``hosts_file``)."""
        request = pb.LoadModelRequest(
            path=str(Path(path).resolve()),
            keep_alive_seconds=keep_alive,
            tensor_parallel=tensor_parallel,
            hosts_file=str(Path(hosts_file).resolve()) if hosts_file else "",
        )
        return self._unary(self._stub.LoadModel, request)

    def unload_model(self, model_id: str | Path) -> pb.UnloadModelResponse:
        return self._unary(self._stub.UnloadModel, pb.UnloadModelRequest(id=str(Path(model_id).resolve())))

    def list_cached_models(self) -> pb.ListCachedModelsResponse:
        """Models in the daemon's Hugging Face cache, each with its model_type and how mlxd would convert it."""
        return self._unary(self._stub.ListCachedModels, pb.ListCachedModelsRequest())

    def list_models(self) -> pb.ListModelsResponse:
        return self._unary(self._stub.ListModels, pb.ListModelsRequest())
