"""The mlxctl subcommands that drive daemon RPCs, and their output: each ``cmd_*`` returns (json-able dict,
human text, exit code); ``cli`` parses the arguments and prints one of the two.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from mlxd.v1 import mlxd_pb2 as pb

from mlxd_client.client import Client
from mlxd_client.wire import top_k


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
    if a.inputs:  # named arrays from an .npz: an exported program's, or preprocessed ones (CLIP, BERT, ViT)
        import numpy as np

        with np.load(a.inputs) as npz:
            res = client.infer(a.model_dir, inputs={k: npz[k] for k in npz.files})
        outputs = res.arrays()
        r = {"model": a.model_dir, "outputs": {k: v.tolist() for k, v in outputs.items()}}
        if a.save:
            np.savez(a.save, **outputs)  # type: ignore[arg-type]
        text = "\n".join(f"{k}: {list(v.shape)} {v.dtype}" for k, v in outputs.items())
        if "logits" in outputs and outputs["logits"].ndim == 2:  # a classifier: its best classes (labels or indices)
            best = top_k(outputs["logits"], res.labels, a.top_k)
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


def cmd_load(client: Client, a: argparse.Namespace) -> Outcome:
    r = to_dict(client.load_model(a.model_dir, keep_alive=a.keep_alive, tensor_parallel=a.tensor_parallel,
                                  hosts_file=a.hosts))  # fmt: skip
    ranks = f" over {r['model']['tensor_parallel']} ranks" if r["model"].get("tensor_parallel") else ""
    return r, f"loaded {r['model']['id']}{ranks} ({r['model']['resident_bytes'] / 1e6:.1f} MB)", 0


def cmd_unload(client: Client, a: argparse.Namespace) -> Outcome:
    r = to_dict(client.unload_model(a.model_dir))
    return r, f"unloaded {a.model_dir}: freed {r['freed_bytes'] / 1e6:.1f} MB", 0


def cmd_archs(client: Client, a: argparse.Namespace) -> Outcome:
    """The model types the daemon converts and serves (its Initialize capabilities)."""
    names = list((client.server_info or client.initialize()).capabilities.architectures)
    return {"architectures": names}, textwrap.fill(", ".join(names), width=100), 0
