"""Specs for the block pipeline: whatever the block size, every output tensor equals a reference computed
independently on the whole tensor (a torch cast, ``mx.quantize``), so a faster writer cannot change a byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlxd_daemon import writer
from mlxd_daemon.convert import convert
from mlxd_daemon.fixtures.decoders import make_decoder
from mlxd_daemon.quantize import QuantOptions
from safetensors.torch import save_file

BLOCKS = (1 << 30, 4096)  # one block per tensor; a few rows per block (tensors split across many tasks)


def outputs(dst: Path) -> dict[str, np.ndarray]:
    """Every tensor of an MLX output directory, as raw bits (bfloat16 as uint16)."""
    found: dict[str, np.ndarray] = {}
    for f in sorted(dst.glob("*.safetensors")):
        for name, a in mx.load(str(f)).items():  # type: ignore[union-attr]
            found[name] = bits(a)
    return found


def bits(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


def quantized(w: mx.array, name: str) -> dict[str, np.ndarray]:
    """``mx.quantize`` of the whole weight: what a q4 g64 conversion must write for ``name``."""
    q, scales, biases = mx.quantize(w, group_size=64, bits=4)
    base = name.removesuffix(".weight")
    return {name: bits(q), f"{base}.scales": bits(scales), f"{base}.biases": bits(biases)}


def torch_cast(w: mx.array, dtype: torch.dtype) -> np.ndarray:
    t = torch.from_numpy(np.array(w.view(mx.int16))).view(torch.bfloat16)
    out = t.to(dtype)
    return out.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else out.numpy()


class TestBlocksEqualWholeTensorReferences:
    @pytest.mark.parametrize("block", BLOCKS)
    def test_cast_and_q4_of_a_bf16_checkpoint(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              block: int) -> None:  # fmt: skip
        """bf16 → float16 / float32 equal torch's cast, bf16 → q4 g64 equals mx.quantize of the whole tensor."""
        monkeypatch.setattr(writer, "BLOCK_BYTES", block)
        src = tmp_path / "src"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"model_type": "clip"}))
        g = torch.Generator().manual_seed(3)
        weights = {"text_model.a.weight": torch.randn(300, 256, generator=g) * 3,
                   "text_model.b.weight": torch.randn(64, 128, generator=g) * 1e-3,
                   "text_model.a.bias": torch.randn(300, generator=g),
                   "text_model.final_layer_norm.weight": torch.randn(256, generator=g)}  # fmt: skip
        weights["text_model.b.weight"][3, :64] = 0.0  # a constant group: scale from eps, bias 0
        save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, src / "model.safetensors")
        source = {k: mx.array(v.to(torch.bfloat16).view(torch.int16).numpy()).view(mx.bfloat16)
                  for k, v in weights.items()}  # fmt: skip
        for dtype in (torch.float16, torch.float32):
            convert(src, tmp_path / str(dtype), dtype=str(dtype).removeprefix("torch."))
            got = outputs(tmp_path / str(dtype))
            assert got.keys() == source.keys()
            for name, w in source.items():
                assert np.array_equal(got[name], torch_cast(w, dtype)), (dtype, name)
        convert(src, tmp_path / "q4", quantize=QuantOptions(bits=4, group_size=64))
        want = {k: torch_cast(v, torch.bfloat16) for k, v in source.items()}
        for name in ("text_model.a.weight", "text_model.b.weight"):
            del want[name]
            want.update(quantized(source[name], name))
        got = outputs(tmp_path / "q4")
        assert got.keys() == want.keys()
        for name in want:
            assert np.array_equal(got[name], want[name]), name


class TestDecodersEqualReferences:
    @pytest.mark.parametrize("arch", ["llama", "mixtral"])
    def test_float16_and_q4_equal_mlx_lm_sanitize_then_whole_tensor(self, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    arch: str) -> None:  # fmt: skip
        """llama's tensors are read from the file by position, mixtral's stacked experts evaluated through
        sanitize: both equal mlx-lm's sanitize of the source, cast or quantized as whole tensors."""
        from mlx_lm.utils import _get_classes
        from mlxd_daemon.archs._lm_convert import LmCheckpoint, fix_config, model_fields
        from mlxd_daemon.checkpoint import open_checkpoint, read_config

        monkeypatch.setattr(writer, "BLOCK_BYTES", 4096)
        src = make_decoder(tmp_path / "hf", arch, dtype="bfloat16")
        config, _ = fix_config(read_config(src), model_fields(read_config(src)))
        direct = [i.offset is not None for i in LmCheckpoint(open_checkpoint(src, config), config).tensors.values()]
        assert all(direct) if arch == "llama" else 0 < sum(direct) < len(direct)
        model_class, args_class = _get_classes(config)
        source: dict[str, Any] = {}
        for f in sorted(src.glob("*.safetensors")):
            source.update(mx.load(str(f)))  # type: ignore[arg-type]
        sane = model_class(args_class.from_dict(config)).sanitize(source)
        convert(src, tmp_path / "f16", dtype="float16")
        got = outputs(tmp_path / "f16")
        assert got.keys() == sane.keys()
        for name, w in sane.items():
            assert np.array_equal(got[name], torch_cast(w, torch.float16)), name
        result = convert(src, tmp_path / "q4", quantize=QuantOptions(bits=4, group_size=64))
        quant = set(result["quantized_layers"])
        got = outputs(tmp_path / "q4")
        for name, w in sane.items():
            want = quantized(w, name) if name.removesuffix(".weight") in quant else {name: bits(w)}
            for key, value in want.items():
                assert np.array_equal(got[key], value), key
        assert len(got) == len(sane) + 2 * len(quant)
