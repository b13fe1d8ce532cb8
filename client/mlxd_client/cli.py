"""``mlxctl``: a thin CLI over the mlxd RPCs. Human output by default; ``--json`` prints exactly one JSON object.

Exit codes: 0 ok, 1 failed RPC (or a validation that did not pass), 2 usage error, 130 interrupted.
This module parses arguments, connects and prints; the RPC subcommands and their output are in ``commands``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from mlxd_client import discovery
from mlxd_client.client import Client
from mlxd_client.commands import (
    Outcome,
    cmd_archs,
    cmd_convert,
    cmd_generate,
    cmd_infer,
    cmd_job,
    cmd_jobs,
    cmd_load,
    cmd_models,
    cmd_quantize,
    cmd_txt2img,
    cmd_unload,
    cmd_validate,
    cmd_watch,
    to_dict,
)
from mlxd_client.errors import FailedPreconditionError, MlxdClientError


def _size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height), for --size."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        msg = f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512"
        raise argparse.ArgumentTypeError(msg)
    return int(w), int(h)


def cmd_daemon(a: argparse.Namespace) -> Outcome:
    address = a.address or discovery.default_address()
    if a.action == "start":
        started = discovery.ensure_daemon(address, extra_args=("--http", a.http) if a.http else ())
        with Client(address, autostart=False) as c:
            info = to_dict(c.server_info) if c.server_info else {}
        http = info.get("http_address")
        text = f"mlxd {'started' if started else 'already running'} at {address}"
        if http:
            text += f"; OpenAI-compatible API at http://{http}/v1"
        elif a.http:
            text += "; it serves no HTTP: stop it (mlxctl daemon stop) and start it again with --http"
        return {"started": started, **info}, text, 0
    if a.action == "stop":
        if not discovery.is_serving(address):
            return {"stopped": False, "address": address}, f"no daemon at {address}", 0
        with Client(address, autostart=False, handshake=False) as c:
            c.shutdown()
        deadline = time.monotonic() + 15
        while discovery.is_serving(address, timeout=0.3) and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"stopped": True, "address": address}, f"stopped mlxd at {address}", 0
    if not discovery.is_serving(address):
        return {"running": False, "address": address}, f"no daemon at {address}", 1
    with Client(address, autostart=False) as c:
        info = to_dict(c.server_info) if c.server_info else {}
        models = to_dict(c.list_models())
    r = {
        "running": True,
        **info,
        "models": models["models"],
        "used_bytes": models["used_bytes"],
        "budget_bytes": models["budget_bytes"],
    }
    text = (
        f"mlxd {info.get('daemon_version')} (protocol {info.get('protocol_version')}) pid {info.get('pid')} "
        f"at {address}; BLAS {info.get('blas')}; {len(models['models'])} model(s) resident, "
        f"{models['used_bytes'] / 1e6:.1f} MB; quantization recipes: "
        f"{', '.join((info.get('capabilities') or {}).get('quant_recipes', [])) or 'none'}"
    )
    if info.get("http_address"):
        text += f"; OpenAI-compatible API at http://{info['http_address']}/v1"
    return r, text, 0


def connect(args: argparse.Namespace) -> Client:
    """A handshaken client; a daemon speaking another protocol is stopped and a compatible one started."""
    try:
        return Client(args.address, autostart=not args.no_autostart)
    except FailedPreconditionError as e:
        if e.reason != "PROTOCOL_MISMATCH" or args.no_autostart:
            raise
        address = args.address or discovery.default_address()
        print(f"mlxctl: {e.message}; restarting the daemon at {address}", file=sys.stderr)
        with Client(address, autostart=False, handshake=False) as old:
            old.shutdown()
        deadline = time.monotonic() + 30
        while discovery.is_serving(address, timeout=0.3) and time.monotonic() < deadline:
            time.sleep(0.1)
        return Client(address, autostart=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlxctl",
        description="Drive the mlxd daemon (started on demand).",
        # The client never imports the daemon: the daemon lists what it supports (Initialize capabilities).
        epilog="model types: `mlxctl archs` lists what the daemon converts and serves",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--address", help="daemon address (default: $MLXD_ADDRESS or the per-user socket)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--no-autostart", action="store_true", help="fail instead of starting a daemon")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[..., Outcome], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(fn=fn)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    def quant_flags(sp: argparse.ArgumentParser, bits: int, *, dequantize: bool = False) -> None:
        sp.add_argument(
            "--q-bits", type=int, default=bits, help="2, 3, 4, 5, 6 or 8 (default: the mode's, affine 4, mxfp8 8)"
        )
        sp.add_argument(
            "--q-group-size", type=int, default=0, help="affine 32, 64 or 128; mxfp4/mxfp8 32; nvfp4 16 (default: 64)"
        )
        sp.add_argument("--q-mode", default="affine", choices=["affine", "mxfp4", "mxfp8", "nvfp4"])
        sp.add_argument(
            "--q-override",
            action="append",
            metavar="PATTERN=BITS[:GROUP]|skip",
            help="per-layer setting by glob on the module path, e.g. 'lm_head=8', 'vision_model.*=skip', "
            "'*.v_proj=6:32' (repeatable; first match wins)",
        )
        # The daemon owns the recipe names (quantize.RECIPES): it lists them in its capabilities and refuses an
        # unknown one with BAD_RECIPE, so the CLI does not keep a copy.
        sp.add_argument("--q-recipe", metavar="RECIPE",
                        help="mixed-precision recipe, e.g. mixed_4_6 (`mlxctl daemon status` lists them)")  # fmt: skip
        sp.add_argument(
            "--q-method", default="rtn", choices=["rtn", "awq", "gptq"], help="rtn (round to nearest), or calibrated"
        )
        sp.add_argument(
            "--calibration-data", metavar="FILE", help="awq/gptq: text file (a sample a line), image folder or .npz"
        )
        sp.add_argument("--calibration-seed", type=int, default=0, help="seed of the built-in calibration set")
        if dequantize:
            sp.add_argument("--dequantize", action="store_true", help="the reverse: a quantized MLX dir to float")

    hub_help = "a local directory, or a Hugging Face Hub id org/name[@revision] the daemon resolves"
    c = add("convert", cmd_convert, "convert a Hugging Face checkpoint (directory or hub id) to MLX")
    c.add_argument("src", help=hub_help)
    c.add_argument("--revision", help="with a hub id: branch, tag or commit (default main)")
    c.add_argument("dst")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    c.add_argument("--max-shard-size", help="e.g. 500MB, 2GB, 2GiB (default 5GB)")
    c.add_argument("--overwrite", action="store_true", help="replace DST once the new output is complete")
    c.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    c.add_argument("--quantize", action="store_true")
    c.add_argument("--strict", action="store_true", help="refuse weights holding NaN/Inf instead of listing them")
    c.add_argument("--input-spec", metavar="JSON", help='exported programs: example inputs by name, e.g. '
                   '\'[{"name": "input_values", "shape": [1, 16000], "dtype": "float32"}]\'')  # fmt: skip
    quant_flags(c, 0)
    q = add("quantize", cmd_quantize, "quantize an MLX model directory")
    q.add_argument("src", help=hub_help)
    q.add_argument("--revision", help="with a hub id: branch, tag or commit (default main)")
    q.add_argument("dst")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--strict", action="store_true", help="refuse weights holding NaN/Inf instead of listing them")
    quant_flags(q, 0, dequantize=True)
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="with --dequantize: the float dtype to write (default: the scales' dtype)")  # fmt: skip
    v = add("validate", cmd_validate, "compare an MLX model with its PyTorch source")
    v.add_argument("model_dir")
    v.add_argument("--reference", required=True, help="the source Hugging Face checkpoint: " + hub_help)
    v.add_argument("--revision", help="with a hub id --reference: branch, tag or commit (default main)")
    v.add_argument("--text", action="append", help="a golden text (repeatable; default: built-in)")
    v.add_argument("--image", action="append", help="a golden image file (repeatable; default: built-in)")
    v.add_argument("--inputs", metavar="NPZ", help="arrays replacing the prepared inputs of the same names")
    v.add_argument("--plot", metavar="PNG", help="draw the per-layer error (log scale) with the tolerance line")
    i = add("infer", cmd_infer, "embed texts and images, match them, or classify them")
    i.add_argument("model_dir")
    i.add_argument("--text", action="append")
    i.add_argument("--image", action="append")
    i.add_argument(
        "--inputs",
        metavar="NPZ",
        help="named input arrays: an exported program's, or preprocessed "
        "ones instead of texts/images (input_ids, attention_mask, pixel_values, pixels)",
    )
    i.add_argument("--save", metavar="NPZ", help="with --inputs: also save the outputs to this .npz")
    i.add_argument("--top-k", type=int, default=5, metavar="N", help="classifiers: the N best labels per input")
    g = add("generate", cmd_generate, "generate text with a decoder LM (any mlx-lm model type; tokens streamed)")
    g.add_argument("model_dir")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.add_argument("--system", help="a system message (implies the chat template)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="end the text just before this string (repeatable)")
    t = add("txt2img", cmd_txt2img, "generate images with a converted Stable Diffusion pipeline")
    t.add_argument("model_dir")
    t.add_argument("prompt")
    t.add_argument("--negative-prompt", default="")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    t.add_argument("--seed", type=int, default=0, help="the same seed gives diffusers' image (torch.Generator)")
    t.add_argument("--size", type=_size, metavar="WxH", help="image size (default: the pipeline's)")
    t.add_argument("--num-images", type=int, default=1)
    t.add_argument("--latents", metavar="NPY", help="initial latents, NCHW float32 (as diffusers' latents=)")
    t.add_argument(
        "--scheduler", help="euler, euler_ancestral, ddim, pndm, dpmsolver_multistep (default: the pipeline's)"
    )
    t.add_argument("--image", help="img2img: the init image file")
    t.add_argument("--strength", type=float, default=0.8, help="img2img: fraction of the schedule to run, (0, 1]")
    t.add_argument("--out", required=True, help="output PNG (OUT-0.png, OUT-1.png, ... for several images)")
    add("jobs", cmd_jobs, "list jobs (running and finished, also across daemon restarts)")
    jb = add("job", cmd_job, "show one job and its result")
    jb.add_argument("job_id")
    w = add("watch", cmd_watch, "re-attach to a job's progress and wait for its result")
    w.add_argument("job_id")
    w.add_argument("--from-seq", type=int, default=0, help="replay events from this sequence number")
    m = add("models", cmd_models, "list resident models (--cached: models in the daemon's Hugging Face cache)")
    m.add_argument("--cached", action="store_true", help="list the Hugging Face cache with architecture and support")
    ld = add("load", cmd_load, "load a model and keep it resident")
    ld.add_argument("model_dir")
    ld.add_argument("--keep-alive", type=float, default=0.0, help="seconds after last use it may not be evicted")
    ld.add_argument(
        "--tensor-parallel",
        type=int,
        default=0,
        metavar="N",
        help="split a decoder over N ranks (mlx-lm's sharding plan, started with mlx.launch)",
    )
    ld.add_argument(
        "--hosts",
        default="",
        metavar="HOSTS_JSON",
        help="mlx.launch hostfile listing the ranks' hosts (default: all ranks on this host)",
    )
    ul = add("unload", cmd_unload, "unload a resident model")
    ul.add_argument("model_dir")
    add("archs", cmd_archs, "list the model types the daemon converts and serves")
    d = add("daemon", cmd_daemon, "start, stop or inspect the daemon")
    d.add_argument("action", choices=["start", "stop", "status"])
    d.add_argument("--http", metavar="[HOST:]PORT", help="start: also serve the OpenAI-compatible HTTP API here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "daemon":
            result, text, code = cmd_daemon(args)
        else:
            with connect(args) as client:
                result, text, code = args.fn(client, args)
    except MlxdClientError as e:
        if args.json:
            print(json.dumps({"error": e.to_dict()}))
        else:
            print(f"error: {e.message} ({e.code}{', ' + e.reason if e.reason else ''})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(json_safe(result)) if args.json else text)
    return code


def json_safe(value: Any) -> Any:
    """NaN/Inf (metrics of non-finite outputs) become null: the output stays strict JSON."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
