"""The daemon itself on a CUDA machine (MLX's CUDA backend): convert -> validate -> infer a tiny CLIP, then a q4
copy whose resident model keeps the quantized kernels. Prints what a user would check.

Run where `import mlx.core` finds a GPU (see README, "GPU"): PYTHONPATH=<site>:client:daemon python bench/gpu_daemon.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    import mlx.core as mx
    from mlxd_client import Client
    from mlxd_client.discovery import start_daemon
    from mlxd_daemon.fixtures import golden_images, make_clip

    print("MLX default device:", mx.default_device(), flush=True)
    with tempfile.TemporaryDirectory(prefix="mlxd-gpu-") as root:
        root_path = Path(root)
        src = make_clip(root_path / "hf", size="tiny", seed=0)
        pngs = []
        for i, image in enumerate(golden_images(2, size=40)):
            pngs.append(root_path / f"{i}.png")
            image.save(pngs[-1])
        address = f"unix://{root}/mlxd.sock"
        proc = start_daemon(address, log_path=root_path / "mlxd.log")
        try:
            with Client(address, autostart=False) as c:
                info = c.server_info
                assert info is not None
                print(f"daemon {info.daemon_version} pid {info.pid}, BLAS {info.blas}")
                result = c.convert(src, root_path / "mlx")
                print(f"convert: {result.num_tensors} tensors, {result.seconds:.2f} s")
                report = c.validate(root_path / "mlx", src)
                print(f"validate: passed={report.passed}, band {report.band}, "
                      f"min cosine {min(o.cosine for o in report.outputs):.6f}, "
                      f"first divergent layer {report.first_divergent_layer or '-'}")  # fmt: skip
                start = time.perf_counter()
                out = c.infer(root_path / "mlx", texts=["a red circle", "two cats"], images=pngs)
                ms = (time.perf_counter() - start) * 1e3
                print(f"infer: logits_per_image {out.logits_per_image.shape} in {ms:.1f} ms")
                q4 = c.quantize(root_path / "mlx", root_path / "q4", bits=4, group_size=32)
                print(f"quantize q4: {len(q4.quantized_layers)} layers, {q4.bits_per_weight:.2f} bits/weight")
                q_out = c.infer(root_path / "q4", texts=["a red circle", "two cats"], images=pngs)
                models = {m.id: m for m in c.list_models().models}
                for path in (root_path / "mlx", root_path / "q4"):
                    m = models[str(path)]
                    print(f"resident {path.name}: {m.resident_bytes} bytes, compute {m.compute_dtype!r}")
                cos = (out.text_embeds * q_out.text_embeds).sum(-1).min()
                print(f"q4 vs float text embeddings: min cosine {cos:.4f}")
                report = c.validate(root_path / "q4", src)
                print(f"validate q4: passed={report.passed}, band {report.band}")
        finally:
            proc.terminate()
            proc.wait(30)
        log = (root_path / "mlxd.log").read_text()
        print("daemon log lines:", len(log.splitlines()), "errors:", log.count('"level": "error"'))
    sys.exit(0)


if __name__ == "__main__":
    main()
