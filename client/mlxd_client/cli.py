"""``mlxctl``: a thin CLI over the mlxd RPCs. Human output by default; ``--json`` prints exactly one JSON object.

Exit codes: 0 ok, 1 failed RPC (or a validation that did not pass), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from mlxd.v1 import mlxd_pb2 as pb

from mlxd_client import discovery
from mlxd_client.client import Client, top_k
from mlxd_client.errors import FailedPreconditionError, MlxdClientError


def to_dict(msg: Message) -> dict[str, Any]:
    """Protobuf message -> plain dict: 64-bit ints stay numbers, enums become short lower-case names."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and not field.is_repeated:
            out[field.name] = to_dict(value) if msg.HasField(field.name) else None
        elif field.has_presence and not field.is_repeated and not msg.HasField(field.name):
            out[field.name] = None  # an optional metric nothing measured
        elif field.is_repeated:
            out[field.name] = [_scalar(field, v) for v in value]
        else:
            out[field.name] = _scalar(field, value)
    return out


def _scalar(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return to_dict(value)
    if field.enum_type is not None:
        name = field.enum_type.values_by_number[value].name
        prefix = "".join("_" + c if c.isupper() else c.upper() for c in field.enum_type.name).lstrip("_") + "_"
        short = name.removeprefix(prefix).lower()
        return "auto" if short == "unspecified" and field.enum_type.name == "Dtype" else short
    if isinstance(value, bytes):
        return len(value)
    return value


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.job_id = ""

    def __call__(self, p: pb.Progress) -> None:
        self.job_id = p.job_id or self.job_id
        if not self.enabled:
            return
        frac = p.items_done / p.items_total if p.items_total else 0.0
        bar = "#" * int(frac * 30)
        size = f" {p.bytes_done / 1e6:.1f}/{p.bytes_total / 1e6:.1f} MB" if p.bytes_total else ""
        sys.stderr.write(f"\r{p.stage:>10} [{bar:<30}] {p.items_done}/{p.items_total}{size} {p.message[:40]:<40}")
        if p.kind == pb.Progress.KIND_END:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _run_job(client: Client, events: Iterator[Any], bar: ProgressBar) -> Any:
    """Drain a job stream; on Ctrl-C cancel the job on the daemon before exiting."""
    result = None
    try:
        for event in events:
            if isinstance(event, pb.Progress):
                bar(event)
            else:
                result = event
    except KeyboardInterrupt:
        if bar.job_id:
            client.cancel_job(bar.job_id)
            sys.stderr.write(f"\ncancelled job {bar.job_id}\n")
        raise
    return result


# -- subcommands: each returns (json-able dict, human text, exit code) ---------------------------------
Outcome = tuple[dict[str, Any], str, int]


def cmd_convert(client: Client, a: argparse.Namespace) -> Outcome:
    events = client.convert_events(
        a.src,
        a.dst,
        dtype=a.dtype,
        max_shard_size=a.max_shard_size or "",
        overwrite=a.overwrite,
        dry_run=a.dry_run,
        # --quantize with no --q-bits: the mode's default bits (mxfp8 is 8-bit, the others 4).
        q_bits=(a.q_bits or (8 if a.q_mode == "mxfp8" else 4)) if a.quantize else 0,
        q_group_size=a.q_group_size,
        q_mode=a.q_mode if a.quantize else "affine",
        q_overrides=a.q_override or () if a.quantize else (),
        q_recipe=a.q_recipe or "" if a.quantize else "",
        q_method=a.q_method if a.quantize else "",
        q_calibration_data=a.calibration_data or "" if a.quantize else "",
        q_calibration_seed=a.calibration_seed,
        revision=a.revision or "",
        strict=a.strict,
        input_spec=a.input_spec or "",
    )
    r = to_dict(_run_job(client, events, ProgressBar(not a.json)))
    return r, _convert_text(r), 0


def _convert_text(r: dict[str, Any]) -> str:
    verb = "would write" if r["dry_run"] else "wrote"
    lines = [
        f"{verb} {r['dst']}: {r['model_type']} {r['dtype']}, {r['num_tensors']} tensors, "
        f"{r['num_parameters']:,} parameters, {r['total_bytes'] / 1e6:.1f} MB in {len(r['shards'])} shard(s) "
        f"({r['seconds']:.2f} s, peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB)"
    ]
    lines += [f"  {s['file']}: {s['tensors']} tensors, {s['bytes'] / 1e6:.1f} MB" for s in r["shards"]]
    if r.get("hub_source"):
        h = r["hub_source"]
        lines.append(f"source: {h['repo_id']}@{h['revision']} (commit {h['commit_hash']}, {h['path']})")
    if r["quantization"]:
        q = r["quantization"]
        how = f"recipe {q['recipe']} (default {q['bits']} bits)" if q.get("recipe") else f"{q['bits']} bits"
        lines.append(
            f"quantized {len(r['quantized_layers'])} layers ({q['mode']}) to {how}, group {q['group_size']}: "
            f"{r.get('bits_per_weight', 0):.3f} bits per weight, {r.get('bytes_before', 0) / 1e6:.1f} MB of weights "
            f"before"
        )
        lines += [f"  override: {o}" for o in q.get("overrides", [])]
        reports = [x for x in r.get("layer_reports", []) if x["bits"]]
        measured = [x for x in reports if x["rel_error"] is not None]  # None: a dry run, or NaN/Inf weights
        if measured:
            worst = max(measured, key=lambda x: x["rel_error"])
            mean = sum(x["rel_error"] for x in measured) / len(measured)
            lines.append(f"  rel_error mean {mean:.4g}, max {worst['rel_error']:.4g} ({worst['name']})")
        mixed = sorted({(x["bits"], x["group_size"], x["mode"]) for x in reports})
        if len(mixed) > 1:
            counts = {m: sum((x["bits"], x["group_size"], x["mode"]) == m for x in reports) for m in mixed}
            lines.append("  per layer: " + ", ".join(f"{n} x {b}-bit g{g} {md}" for (b, g, md), n in counts.items()))
        fallback = [x["name"] for x in reports if x["mode"] == "affine" and x["group_size"] < q["group_size"]]
        if fallback and q["mode"] == "affine":
            more = f" and {len(fallback) - 5} more" if len(fallback) > 5 else ""
            lines.append(
                f"  smaller group size (input dim not divisible by {q['group_size']}): {', '.join(fallback[:5])}{more}"
            )
    lines += [f"  kept in float: {s['name']} ({s['reason']})" for s in r["skipped_layers"]]
    if r["copied_files"]:
        lines.append("copied byte-for-byte: " + ", ".join(r["copied_files"]))
    for b in r.get("non_finite", []):
        note = f"; {b['note']}" if b["note"] else ""
        lines.append(f"WARNING: {b['name']} holds {b['nan_count']} NaN and {b['inf_count']} Inf values, the first "
                     f"at {b['first_index']}{note} (--strict refuses such weights)")  # fmt: skip
    return "\n".join(lines)


def cmd_quantize(client: Client, a: argparse.Namespace) -> Outcome:
    events = client.quantize_events(
        a.src,
        a.dst,
        bits=a.q_bits,
        group_size=a.q_group_size,
        mode=a.q_mode,
        overrides=a.q_override or (),
        recipe=a.q_recipe or "",
        overwrite=a.overwrite,
        dequantize=a.dequantize,
        dtype=a.dtype,
        q_method=a.q_method,
        q_calibration_data=a.calibration_data or "",
        q_calibration_seed=a.calibration_seed,
        revision=a.revision or "",
        strict=a.strict,
    )
    r = to_dict(_run_job(client, events, ProgressBar(not a.json)))
    return r, _convert_text(r), 0


def cmd_validate(client: Client, a: argparse.Namespace) -> Outcome:
    events = client.validate_events(a.model_dir, a.reference, texts=a.text or (), images=a.image or (),
                                    inputs_npz=a.inputs, reference_revision=a.revision or "")  # fmt: skip
    r = to_dict(_run_job(client, events, ProgressBar(not a.json)))
    rows = [f"{'output':<28} {'max_abs':>10} {'max_rel':>10} {'cosine':>10} {'atol':>8}  ok"]
    rows += [
        f"{o['name']:<28} {o['max_abs']:>10.3g} {o['max_rel']:>10.3g} {o['cosine']:>10.6f} {o['atol']:>8.0e}  "
        f"{'yes' if o['passed'] else 'NO'}{'  ' + o['note'] if o['note'] else ''}"
        for o in r["outputs"]
    ]
    agreement = r["matching_agreement"]
    if agreement is None:
        rows.append("matching agreement: n/a (not measured for this model)")
    elif r["num_images"] and r["num_texts"]:
        size = f"{r['num_images']} images x {r['num_texts']} texts"
        rows.append(f"image-text matching agreement: {agreement:.3f} ({size})")
    else:
        rows.append(f"top-1 label agreement: {agreement:.3f}")
    if r["layers"]:
        # A NaN error (non-finite outputs) is the worst of all.
        worst = max(r["layers"], key=lambda x: x["rel_error"] / x["tolerance"] if x["rel_error"] == x["rel_error"]
                    else float("inf"))  # fmt: skip
        rows.append(
            f"layers: {sum(layer['passed'] for layer in r['layers'])}/{len(r['layers'])} within tolerance "
            f"{r['layers'][0]['tolerance']:.0e}; worst {worst['name']} rel_error {worst['rel_error']:.3g}"
        )
        if r["first_divergent_layer"]:
            rows.append(f"first divergent layer: {r['first_divergent_layer']}")
    if a.plot:
        from mlxd_client.plot import plot_layers

        r["plot"] = str(plot_layers(r, Path(a.plot)))
        rows.append(f"plot: {r['plot']}")
    rows.append(
        f"passed: {str(r['passed']).lower()}  ({r['model_type']}, {r['dtype']}, {r['seconds']:.2f} s; "
        f"report: {r['report_path']})"
    )
    return r, "\n".join(rows), 0 if r["passed"] else 1


def cmd_infer(client: Client, a: argparse.Namespace) -> Outcome:
    if a.inputs:  # an exported program: named arrays from an .npz
        import numpy as np

        with np.load(a.inputs) as npz:
            outputs = client.run(a.model_dir, {k: npz[k] for k in npz.files})
        r = {"model": a.model_dir, "outputs": {k: v.tolist() for k, v in outputs.items()}}
        if a.save:
            np.savez(a.save, **outputs)  # type: ignore[arg-type]
        text = "\n".join(f"{k}: {list(v.shape)} {v.dtype}" for k, v in outputs.items())
        if "logits" in outputs and outputs["logits"].ndim == 2:  # a classifier program: its best classes (indices)
            best = top_k(outputs["logits"], [], a.top_k)
            r["top_k"] = [[{"label": name, "probability": p} for name, p in row] for row in best]
            text += "\n" + "\n".join(_top_k_lines([f"input {i}" for i in range(len(best))], best))
        return r, text + (f"\nsaved to {a.save}" if a.save else ""), 0
    res = client.infer(a.model_dir, texts=a.text or (), images=a.image or ())
    r = {
        "model": res.model,
        "seconds": res.seconds,
        "text_embeds": res.text_embeds.tolist(),
        "image_embeds": res.image_embeds.tolist(),
        "logits_per_image": res.logits_per_image.tolist(),
        "logits": res.logits.tolist(),
        "labels": res.labels,
    }
    lines = [f"{res.model} ({res.seconds * 1e3:.1f} ms)"]
    if len(res.logits):  # a classifier: its best labels, per input
        r["top_k"] = [[{"label": name, "probability": p} for name, p in row] for row in res.top_k(a.top_k)]
        inputs = [f"text {t!r}" for t in a.text or ()] or [f"image {i}" for i in a.image or ()]
        lines += _top_k_lines(inputs, res.top_k(a.top_k))
        return r, "\n".join(lines), 0
    lines.append(f"text_embeds {list(res.text_embeds.shape)}, image_embeds {list(res.image_embeds.shape)}")
    for i, row in enumerate(res.logits_per_image):
        best_text = int(row.argmax())
        lines.append(
            f"image {a.image[i]}: best text {a.text[best_text]!r} (logits " + ", ".join(f"{x:.3f}" for x in row) + ")"
        )
    if not len(res.logits_per_image):
        texts = a.text or ()
        lines += [f"text {t!r}: {e[:4].round(4).tolist()}..." for t, e in zip(texts, res.text_embeds, strict=True)]
    return r, "\n".join(lines), 0


def _top_k_lines(inputs: list[str], best: list[list[tuple[str, float]]]) -> list[str]:
    """``input: label 0.912, label 0.051, ...`` per input."""
    rows = zip(inputs, best, strict=False)
    return [f"{what}: " + ", ".join(f"{name} {p:.3f}" for name, p in row) for what, row in rows]


def _job_line(j: dict[str, Any]) -> str:
    p = j["last_progress"] or {}
    progress = f" {p.get('stage', '')} {p.get('items_done', 0)}/{p.get('items_total', 0)}" if p else ""
    error = f" {j['error_code']} {j['error_reason']}: {j['error_message']}" if j["error_code"] else ""
    return f"{j['job_id']}  {j['state']:<9} {j['kind']:<8} {j['dst']}{progress}{error}"


def cmd_jobs(client: Client, a: argparse.Namespace) -> Outcome:
    jobs = [to_dict(j) for j in client.list_jobs()]
    return {"jobs": jobs}, "\n".join(_job_line(j) for j in jobs) or "no jobs", 0


def cmd_job(client: Client, a: argparse.Namespace) -> Outcome:
    r = to_dict(client.get_job(a.job_id))
    return r, _job_line(r["job"]), 0


def cmd_watch(client: Client, a: argparse.Namespace) -> Outcome:
    r = to_dict(_run_job(client, client.watch_job(a.job_id, a.from_seq), ProgressBar(not a.json)))
    return r, f"job {a.job_id} finished", 0


def cmd_generate(client: Client, a: argparse.Namespace) -> Outcome:
    """Print tokens as they arrive (unless --json); Ctrl-C stops the generation on the daemon."""
    chat = a.chat or bool(a.system)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    if chat:
        messages.append({"role": "user", "content": a.prompt})
    sampling = {"max_tokens": a.max_tokens, "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed,
                "stop": a.stop or ()}  # fmt: skip
    events = client.generate_events(a.model_dir, "" if chat else a.prompt, messages=messages, **sampling)
    result = None
    for event in events:
        if isinstance(event, pb.GeneratedToken):
            if not a.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        else:
            result = event
    r = to_dict(result) if result is not None else {}
    text = (f"\n[{r.get('finish_reason')}: {r.get('prompt_tokens')} prompt tokens at "
            f"{r.get('prompt_tokens_per_second', 0):.1f} tok/s, {r.get('generation_tokens')} generated at "
            f"{r.get('generation_tokens_per_second', 0):.1f} tok/s]")  # fmt: skip
    return r, text, 0


def _size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height), for --size."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        msg = f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512"
        raise argparse.ArgumentTypeError(msg)
    return int(w), int(h)


def cmd_txt2img(client: Client, a: argparse.Namespace) -> Outcome:
    """Stable Diffusion: step progress on stderr, images written as PNG (``OUT``, or ``OUT-i`` for several)."""
    import numpy as np

    width, height = a.size or (0, 0)
    latents = np.load(a.latents) if a.latents else None
    events = client.generate_image_events(
        a.model_dir, a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, guidance=a.guidance, seed=a.seed,
        width=width, height=height, num_images=a.num_images, latents=latents, scheduler=a.scheduler or "",
        image=a.image, strength=a.strength,
    )  # fmt: skip
    out, files, result = Path(a.out), [], None
    show = not a.json and sys.stderr.isatty()
    for event in events:
        if isinstance(event, pb.ImageStep) and show:
            sys.stderr.write(f"\rstep {event.step}/{event.total} ({event.seconds:.1f} s)")
            sys.stderr.flush()
        elif isinstance(event, pb.GeneratedImage):
            path = out if a.num_images == 1 else out.with_name(f"{out.stem}-{event.index}{out.suffix}")
            path.write_bytes(event.png)
            files.append(str(path))
        elif isinstance(event, pb.GenerateImageResult):
            result = event
    if show:
        sys.stderr.write("\n")
    r = {**(to_dict(result) if result is not None else {}), "files": files}
    text = (
        f"wrote {', '.join(files)}: {r.get('width')}x{r.get('height')}, {r.get('steps')} steps of "
        f"{r.get('scheduler')} in {r.get('seconds', 0):.2f} s ({r.get('seconds_per_step', 0):.3f} s/step)"
    )
    if r.get("truncated"):
        text += f"\nprompt truncated at the tokenizer's limit; dropped: {r.get('truncated_text')!r}"
    return r, text, 0


def cmd_models(client: Client, a: argparse.Namespace) -> Outcome:
    if a.cached:
        return _cached_models(client)
    r = to_dict(client.list_models())
    lines = []
    for m in r["models"]:
        lines.append(f"{m['id']}  {m['model_type']} {m['dtype']} {m['resident_bytes'] / 1e6:.1f} MB, "
                     f"{m['infer_count']} calls{_parameters(m)}")  # fmt: skip
        for rank in m.get("ranks", []):  # a tensor-parallel model: one line per rank
            lines.append(f"  rank {rank.get('rank', 0)} on {rank['host']} pid {rank['pid']} "
                         f"({m['tensor_parallel_backend']}): {rank['resident_bytes'] / 1e6:.1f} MB")  # fmt: skip
    lines.append(f"resident {r['used_bytes'] / 1e6:.1f} MB of {r['budget_bytes'] / 1e6:.0f} MB budget")
    return r, "\n".join(lines), 0


def _cached_models(client: Client) -> Outcome:
    """``models --cached``: what the daemon's Hugging Face cache holds and whether mlxd converts it."""
    r = to_dict(client.list_cached_models())
    how = {"native": "supported", "export": "supported (torch.export)", "": "not supported"}
    lines = [
        f"{m['repo_id']}@{','.join(m['refs']) or m['commit_hash'][:12]}  {m['model_type'] or '?'}  "
        f"{how[m['support']]}{'' if m['complete'] else ', weights not all cached'}  {m['size_on_disk'] / 1e6:.1f} MB"
        for m in r["models"]
    ]
    lines.append(f"cache {r['cache_dir']}{' (offline)' if r['offline'] else ''}: {len(r['models'])} snapshot(s)")
    return r, "\n".join(lines), 0


def _parameters(m: dict[str, Any]) -> str:
    """ ", 1.2B parameters" or, for MoE models, ", 0.4B of 1.2B parameters active"."""
    total, active = int(m.get("total_parameters") or 0), int(m.get("active_parameters") or 0)
    if not total:
        return ""
    if active and active < total:
        return f", {active / 1e9:.3g}B of {total / 1e9:.3g}B parameters active"
    return f", {total / 1e9:.3g}B parameters"


def architectures_epilog() -> str:
    """The model types this installation converts (mlxd's modules + the installed mlx-lm's), for --help."""
    try:
        from mlxd_daemon.archs import architectures  # stdlib only: reads what is installed, imports no mlx
    except ImportError:
        return "model types: ask the daemon (Initialize capabilities)"
    return textwrap.fill("model types: " + ", ".join(architectures()), width=100)


def cmd_load(client: Client, a: argparse.Namespace) -> Outcome:
    r = to_dict(client.load_model(a.model_dir, keep_alive=a.keep_alive, tensor_parallel=a.tensor_parallel,
                                  hosts_file=a.hosts))  # fmt: skip
    ranks = f" over {r['model']['tensor_parallel']} ranks" if r["model"].get("tensor_parallel") else ""
    return r, f"loaded {r['model']['id']}{ranks} ({r['model']['resident_bytes'] / 1e6:.1f} MB)", 0


def cmd_unload(client: Client, a: argparse.Namespace) -> Outcome:
    r = to_dict(client.unload_model(a.model_dir))
    return r, f"unloaded {a.model_dir}: freed {r['freed_bytes'] / 1e6:.1f} MB", 0


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
        epilog=architectures_epilog(),
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
    i.add_argument("--inputs", metavar="NPZ", help="named input arrays for an exported program (mlxd_program)")
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
