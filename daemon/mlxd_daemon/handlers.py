"""Request handlers that run inside a worker process: plain arguments in, plain results out.

"jobs" worker: convert (mlx-lm decoders, mlxd's archs or the torch.export path),
quantize, validate; a source given as a Hugging Face Hub id is resolved first, inside the job (progress,
cancel). "models" worker: load, unload, list, infer_many, run, generate, hub_cache.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlxd_daemon.errors import InvalidArgument, MlxdError, RankLost
from mlxd_daemon.progress import Reporter
from mlxd_daemon.residency import Residency, configure_mlx_for_inference
from mlxd_daemon.stop_strings import StopStrings

Handler = Callable[[dict[str, Any], Reporter], Any]

_residency: Residency | None = None


def _warm_image_decoding() -> None:
    """Decode one small PNG: PIL imports its format plugins on the first image it opens (~10 ms), which the first
    Infer with images would otherwise pay."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    decode_images([buf.getvalue()])


def decode_images(images: list[bytes], composite: bool = True) -> list[Any]:
    """Encoded image bytes -> RGB PIL images; InvalidArgument naming the first one that is not an image. Other
    modes become RGB as transformers' ``convert_to_rgb`` does it (transparency composited onto white), or with
    ``composite=False`` as diffusers' image processor does it (``convert("RGB")``: alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    from mlxd_daemon.archs.image_processing import map_images, to_rgb

    def decode(i: int) -> Any:
        try:
            image = Image.open(io.BytesIO(images[i]))
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            msg = f"image {i} ({len(images[i])} bytes) could not be decoded: {e}"
            raise InvalidArgument(msg, reason="BAD_IMAGE", index=i) from None
        return to_rgb(image) if composite else image.convert("RGB")

    return map_images(decode, len(images))


def _resolve_hub(args: dict[str, Any], key: str, check: Callable[[Path], object], reporter: Reporter) -> Any:
    """When ``args["hub"]`` is set, resolve the id to a local snapshot and put its path in ``args[key]``."""
    spec = args.pop("hub", None)
    if not spec:
        return None
    from mlxd_daemon.hub import resolve

    source = resolve(spec["repo_id"], spec["revision"], offline=spec["offline"], check=check, reporter=reporter)
    args[key] = source.path
    return source


def check_convertible(folder: Path) -> None:
    """Unsupported (before any weight is read) unless an arch module or the torch.export path takes it."""
    from mlxd_daemon.archs import get_arch
    from mlxd_daemon.checkpoint import read_config
    from mlxd_daemon.export import maybe_export

    config = read_config(folder)
    if not maybe_export(folder):
        get_arch(config["model_type"])


def support(folder: Path) -> str:
    """How mlxd would convert a model directory: "native", "export" or "" (not at all)."""
    from mlxd_daemon.export import maybe_export

    try:
        check_convertible(folder)
    except MlxdError:
        return ""
    return "export" if maybe_export(folder) else "native"


def convert(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Route by the registry (``archs.resolve``): mlx-lm decoders and mlxd's archs through ``convert``, a .pt2
    or a model_type known only to transformers through torch.export; the result says which (``path``)."""
    from mlxd_daemon.convert import convert as run_convert
    from mlxd_daemon.export import convert_via_export, maybe_export
    from mlxd_daemon.pipelines import is_pipeline

    source = _resolve_hub(args, "src", check_convertible, reporter)
    hub = source.to_dict() if source else None
    if is_pipeline(args["src"]):  # a diffusers pipeline directory (model_index.json): component by component
        from mlxd_daemon.pipelines.convert import convert_pipeline

        return convert_pipeline(Path(args.pop("src")), Path(args.pop("dst")), reporter=reporter, **args)
    if _export_route(Path(args["src"])) and maybe_export(args["src"]):
        return {**convert_via_export(args, reporter), "hub": hub, "path": "export"}
    return run_convert(Path(args.pop("src")), Path(args.pop("dst")), reporter=reporter, hub=hub, **args)


def _export_route(src: Path) -> bool:
    """A .pt2, or an HF directory whose model_type the registry sends to torch.export (an explicit decision)."""
    from mlxd_daemon import archs
    from mlxd_daemon.checkpoint import read_config

    if src.suffix == ".pt2":
        return True
    if not (src / "config.json").is_file():
        return False  # convert reports the missing config
    model_type = read_config(src).get("model_type")
    return bool(model_type) and archs.resolve(str(model_type)).path == archs.EXPORT


def quantize(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Quantize an MLX directory (names are already MLX names), or with ``dequantize`` turn one back to float."""
    from mlxd_daemon import convert
    from mlxd_daemon.checkpoint import read_config

    source = _resolve_hub(args, "src", read_config, reporter)  # an MLX repo: any model_type quantizes
    src, dst, hub = Path(args["src"]), Path(args["dst"]), source.to_dict() if source else None
    if args.get("dequantize"):
        return convert.dequantize(src, dst, dtype=args.get("dtype", "auto"), overwrite=args["overwrite"],
                                  strict=args.get("strict", False), reporter=reporter, hub=hub)  # fmt: skip
    return convert.quantize(src, dst, options=args["quantize"], overwrite=args["overwrite"],
                            strict=args.get("strict", False), reporter=reporter, hub=hub)  # fmt: skip


def validate(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    from mlxd_daemon.pipelines import is_pipeline
    from mlxd_daemon.validate import validate_model

    source = _resolve_hub(args, "reference", check_convertible, reporter)
    if is_pipeline(args["model_dir"]):
        from mlxd_daemon.pipelines.validate import validate_pipeline

        return validate_pipeline(Path(args["reference"]), Path(args["model_dir"]), reporter=reporter)
    images = decode_images(args["images"]) if args["images"] else None
    arrays = None
    if args.get("inputs_npz"):
        from mlxd_daemon.npz import read_npz

        arrays = read_npz(args["inputs_npz"], "inputs_npz", "BAD_NPZ")
    report = validate_model(
        Path(args["reference"]),
        Path(args["model_dir"]),
        texts=args["texts"] or None,
        images=images,
        arrays=arrays,
        reporter=reporter,
    )
    return {**report, "reference_hub": source.to_dict() if source else None}


def hub_cache(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """The models in the daemon's Hugging Face cache, each with how mlxd would convert it."""
    from mlxd_daemon.hub import cached_models

    listing = cached_models()
    for model in listing["models"]:
        model["support"] = support(Path(model["snapshot_path"])) if model["model_type"] else ""
    return listing


def load(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    resident, evicted = _models().get(args["path"], keep_alive=args.get("keep_alive"),
                                      tensor_parallel=args.get("tensor_parallel"),
                                      hosts_file=args.get("hosts_file", ""))  # fmt: skip
    return {"model": resident.info(), "evicted": evicted}


def unload(args: dict[str, Any], reporter: Reporter) -> int:
    return _models().unload(args["id"])


def list_models(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    return _models().snapshot()


def run(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Named arrays in, one request (no dynamic batching): an exported program's named outputs (``program``), or an
    architecture's Infer outputs from preprocessed tensors (its bundle's ``embed_tensors``, the served path)."""
    resident, _ = _models().get(args["model"])
    bundle = resident.bundle
    program = hasattr(bundle, "run")
    if not program and not hasattr(bundle, "embed_tensors"):
        msg = f"{resident.model_type} takes texts/images, not named tensors: leave `inputs` empty"
        raise InvalidArgument(msg, reason="USE_TEXTS_IMAGES", model_type=resident.model_type)
    start = time.perf_counter()
    outputs = bundle.run(args["inputs"]) if program else bundle.embed_tensors(args["inputs"])
    resident.last_used, resident.infer_count = time.time(), resident.infer_count + 1
    return {"model": resident.id, "outputs": outputs, "seconds": time.perf_counter() - start, "program": program}


def infer_many(args: dict[str, Any], reporter: Reporter) -> list[dict[str, Any]]:
    """Several requests for one model in one forward pass (dynamic batching); results split back per request.

    A request with bad input (no input, undecodable image) gets its own error; the others still run."""
    requests = args["requests"]
    results: list[dict[str, Any]] = [{} for _ in requests]
    ok: list[tuple[int, list[str], list[Any]]] = []
    for i, request in enumerate(requests):
        try:
            if not request["texts"] and not request["images"]:
                msg = "nothing to infer: pass at least one text or image"
                raise InvalidArgument(msg, reason="EMPTY_INPUT")
            ok.append((i, list(request["texts"]), decode_images(request["images"])))
        except MlxdError as e:
            results[i] = {"error": e.to_dict()}
    if not ok:
        return results
    resident, _ = _models().get(args["model"])
    start = time.perf_counter()
    outputs = resident.bundle.embed([t for _, texts, _ in ok for t in texts], [im for _, _, ims in ok for im in ims])
    seconds = time.perf_counter() - start
    resident.last_used, resident.infer_count = time.time(), resident.infer_count + len(ok)
    t0 = i0 = 0
    for i, texts, images in ok:
        t1, i1 = t0 + len(texts), i0 + len(images)
        results[i] = {"model": resident.id, "seconds": seconds, "batch": len(ok),
                      "outputs": split_outputs(resident.bundle, outputs, (t0, t1), (i0, i1))}  # fmt: skip
        t0, i0 = t1, i1
    return results


def split_outputs(
    bundle: Any, outputs: dict[str, Any], texts: tuple[int, int], images: tuple[int, int]
) -> dict[str, Any]:
    """One request's share of a batched forward: its rows of each output, as the contract's ``output_rows`` says."""
    from mlxd_daemon.archs.contract import output_rows

    (t0, t1), (i0, i1) = texts, images
    out: dict[str, Any] = {}
    for name, value in outputs.items():
        rows = output_rows(bundle, name)
        if rows == "images x texts":
            out[name] = value[i0:i1, t0:t1]
        elif rows == "images" or (rows == "inputs" and t1 == t0):
            out[name] = value[i0:i1]
        elif rows == "shared":
            out[name] = value
        else:
            out[name] = value[t0:t1]
    return out


def capabilities(args: dict[str, Any], reporter: Reporter) -> dict[str, str | None]:
    """Per quantization mode: why this MLX backend cannot run it, or None when it can (Initialize lists these)."""
    from mlxd_daemon.quantize import MODES, mode_unsupported

    return {mode: mode_unsupported(mode) for mode in MODES}


def generate(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Stream tokens as ``data`` events; return the text and speed. A cancel stops between tokens.

    ``stop`` strings end generation early: the text stops just before the first one (finish_reason "stop")."""
    resident, _ = _models().get(args["model"])
    bundle = resident.bundle
    if not hasattr(bundle, "generate"):
        msg = f"{resident.model_type} does not generate text: use Infer"
        raise InvalidArgument(msg, reason="USE_INFER", model_type=resident.model_type)
    prompt: str | list[int] = args["prompt"]
    if args["messages"]:
        try:
            prompt = bundle.apply_chat_template(args["messages"])
        except InvalidArgument as e:  # the HTTP front asks for plain text when a model has no template
            if e.reason != "NO_CHAT_TEMPLATE" or not args.get("plain_chat_fallback"):
                raise
            prompt = "\n\n".join(m["content"] for m in args["messages"])
    elif not prompt:
        msg = "nothing to generate from: pass a prompt or chat messages"
        raise InvalidArgument(msg, reason="EMPTY_INPUT")
    stops = StopStrings(args.get("stop", ()))
    start = time.perf_counter()
    first_at, count, pieces, last = start, 0, [], {}
    events = bundle.generate(prompt, max_tokens=args["max_tokens"], temperature=args["temperature"],
                             top_p=args["top_p"], seed=args["seed"])  # fmt: skip
    try:
        for event in events:
            first_at, count, last = first_at if count else time.perf_counter(), count + 1, event
            text = stops.push(event["text"]) + (stops.flush() if "finish_reason" in event else "")
            pieces.append(text)
            reporter.data({"token_id": event["token_id"], "text": text})
            if stops.stopped:
                break
    except RankLost:
        _models().unload(resident.id, reason="rank_lost")  # its ranks are gone: nothing left to serve with
        raise
    finally:
        if hasattr(events, "close"):  # a stop string or a cancel: the decoder stops here (TP ranks wait on it)
            events.close()
    resident.last_used, resident.infer_count = time.time(), resident.infer_count + 1
    stats, finish = last.get("stats", {}), last.get("finish_reason", "")
    if stops.stopped:  # the decoder did not finish, so its stats are ours to take
        end, finish = time.perf_counter(), "stop"
        n_prompt = len(prompt) if isinstance(prompt, list) else len(bundle.encode(prompt))
        stats = {"prompt_tokens": n_prompt, "generation_tokens": count - 1,
                 "prompt_tps": n_prompt / max(first_at - start, 1e-9),
                 "generation_tps": (count - 1) / (end - first_at) if count > 1 else 0.0}  # fmt: skip
    return {
        "model": resident.id, "text": "".join(pieces), "finish_reason": finish,
        "prompt_tokens": stats.get("prompt_tokens", 0), "generation_tokens": stats.get("generation_tokens", 0),
        "prompt_tokens_per_second": stats.get("prompt_tps", 0.0),
        "generation_tokens_per_second": stats.get("generation_tps", 0.0), "seconds": time.perf_counter() - start,
    }  # fmt: skip


def generate_image(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Stable Diffusion txt2img / img2img: a ``data`` event per step (a cancel stops between steps), then the
    images encoded as PNG."""
    from PIL import Image

    from mlxd_daemon.pipelines.sd import Request

    resident, _ = _models().get(args["model"])
    bundle = resident.bundle
    if not hasattr(bundle, "generate_image"):
        msg = f"{resident.model_type} is not a diffusion pipeline: convert a diffusers pipeline directory"
        raise InvalidArgument(msg, reason="NOT_A_PIPELINE", model_type=resident.model_type)
    image = decode_images([args["image"]], composite=False)[0] if args.get("image") else None
    fields = ("prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "num_images",
              "latents", "scheduler", "strength")  # fmt: skip
    start = time.perf_counter()

    def on_step(done: int, total: int) -> None:
        reporter.data({"step": done, "total": total, "seconds": time.perf_counter() - start})

    out = bundle.generate_image(Request(image=image, **{k: args[k] for k in fields}), on_step=on_step)
    pngs = []
    for pixels in out["images"]:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    resident.last_used, resident.infer_count = time.time(), resident.infer_count + 1
    return {
        "model": resident.id, "images": pngs, "num_images": len(pngs), "width": out["width"],
        "height": out["height"], "steps": out["steps"], "scheduler": out["scheduler"], "seed": args["seed"],
        "seconds": time.perf_counter() - start, "seconds_per_step": out["loop_seconds"] / max(out["steps"], 1),
        "truncated": bool(out["truncated"]), "truncated_text": out["truncated"],
        "negative_truncated": bool(out["truncated_negative"]),
    }  # fmt: skip


def _models() -> Residency:
    assert _residency is not None, "models handlers run only in the models worker"
    return _residency


def handlers(role: str, options: dict[str, Any]) -> dict[str, Handler]:
    """The handler table of a worker role."""
    global _residency
    if role == "jobs":
        return {"convert": convert, "quantize": quantize, "validate": validate}
    _residency = Residency(int(options["memory_budget"]))
    configure_mlx_for_inference(memory_limit=int(options["memory_budget"]))
    _warm_image_decoding()
    return {
        "load": load,
        "unload": unload,
        "list": list_models,
        "infer_many": infer_many,
        "run": run,
        "generate": generate,
        "hub_cache": hub_cache,
        "capabilities": capabilities,
        "generate_image": generate_image,
    }


def shutdown() -> None:
    """Release resident models before the worker exits."""
    if _residency is not None:
        for model_id in list(_residency.models):
            _residency.unload(model_id, reason="shutdown")
