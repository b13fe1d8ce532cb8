"""Models kept resident in the models worker, under a memory budget with least-recently-used eviction."""

from __future__ import annotations

import gc
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from mlxd_daemon.archs import get_arch
from mlxd_daemon.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = structlog.get_logger()


@dataclass
class Resident:
    id: str
    model_type: str
    bundle: Any
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    infer_count: int = 0
    keep_alive: float = 0.0  # seconds after last use during which the budget may not evict it
    warmup_seconds: float = 0.0  # compiling the served graphs at load

    def pinned(self, now: float) -> bool:
        return now - self.last_used < self.keep_alive

    def info(self) -> dict[str, Any]:
        parallel = self.bundle.info() if hasattr(self.bundle, "ranks") else {}
        return {
            "id": self.id,
            "model_type": self.model_type,
            "dtype": str(getattr(self.bundle, "dtype", "")),
            "compute_dtype": str(getattr(self.bundle, "compute_dtype", "float32")),
            "resident_bytes": int(self.bundle.nbytes),
            "loaded_at_unix": self.loaded_at,
            "last_used_unix": self.last_used,
            "infer_count": self.infer_count,
            "warmup_seconds": self.warmup_seconds,
            "tensor_parallel": parallel.get("tensor_parallel", 0),
            "tensor_parallel_backend": parallel.get("backend", ""),
            "ranks": parallel.get("ranks", []),
            "total_parameters": int(getattr(self.bundle, "total_parameters", 0)),
            "active_parameters": int(getattr(self.bundle, "active_parameters", 0)),
        }


CACHE_LIMIT_BYTES = 1 << 30


def configure_mlx_for_inference(cache_bytes: int = CACHE_LIMIT_BYTES, memory_limit: int | None = None) -> None:
    """Let MLX keep freed activation buffers for reuse. With its small default cache every op's output was a
    fresh allocation: ~6000 page faults per [400, 3072] activation, which made CLIP's MLP 2x slower.
    On a GPU, also cap MLX's memory at the budget: its CUDA allocator uses managed memory."""
    import mlx.core as mx

    mx.set_cache_limit(cache_bytes)
    if memory_limit and mx.default_device() == mx.gpu:
        mx.set_memory_limit(memory_limit)


def read_model_type(model_dir: Path) -> str:
    """The ``model_type`` of an MLX or HF model directory, with clear errors for what is missing."""
    if not model_dir.is_dir():
        msg = f"model directory {model_dir} does not exist"
        raise NotFound(msg, reason="MODEL_NOT_FOUND", path=model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        msg = f"{model_dir} has no config.json: is it a model directory written by mlxctl convert?"
        raise InvalidArgument(msg, reason="NO_CONFIG", path=model_dir)
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        msg = f"{config} is not valid JSON: {e}"
        raise InvalidArgument(msg, reason="BAD_CONFIG", path=config) from None
    if not model_type:
        msg = f"{config} has no model_type"
        raise InvalidArgument(msg, reason="BAD_CONFIG", path=config)
    return str(model_type)


class Residency:
    """Loaded models by id (the resolved directory), most recently used last."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.models: OrderedDict[str, Resident] = OrderedDict()
        self.evictions: list[dict[str, Any]] = []  # the last few, so clients can see why a model went away

    @property
    def used_bytes(self) -> int:
        return sum(int(r.bundle.nbytes) for r in self.models.values())

    def get(
        self, path: str, keep_alive: float | None = None, tensor_parallel: int | None = None, hosts_file: str = ""
    ) -> tuple[Resident, list[str]]:
        """The resident model for ``path``, loading it (and evicting others) if needed.

        ``tensor_parallel`` (N >= 2, or a ``hosts_file``) loads it split over N ranks; a resident model split
        another way is reloaded. ``None``: whatever is resident (a plain load otherwise)."""
        model_id = str(Path(path).resolve())
        resident = self.models.get(model_id)
        if resident is not None and (tensor_parallel is not None or hosts_file):
            from mlxd_daemon.tensor_parallel import hostfile_size

            wanted = hostfile_size(hosts_file) if hosts_file else max(tensor_parallel or 1, 1)
            if wanted != getattr(resident.bundle, "tensor_parallel", 1):
                self.unload(model_id, reason=f"reloaded with tensor_parallel {wanted}")
        if model_id in self.models:
            self.models.move_to_end(model_id)
            if keep_alive is not None:
                self.models[model_id].keep_alive = keep_alive
            return self.models[model_id], []
        bundle: Any  # each kind of model has its own class; Resident duck-types them
        if (Path(model_id) / "model_index.json").is_file():  # a converted diffusion pipeline
            from mlxd_daemon.pipelines import sd

            model_type, bundle = "stable_diffusion", sd.load(Path(model_id))
        elif (tensor_parallel or 0) > 1 or hosts_file:
            from mlxd_daemon.tensor_parallel import TensorParallelModel

            model_type = read_model_type(Path(model_id))
            bundle = TensorParallelModel(Path(model_id), tensor_parallel or 0, hosts_file or None)
        else:
            model_type = read_model_type(Path(model_id))
            bundle = get_arch(model_type).load(Path(model_id))
        need = int(bundle.nbytes)
        if need > self.budget_bytes:
            _release(bundle)
            msg = (
                f"{model_id} needs {need} bytes resident, more than the whole budget of {self.budget_bytes}; "
                "quantize it or start mlxd with a larger --memory-budget"
            )
            raise ResourceExhausted(msg, reason="MODEL_TOO_LARGE", need=need, budget=self.budget_bytes)
        evicted = []
        while self.used_bytes + need > self.budget_bytes:
            now = time.time()
            victim = next((m for m, r in self.models.items() if not r.pinned(now)), None)  # least recently used
            if victim is None:
                _release(bundle)
                msg = (f"{model_id} needs {need} bytes but the budget is held by models within their keep-alive; "
                       "unload one or retry later")  # fmt: skip
                raise ResourceExhausted(msg, reason="BUDGET_PINNED", need=need, budget=self.budget_bytes)
            self.unload(victim, reason="memory_budget")
            evicted.append(victim)
        warm_up = getattr(bundle, "warm_up", None)  # the first request should not pay for tracing and compiling
        warmup = float(warm_up()) if warm_up is not None else 0.0
        self.models[model_id] = Resident(model_id, model_type, bundle, keep_alive=keep_alive or 0.0,
                                         warmup_seconds=warmup)  # fmt: skip
        log.info("model_loaded", model=model_id, bytes=need, evicted=evicted, warmup_seconds=round(warmup, 3))
        return self.models[model_id], evicted

    def unload(self, model_id: str, reason: str = "requested") -> int:
        """Drop a model and return the memory it held; raises FailedPrecondition if it is not resident."""
        model_id = str(Path(model_id).resolve())
        resident = self.models.pop(model_id, None)
        if resident is None:
            msg = f"{model_id} is not loaded; mlxctl models lists what is"
            raise FailedPrecondition(msg, reason="MODEL_NOT_LOADED", model=model_id)
        freed = int(resident.bundle.nbytes)
        _release(resident.bundle)
        del resident
        import mlx.core as mx

        mx.clear_cache()  # return MLX's buffer cache to the system, not just to MLX
        log.info("model_unloaded", model=model_id, bytes=freed, reason=reason)
        self.evictions = [*self.evictions[-19:], {"id": model_id, "reason": reason, "at_unix": time.time()}]
        return freed

    def snapshot(self) -> dict[str, Any]:
        return {
            "models": [r.info() for r in self.models.values()],
            "budget_bytes": self.budget_bytes,
            "used_bytes": self.used_bytes,
            "recent_evictions": self.evictions,
            "worker_rss_bytes": current_rss_bytes(),
        }


def _release(bundle: Any) -> None:
    """Drop a loaded bundle; a tensor-parallel one also stops its rank processes."""
    if hasattr(bundle, "close"):
        bundle.close()
    del bundle
    gc.collect()


def current_rss_bytes() -> int:
    """This process's resident set size now (not the peak), from /proc; 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
