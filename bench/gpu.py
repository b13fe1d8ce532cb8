"""CLIP ViT-B/32 image+text features on an NVIDIA GPU: MLX (CUDA backend) vs PyTorch CUDA eager (issue 7).

Self-contained: builds openai/clip-vit-base-patch32's architecture with seeded random weights in
``transformers.CLIPModel`` (the PyTorch reference), loads the same tensors into mlxd's MLX implementation
(``mlxd_daemon.archs.clip.CLIPModel``; the patch conv goes OIHW -> OHWI as ``clip.load`` does), checks that
the fp16 embeddings agree, then times one forward (N images 224x224 + N texts of 77 tokens -> L2-normalised
image and text embeddings) for:

  torch      transformers CLIPModel towers + projections, fp16, CUDA, eager (SDPA attention), inference_mode
  mlx        the repo's MLX modules, fp16 weights and inputs already on the device, eager
  mlx_comp   the same forward under ``mx.compile``
  mlx_api    the repo's own entry points (``text_model(np ids, np mask)``, ``vision_model(np pixels)``), which
             take host numpy inputs and cast pixels to float32 (so the vision tower then runs in float32)

Each figure is the median wall time of one synchronised forward (``torch.cuda.synchronize`` / ``mx.eval``)
after warm-up. ``--profile`` adds, at the largest batch: a per-tower split, PyTorch's GPU kernel time (profiler)
vs its host time to issue a forward, MLX's graph-build vs eval time, throughput at batch 256/1024, and
single-op timings at the vision tower's shapes.

Run on the lent GPU (see README "GPU benchmark"): MLX's CUDA wheels on ``PYTHONPATH``, then
``python3 bench/gpu.py``. ``python3 bench/gpu.py --smoke`` runs a tiny CPU fp32 check anywhere.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "daemon") not in sys.path:
    sys.path.insert(0, str(ROOT / "daemon"))  # run from a plain checkout, without `pip install -e .`

# openai/clip-vit-base-patch32 (config.json); BOS/EOS are the real CLIP vocabulary's.
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "projection_dim": 512,
}
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}
CLIP_CONFIG: dict[str, Any] = {
    "model_type": "clip",
    "text_config": TEXT_CONFIG,
    "vision_config": VISION_CONFIG,
    "projection_dim": 512,
    "logit_scale_init_value": 2.6592,
}
SEQ = 77
METHODS = ("torch", "mlx", "mlx_comp", "mlx_api")
TARGET_RATIO = 0.5  # issue 7: MLX fp16 batch 64 <= 0.5x PyTorch eager


def build_torch_model(seed: int = 0) -> Any:
    """transformers' CLIPModel (float32, CPU) with seeded random weights; norms and biases randomised too."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG), projection_dim=512)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # HF starts LayerNorms at (1, 0) and biases at 0: make every tensor count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    return model


def build_mlx_model(state: dict[str, Any], dtype: Any) -> Any:
    """mlxd's MLX CLIPModel holding ``state``'s tensors (a torch state dict) in ``dtype``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlxd_daemon.archs import clip

    weights = {}
    for name, tensor in state.items():
        if (new := clip.map_weight(name)) is None:
            continue
        arr = tensor.detach().float().cpu().numpy()
        if new == clip.PATCH_WEIGHT:
            arr = arr.transpose(0, 2, 3, 1)  # PyTorch conv2d [O, I, kH, kW] -> MLX [O, kH, kW, I], as load()
        weights[new] = mx.array(arr).astype(dtype)
    model = clip.CLIPModel(clip.ClipConfig.from_dict(CLIP_CONFIG))
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(dict(tree_flatten(model.parameters())))
    return model


def make_inputs(batch: int, seed: int = 1) -> dict[str, np.ndarray]:
    """``batch`` texts of 77 tokens (BOS, random ids, EOS last; no padding) and ``batch`` NCHW images."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 49406, size=(batch, SEQ), dtype=np.int64)
    ids[:, 0], ids[:, -1] = TEXT_CONFIG["bos_token_id"], TEXT_CONFIG["eos_token_id"]
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, SEQ), dtype=np.int64),
        "pixel_values": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32),
    }


# ---- the three ways of running a forward -------------------------------------------------------------------


def torch_forward(model: Any, ids: Any, mask: Any, pixels: Any, parts: str = "both") -> tuple[Any, Any]:
    """(text_embeds, image_embeds), L2-normalised, exactly as CLIPModel.forward computes them."""
    text = image = None
    if parts in ("both", "text"):
        pooled = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
        text = model.text_projection(pooled)
        text = text / text.norm(dim=-1, keepdim=True)
    if parts in ("both", "vision"):
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        image = model.visual_projection(pooled)
        image = image / image.norm(dim=-1, keepdim=True)
    return text, image


def _l2(x: Any) -> Any:
    import mlx.core as mx

    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


def mlx_forward(model: Any, ids: Any, keep: Any, eos_pos: Any, pixels_nhwc: Any, parts: str = "both") -> Any:
    """The repo's modules on device-resident mx inputs (the same maths as CLIPTextTransformer.__call__ /
    CLIPVisionTransformer.__call__, minus their numpy input handling), so it can be ``mx.compile``d."""
    import mlx.core as mx

    out = []
    if parts in ("both", "text"):
        t = model.text_model
        n = ids.shape[1]
        mask = mx.tril(mx.ones((n, n), dtype=mx.bool_))[None, None] & keep[:, None, None, :]
        x = t.final_layer_norm(t.encoder(t.embeddings(ids), mask))
        pooled = x[mx.arange(ids.shape[0]), eos_pos]
        out.append(_l2(model.text_projection(pooled)))
    if parts in ("both", "vision"):
        v = model.vision_model
        y = v.encoder(v.pre_layrnorm(v.embeddings(pixels_nhwc)))
        out.append(_l2(model.visual_projection(v.post_layernorm(y[:, 0]))))
    return tuple(out)


def mlx_api_forward(model: Any, inputs: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """What ClipBundle.forward_outputs does for the embeddings: numpy in, repo entry points."""
    text_pooled, _ = model.text_model(inputs["input_ids"], inputs["attention_mask"])
    image_pooled, _ = model.vision_model(inputs["pixel_values"])
    return _l2(model.text_projection(text_pooled)), _l2(model.visual_projection(image_pooled))


# ---- timing ----------------------------------------------------------------------------------------------------


def times_ms(fn: Callable[[], Any], sync: Callable[[Any], None], warmup: int, iters: int) -> list[float]:
    """Wall times (ms) of ``iters`` synchronised calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn: Callable[[], Any], sync: Callable[[Any], None], warmup: int, iters: int) -> float:
    return statistics.median(times_ms(fn, sync, warmup, iters))


def interleaved_ms(
    fns: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]], warmup: int, iters: int, rounds: int
) -> dict[str, list[float]]:
    """Time each of ``fns`` in ``rounds`` alternating blocks (so drift in host or GPU speed hits all alike)."""
    for fn, sync in fns.values():
        times_ms(fn, sync, warmup, 0)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    per_round = max(1, iters // rounds)
    for _ in range(rounds):
        for k, (fn, sync) in fns.items():
            samples[k] += times_ms(fn, sync, 2, per_round)
    return samples


def min_cosine(a: Any, b: Any) -> float:
    """Smallest row-wise cosine between two [N, P] embedding arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos.min())


def card_name(torch: Any) -> str:
    if not torch.cuda.is_available():
        return f"CPU ({platform.machine()})"
    name = torch.cuda.get_device_name(0)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
        return f"{name} [nvidia-smi: {smi.splitlines()[0]}]" if smi else name
    except (OSError, subprocess.SubprocessError):
        return name


def versions(torch: Any) -> str:
    import mlx.core as mx
    import transformers

    cuda = getattr(mx, "cuda", None)
    mlx_cuda = cuda.is_available() if cuda is not None and hasattr(cuda, "is_available") else "?"
    return (
        f"python {platform.python_version()}, mlx {mx.__version__} (default device {mx.default_device()}, "
        f"cuda available {mlx_cuda}), torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"transformers {transformers.__version__}"
    )


# ---- main --------------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        import mlx.core as mx
        import torch

        self.args = args
        self.gpu = torch.cuda.is_available() and not args.smoke
        self.tdev = torch.device("cuda" if self.gpu else "cpu")
        self.tdtype = torch.float16 if self.gpu else torch.float32
        self.mdtype = mx.float16 if self.gpu else mx.float32
        if not self.gpu:
            mx.set_default_device(mx.cpu)
        # MLX's CUDA allocator uses managed memory: keep it well under the card's free memory.
        mx.set_memory_limit(args.mlx_memory_gib << 30)
        cpu_model = build_torch_model(args.seed)
        self.mlx_model = build_mlx_model(cpu_model.state_dict(), self.mdtype)
        self.torch_model = cpu_model.to(device=self.tdev, dtype=self.tdtype).eval()
        attn = getattr(self.torch_model.config, "_attn_implementation", "?")
        print(f"torch attention implementation: {attn}", flush=True)
        self.compiled = mx.compile(self._mlx_fn)

    def _mlx_fn(self, ids: Any, keep: Any, eos_pos: Any, pixels: Any) -> Any:
        return mlx_forward(self.mlx_model, ids, keep, eos_pos, pixels)

    def device_inputs(self, batch: int) -> tuple[dict[str, np.ndarray], tuple[Any, ...], tuple[Any, ...]]:
        import mlx.core as mx
        import torch

        np_in = make_inputs(batch)
        t_in = (
            torch.from_numpy(np_in["input_ids"]).to(self.tdev),
            torch.from_numpy(np_in["attention_mask"]).to(self.tdev),
            torch.from_numpy(np_in["pixel_values"]).to(self.tdev, self.tdtype),
        )
        ids = np_in["input_ids"]
        eos = (ids == TEXT_CONFIG["eos_token_id"]).astype(np.int32).argmax(axis=-1)  # first EOS, as the repo
        m_in = (
            mx.array(ids.astype(np.int32)),
            mx.array(np_in["attention_mask"].astype(bool)),
            mx.array(eos.astype(np.int32)),
            mx.array(np_in["pixel_values"].transpose(0, 2, 3, 1)).astype(self.mdtype),
        )
        mx.eval(m_in)
        return np_in, t_in, m_in

    def torch_sync(self, _: Any) -> None:
        import torch

        if self.gpu:
            torch.cuda.synchronize()

    def run(self, batch: int) -> dict[str, float]:
        import mlx.core as mx
        import torch

        a = self.args
        np_in, t_in, m_in = self.device_inputs(batch)
        with torch.inference_mode():
            ref = [t.float().cpu().numpy() for t in torch_forward(self.torch_model, *t_in)]
            t0 = time.perf_counter()
            eager = self._mlx_fn(*m_in)
            mx.eval(eager)
            first_eager = time.perf_counter() - t0
            t0 = time.perf_counter()
            comp = self.compiled(*m_in)
            mx.eval(comp)
            first_comp = time.perf_counter() - t0
            api = mlx_api_forward(self.mlx_model, np_in)
            mx.eval(api)
            cos = {
                name: min(min_cosine(np.array(o[0].astype(mx.float32)), ref[0]),
                          min_cosine(np.array(o[1].astype(mx.float32)), ref[1]))
                for name, o in (("mlx", eager), ("mlx_comp", comp), ("mlx_api", api))
            }  # fmt: skip
            iters = a.iters if batch >= 32 else a.iters_small
            samples = interleaved_ms(
                {
                    "torch": (lambda: torch_forward(self.torch_model, *t_in), self.torch_sync),
                    "mlx": (lambda: self._mlx_fn(*m_in), mx.eval),
                    "mlx_comp": (lambda: self.compiled(*m_in), mx.eval),
                    "mlx_api": (lambda: mlx_api_forward(self.mlx_model, np_in), mx.eval),
                },
                a.warmup,
                iters,
                a.rounds,
            )
        res: dict[str, float] = {}
        for k, v in samples.items():
            q = statistics.quantiles(v, n=10) if len(v) > 1 else [v[0]] * 9
            res[k], res[f"{k}_p10"], res[f"{k}_p90"] = statistics.median(v), q[0], q[-1]
        res.update({f"cos_{k}": v for k, v in cos.items()})
        res["first_mlx_s"], res["first_comp_s"] = first_eager, first_comp
        return res

    def _overhead(self, batch: int, t_in: tuple[Any, ...], m_in: tuple[Any, ...]) -> None:
        """Where the time goes: host-side cost (graph building / kernel launches) vs GPU kernel time."""
        import mlx.core as mx
        import torch

        a = self.args
        fwd = lambda: torch_forward(self.torch_model, *t_in)  # noqa: E731
        # torch: host time to issue one forward (no sync) vs its synchronised total.
        issue, total = [], []
        for i in range(a.warmup + a.iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fwd()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if i >= a.warmup:
                issue.append(t1 - t0)
                total.append(time.perf_counter() - t0)
        i_ms, t_ms = statistics.median(issue) * 1e3, statistics.median(total) * 1e3
        print(f"{'torch: host issue | total':<34}{i_ms:>10.3f}{t_ms:>10.3f}")
        # MLX: graph construction (lazy, no eval) vs eval of the built graph.
        for name, fn in (("mlx", lambda: self._mlx_fn(*m_in)), ("mlx_comp", lambda: self.compiled(*m_in))):
            build, run = [], []
            for i in range(a.warmup + a.iters):
                t0 = time.perf_counter()
                out = fn()
                t1 = time.perf_counter()
                mx.eval(out)
                t2 = time.perf_counter()
                if i >= a.warmup:
                    build.append(t1 - t0)
                    run.append(t2 - t1)
            b_ms, r_ms = statistics.median(build) * 1e3, statistics.median(run) * 1e3
            print(f"{name + ': build graph | eval':<34}{b_ms:>10.3f}{r_ms:>10.3f}")
        # Throughput per 64 items at larger batches (more GPU-bound): pipelined, one sync per 5 forwards.
        for big in (256, 1024):
            _, tb, mb = self.device_inputs(big)
            tt = median_ms(lambda x=tb: [torch_forward(self.torch_model, *x) for _ in range(5)], self.torch_sync, 2, 5)
            mm = median_ms(lambda x=mb: [self._mlx_fn(*x) for _ in range(5)], mx.eval, 2, 5)
            mc = median_ms(lambda x=mb: [self.compiled(*x) for _ in range(5)], mx.eval, 2, 5)
            scale = 64 / big / 5
            print(f"{f'batch {big}, ms per 64 items':<34}{tt * scale:>10.3f}{mm * scale:>10.3f}{mc * scale:>10.3f}")
        mx.clear_cache()
        torch.cuda.empty_cache()

    def _torch_kernel_time(self, batch: int) -> None:
        """PyTorch's summed GPU kernel time per forward (profiler). Run last: it leaves torch's host side slower."""
        import torch

        _, t_in, _ = self.device_inputs(batch)
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch_forward(self.torch_model, *t_in)
            torch.cuda.synchronize()
        kernel_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
        print(f"{'torch: GPU kernel time / forward':<34}{kernel_ms:>10.3f}")

    def profile(self, batch: int) -> None:
        """Per-tower split at ``batch`` and single-op timings at the vision tower's shapes."""
        import mlx.core as mx
        import torch

        a = self.args
        _, t_in, m_in = self.device_inputs(batch)
        print(f"\nprofile, batch {batch} (median ms):")
        print(f"{'part':<34}{'torch':>10}{'mlx':>10}{'mlx_comp':>10}")
        with torch.inference_mode():
            for part in ("both", "text", "vision"):
                comp = mx.compile(lambda *x, p=part: mlx_forward(self.mlx_model, *x, parts=p))
                tt = median_ms(
                    lambda p=part: torch_forward(self.torch_model, *t_in, parts=p), self.torch_sync, a.warmup, a.iters
                )
                mm = median_ms(lambda p=part: mlx_forward(self.mlx_model, *m_in, parts=p), mx.eval, a.warmup, a.iters)
                mc = median_ms(lambda c=comp: c(*m_in), mx.eval, a.warmup, a.iters)
                label = "both towers (repeat)" if part == "both" else f"{part} tower + projection"
                print(f"{label:<34}{tt:>10.3f}{mm:>10.3f}{mc:>10.3f}")
            if self.gpu:
                self._overhead(batch, t_in, m_in)
            # The vision tower's ops at this batch: tokens = batch * 50, width 768, MLP 3072, 12 heads.
            tokens, d, h = batch * 50, 768, 12
            rng = np.random.default_rng(0)

            def pair(*shape: int) -> tuple[Any, Any]:
                x = rng.standard_normal(shape).astype(np.float32) * 0.1
                return torch.from_numpy(x).to(self.tdev, self.tdtype), mx.array(x).astype(self.mdtype)

            tx, mxx = pair(tokens, d)
            tw, mw = pair(4 * d, d)
            th, mh = pair(tokens, 4 * d)
            tq, mq = pair(batch, h, 50, d // h)
            tln, mln = pair(d)
            ops: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
                ("fc1 matmul [T,768]x[768,3072]", lambda: tx @ tw.T, lambda: mxx @ mw.T),
                ("qkv matmuls 3x[T,768]x[768,768]", lambda: [tx @ tw[:d].T for _ in range(3)],
                 lambda: [mxx @ mw[:d].T for _ in range(3)]),
                ("sdpa [B,12,50,64]", lambda: torch.nn.functional.scaled_dot_product_attention(tq, tq, tq),
                 lambda: mx.fast.scaled_dot_product_attention(mq, mq, mq, scale=(d // h) ** -0.5)),
                ("layer_norm [T,768]", lambda: torch.nn.functional.layer_norm(tx, (d,), tln, tln),
                 lambda: mx.fast.layer_norm(mxx, mln, mln, 1e-5)),
                ("quick_gelu [T,3072]", lambda: th * torch.sigmoid(1.702 * th),
                 lambda: mh * mx.sigmoid(1.702 * mh)),
                ("one tiny op (launch overhead)", lambda: tln + 1, lambda: mln + 1),
            ]  # fmt: skip
            for name, tf, mf in ops:
                tt = median_ms(tf, self.torch_sync, a.warmup, a.iters)
                mm = median_ms(mf, mx.eval, a.warmup, a.iters)
                print(f"{name:<34}{tt:>10.3f}{mm:>10.3f}{'':>10}")
        if self.gpu:
            self._torch_kernel_time(batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50, help="timed iterations at batch >= 32")
    p.add_argument("--iters-small", type=int, default=100, help="timed iterations at batch < 32")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing blocks per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlx-memory-gib", type=int, default=16, help="mx.set_memory_limit (managed memory)")
    p.add_argument("--profile", action="store_true", help="per-tower split and op timings at the largest batch")
    p.add_argument("--smoke", action="store_true", help="tiny CPU float32 run (no GPU needed)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.warmup, args.iters, args.iters_small, args.rounds = [2], 0, 1, 1, 1

    import torch

    bench = Bench(args)
    dtype = "fp16" if bench.gpu else "fp32"
    print(f"card: {card_name(torch)}")
    print(f"versions: {versions(torch)}")
    rows = []
    for batch in args.batches:
        r = bench.run(batch)
        rows.append((batch, r))
        spread = ", ".join(f"{k} {r[k]:.3f} [p10 {r[k + '_p10']:.3f}, p90 {r[k + '_p90']:.3f}]" for k in METHODS)
        print(f"batch {batch} done (ms): {spread}", flush=True)

    print(f"\nCLIP ViT-B/32 {dtype}, image+text features, N images 224x224 + N texts x 77 tokens (median ms)")
    head = (
        f"{'config':<22}{'torch':>10}{'mlx':>10}{'mlx_comp':>10}{'mlx_api':>10}"
        f"{'mlx/torch':>11}{'comp/torch':>11}{'api/torch':>10}{'min cos (mlx/comp/api)':>26}"
    )
    print(head)
    print("-" * len(head))
    for batch, r in rows:
        cos = f"{r['cos_mlx']:.5f}/{r['cos_mlx_comp']:.5f}/{r['cos_mlx_api']:.5f}"
        print(
            f"{f'B/32 {dtype} batch {batch}':<22}{r['torch']:>10.3f}{r['mlx']:>10.3f}{r['mlx_comp']:>10.3f}"
            f"{r['mlx_api']:>10.3f}{r['mlx'] / r['torch']:>11.3f}{r['mlx_comp'] / r['torch']:>11.3f}"
            f"{r['mlx_api'] / r['torch']:>10.3f}{cos:>26}"
        )
    print("first call (graph build + kernel JIT), s: " + ", ".join(
        f"batch {b}: mlx {r['first_mlx_s']:.2f}, mlx_comp {r['first_comp_s']:.2f}" for b, r in rows
    ))  # fmt: skip
    ok = all(r[f"cos_{k}"] > 0.999 for _, r in rows for k in ("mlx", "mlx_comp", "mlx_api"))
    print(f"numerics: min cosine vs torch {'> 0.999 everywhere' if ok else 'BELOW 0.999 somewhere'}")
    if 64 in dict(rows):
        r = dict(rows)[64]
        best = min(r["mlx"], r["mlx_comp"])
        verdict = "MET" if best <= TARGET_RATIO * r["torch"] else "NOT MET"
        print(
            f"target (MLX fp16 batch 64 <= {TARGET_RATIO}x torch eager): {verdict} "
            f"(best MLX {best:.3f} ms = {best / r['torch']:.3f}x of torch {r['torch']:.3f} ms)"
        )
    if args.profile:
        bench.profile(max(args.batches))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
