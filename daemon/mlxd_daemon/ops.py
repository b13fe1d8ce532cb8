"""Request handlers that run inside a worker process: plain arguments in, plain results out.

"jobs" worker: convert, quantize, validate. "models" worker: load, unload, list, infer.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlxd_daemon.errors import InvalidArgument
from mlxd_daemon.progress import Reporter
from mlxd_daemon.residency import Residency

Handler = Callable[[dict[str, Any], Reporter], Any]

_residency: Residency | None = None


def decode_images(images: list[bytes]) -> list[Any]:
    """Encoded image bytes -> RGB PIL images; InvalidArgument naming the first one that is not an image."""
    from PIL import Image, UnidentifiedImageError

    decoded = []
    for i, data in enumerate(images):
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            msg = f"image {i} ({len(data)} bytes) could not be decoded: {e}"
            raise InvalidArgument(msg, reason="BAD_IMAGE", index=i) from None
        decoded.append(image.convert("RGB"))
    return decoded


def convert(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    from mlxd_daemon.convert import convert as run_convert

    return run_convert(Path(args.pop("src")), Path(args.pop("dst")), reporter=reporter, **args)


def quantize(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Quantize an MLX directory (names are already MLX names), or with ``dequantize`` turn one back to float."""
    from mlxd_daemon import convert

    src, dst = Path(args["src"]), Path(args["dst"])
    if args.get("dequantize"):
        return convert.dequantize(
            src, dst, dtype=args.get("dtype", "auto"), overwrite=args["overwrite"], reporter=reporter
        )
    return convert.quantize(
        src,
        dst,
        bits=args["bits"],
        group_size=args["group_size"],
        mode=args["mode"],
        overrides=args.get("overrides", ()),
        recipe=args.get("recipe", ""),
        overwrite=args["overwrite"],
        reporter=reporter,
    )


def validate(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    from mlxd_daemon.validate import validate_model

    images = decode_images(args["images"]) if args["images"] else None
    return validate_model(
        Path(args["reference"]),
        Path(args["model_dir"]),
        texts=args["texts"] or None,
        images=images,
        reporter=reporter,
    )


def load(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    resident, evicted = _models().get(args["path"], keep_alive=args.get("keep_alive"))
    return {"model": resident.info(), "evicted": evicted}


def unload(args: dict[str, Any], reporter: Reporter) -> int:
    return _models().unload(args["id"])


def list_models(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    return _models().snapshot()


def infer(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    if not args["texts"] and not args["images"]:
        msg = "nothing to infer: pass at least one text or image"
        raise InvalidArgument(msg, reason="EMPTY_INPUT")
    images = decode_images(args["images"])
    resident, _ = _models().get(args["model"])
    start = time.perf_counter()
    outputs = resident.bundle.embed(list(args["texts"]), images)
    resident.last_used, resident.infer_count = time.time(), resident.infer_count + 1
    return {"model": resident.id, "outputs": outputs, "seconds": time.perf_counter() - start}


def generate(args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Stream tokens as ``data`` events; return the text and speed. A cancel stops between tokens."""
    resident, _ = _models().get(args["model"])
    bundle = resident.bundle
    if not hasattr(bundle, "generate"):
        msg = f"{resident.model_type} does not generate text: use Infer"
        raise InvalidArgument(msg, reason="USE_INFER", model_type=resident.model_type)
    prompt: str | list[int] = args["prompt"]
    if args["messages"]:
        prompt = bundle.apply_chat_template(args["messages"])
    elif not prompt:
        msg = "nothing to generate from: pass a prompt or chat messages"
        raise InvalidArgument(msg, reason="EMPTY_INPUT")
    start = time.perf_counter()
    pieces, last = [], {}
    for event in bundle.generate(prompt, max_tokens=args["max_tokens"], temperature=args["temperature"],
                                 top_p=args["top_p"], seed=args["seed"]):  # fmt: skip
        pieces.append(event["text"])
        reporter.data({"token_id": event["token_id"], "text": event["text"]})
        last = event
    resident.last_used, resident.infer_count = time.time(), resident.infer_count + 1
    stats = last.get("stats", {})
    return {
        "model": resident.id, "text": "".join(pieces), "finish_reason": last.get("finish_reason", ""),
        "prompt_tokens": stats.get("prompt_tokens", 0), "generation_tokens": stats.get("generation_tokens", 0),
        "prompt_tokens_per_second": stats.get("prompt_tps", 0.0),
        "generation_tokens_per_second": stats.get("generation_tps", 0.0), "seconds": time.perf_counter() - start,
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
    return {"load": load, "unload": unload, "list": list_models, "infer": infer, "generate": generate}


def shutdown() -> None:
    """Release resident models before the worker exits."""
    if _residency is not None:
        for model_id in list(_residency.models):
            _residency.unload(model_id, reason="shutdown")
