"""Specs for the conversion engine: streaming, dtypes, sharding, quantization, atomic output, errors."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlxd_daemon import archs
from mlxd_daemon.convert import convert, parse_size
from mlxd_daemon.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, Unsupported
from mlxd_daemon.progress import Reporter
from mlxd_daemon.quantize import QuantOptions
from safetensors import safe_open
from safetensors.torch import load_file, save_file

RESULT_KEYS = {
    "dst",
    "model_type",
    "dtype",
    "num_tensors",
    "num_parameters",
    "total_bytes",
    "shards",
    "copied_files",
    "dropped_tensors",
    "quantization",
    "quantized_layers",
    "skipped_layers",
    "layer_reports",
    "bits_per_weight",
    "bytes_before",
    "dequantized_layers",
    "float16_overflow",
    "seconds",
    "peak_rss_bytes",
    "dry_run",
}


def toy_arch() -> types.ModuleType:
    """Stand-in arch: strips ``model.``, drops ``*.position_ids``, keeps conv in PyTorch layout."""
    arch = types.ModuleType("toy")
    arch.map_weight = lambda name: None if name.endswith("position_ids") else name.removeprefix("model.")
    arch.DISK_LAYOUT = {"patch.weight": "OIHW"}
    return arch


@pytest.fixture(autouse=True)
def _toy_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    real = archs.get_arch
    monkeypatch.setattr(archs, "get_arch", lambda mt: toy_arch() if mt == "toy" else real(mt))


def toy_tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.fc1.weight": (16, 64),
        "model.fc1.bias": (16,),
        "model.fc2.weight": (64, 16),
        "model.odd.weight": (8, 30),
        "model.tok_embedding.weight": (20, 64),
        "model.position_embedding.weight": (7, 64),
        "model.norm.weight": (64,),
        "model.patch.weight": (8, 3, 2, 2),
    }
    t = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    t["model.position_ids"] = torch.arange(7)[None]
    t["model.token_type"] = torch.arange(4, dtype=torch.int32)
    return t


def make_src(
    root: Path, tensors: dict[str, torch.Tensor] | None = None, fmt: str = "safetensors", shards: int = 1
) -> Path:
    """A toy HF directory with tokenizer side files; tensors are split round-robin over ``shards`` files."""
    tensors = toy_tensors() if tensors is None else tensors
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 64}))
    (root / "tokenizer.json").write_text('{"added_tokens": [{"id": 0, "content": "<|é|>"}]}\n')
    (root / "merges.txt").write_bytes(b"#version: 0.2\n\xc4\xa0 t\r\n")
    (root / "README.md").write_text("not copied")
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    save = (lambda d, p: save_file(d, str(p))) if fmt == "safetensors" else torch.save
    if shards == 1:
        save(tensors, root / f"{stem}.{ext}")
        return root
    names, weight_map = sorted(tensors), {}
    for i in range(shards):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        save({n: tensors[n] for n in names[i::shards]}, root / file)
        weight_map.update(dict.fromkeys(names[i::shards], file))
    (root / f"{stem}.{ext}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


def read_out(dst: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(dst.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".mlxd-" in p.name)


def bits16(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


class TestConvert:
    @pytest.mark.parametrize(("fmt", "shards"), [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
    def test_round_trip(self, tmp_path: Path, fmt: str, shards: int) -> None:
        """Every kept tensor is written under its MLX name with equal values; dropped ones are reported."""
        src = make_src(tmp_path / "src", fmt=fmt, shards=shards)
        result = convert(src, tmp_path / "out")
        out = read_out(tmp_path / "out")
        expected = {k.removeprefix("model."): v for k, v in toy_tensors().items() if "position_ids" not in k}
        assert sorted(expected) == sorted(out)
        for name, t in expected.items():
            assert torch.equal(t, out[name]), name
        assert result["dropped_tensors"] == ["model.position_ids"]
        assert set(result) >= RESULT_KEYS
        assert (len(expected), "float32", False) == (
            result["num_tensors"],
            result["dtype"],
            result["dry_run"],
        )
        assert sum(t.numel() for t in expected.values()) == result["num_parameters"]

    def test_mlx_metadata_and_layouts(self, tmp_path: Path) -> None:
        """Shards carry format=mlx and the DISK_LAYOUT entries of their tensors; mx.load reads them."""
        convert(make_src(tmp_path / "src"), tmp_path / "out")
        with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == "mlx"
        assert json.loads(meta["mlxd.layout"]) == {"patch.weight": "OIHW"}
        assert mx.load(str(tmp_path / "out" / "model.safetensors"))["patch.weight"].shape == (8, 3, 2, 2)

    def test_side_files_copied_byte_for_byte(self, tmp_path: Path) -> None:
        """Tokenizer files are copied unchanged; unrelated files are not; config.json is carried over."""
        src = make_src(tmp_path / "src")
        result = convert(src, tmp_path / "out")
        assert result["copied_files"] == ["tokenizer.json", "merges.txt"]
        for name in result["copied_files"]:
            assert (src / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
        assert not (tmp_path / "out" / "README.md").exists()
        assert json.loads((tmp_path / "out/config.json").read_text()) == {
            "model_type": "toy",
            "hidden_size": 64,
        }

    def test_manifest(self, tmp_path: Path) -> None:
        """The manifest records version, source files (hashes for small files), dtype, layouts and drops."""
        src = make_src(tmp_path / "src")
        convert(src, tmp_path / "out", dtype="bfloat16")
        m = json.loads((tmp_path / "out" / "mlxd_manifest.json").read_text())
        files = {f["name"]: f for f in m["source"]["files"]}
        assert {"config.json", "model.safetensors", "tokenizer.json", "merges.txt"} == set(files)
        assert "sha256" in files["tokenizer.json"] and "sha256" not in files["model.safetensors"]
        assert (m["dtype"], m["source"]["weight_format"], m["layouts"]) == (
            "bfloat16",
            "safetensors",
            {"patch.weight": "OIHW"},
        )
        assert m["dropped_tensors"] == ["model.position_ids"]
        assert m["mlxd_version"] and m["created_at"]

    def test_progress_events(self, tmp_path: Path) -> None:
        """begin carries the tensor and byte totals, then one report per tensor, then end."""
        events: list[dict[str, Any]] = []
        result = convert(make_src(tmp_path / "src"), tmp_path / "out", reporter=Reporter(events.append))
        assert ("begin", "convert", result["num_tensors"], result["total_bytes"]) == (
            events[0]["kind"],
            events[0]["stage"],
            events[0]["items_total"],
            events[0]["bytes_total"],
        )
        reports = [e for e in events if e["kind"] == "report"]
        assert list(range(1, result["num_tensors"] + 1)) == [e["items_done"] for e in reports]
        assert events[-1]["kind"] == "end"


class TestDtypes:
    def test_bf16_to_bf16_is_bit_exact(self, tmp_path: Path) -> None:
        """A bfloat16 checkpoint converted with auto keeps bfloat16 and every bit."""
        src_t = toy_tensors(torch.bfloat16)
        result = convert(make_src(tmp_path / "src", src_t), tmp_path / "out")
        out = read_out(tmp_path / "out")
        assert result["dtype"] == "bfloat16"
        assert torch.equal(bits16(src_t["model.fc1.weight"]), bits16(out["fc1.weight"]))

    def test_bf16_to_fp32_is_exact(self, tmp_path: Path) -> None:
        """bfloat16 → float32 widens exactly: narrowing back gives the original bits."""
        src_t = toy_tensors(torch.bfloat16)
        convert(make_src(tmp_path / "src", src_t, fmt="bin"), tmp_path / "out", dtype="float32")
        out = read_out(tmp_path / "out")["fc2.weight"]
        assert torch.float32 == out.dtype
        assert torch.equal(bits16(src_t["model.fc2.weight"]), bits16(out.to(torch.bfloat16)))

    def test_auto_is_majority_by_bytes(self, tmp_path: Path) -> None:
        """auto follows the tensors (majority by bytes), not config torch_dtype; ints are kept as they are."""
        src_t = toy_tensors(torch.float16)
        src_t["model.norm.weight"] = src_t["model.norm.weight"].float()
        src = make_src(tmp_path / "src", src_t)
        (src / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
        result = convert(src, tmp_path / "out")
        out = read_out(tmp_path / "out")
        assert ("float16", torch.float16) == (result["dtype"], out["norm.weight"].dtype)
        assert torch.equal(src_t["model.token_type"], out["token_type"])

    def test_float16_overflow_is_refused(self, tmp_path: Path) -> None:
        """Values beyond ±65504 refuse a float16 target, naming every such tensor; nothing is left behind."""
        src_t = toy_tensors()
        src_t["model.fc1.weight"][0, 0] = 1e5
        src_t["model.norm.weight"][3] = -7e4
        src_t["model.fc2.weight"][0, 0] = float("inf")  # not an overflow: already inf
        with pytest.raises(InvalidArgument) as e:
            convert(make_src(tmp_path / "src", src_t), tmp_path / "out", dtype="float16")
        assert e.value.reason == "FLOAT16_OVERFLOW"
        assert e.value.metadata["tensors"] == "model.fc1.weight,model.norm.weight"
        assert "100000" in e.value.message and "bfloat16 or float32" in e.value.message
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    def test_bad_dtype(self, tmp_path: Path) -> None:
        """An unknown dtype is BAD_DTYPE."""
        with pytest.raises(InvalidArgument) as e:
            convert(make_src(tmp_path / "src"), tmp_path / "out", dtype="float8")
        assert e.value.reason == "BAD_DTYPE"


class TestSharding:
    @pytest.mark.parametrize("limit", [1000, "4KB", 10_000])
    def test_shards_respect_limit_and_index(self, tmp_path: Path, limit: int | str) -> None:
        """Each shard holds ≤ limit bytes unless it is a single larger tensor; the index maps every tensor."""
        result = convert(make_src(tmp_path / "src"), tmp_path / "out", max_shard_size=limit)
        out, n = tmp_path / "out", len(result["shards"])
        assert n > 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert list(index["weight_map"]) == sorted(index["weight_map"])
        assert result["total_bytes"] == index["metadata"]["total_size"]
        assert result["num_parameters"] == index["metadata"]["total_parameters"]
        files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert files == [s["file"] for s in result["shards"]]
        assert not (out / "model.safetensors").exists()
        for f in files:
            tensors = load_file(str(out / f))
            assert tensors, f"{f} is empty"
            assert set(tensors) == {k for k, v in index["weight_map"].items() if v == f}
            size = sum(t.nbytes for t in tensors.values())
            assert size <= parse_size(limit) or len(tensors) == 1

    def test_single_shard_has_no_index(self, tmp_path: Path) -> None:
        """Everything within the limit goes to model.safetensors without an index file."""
        result = convert(make_src(tmp_path / "src", shards=2), tmp_path / "out")
        assert [s["file"] for s in result["shards"]] == ["model.safetensors"]
        assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


class TestParseSize:
    @pytest.mark.parametrize(
        ("expected", "text"),
        [(500_000_000, "500MB"), (2_000_000_000, "2GB"), (2 * 2**30, "2GiB"), (1536, "1.5KiB"), (7, 7)],
    )
    def test_units(self, expected: int, text: int | str) -> None:
        """Decimal (KB/MB/GB) and binary (KiB/MiB/GiB) units and plain ints are understood."""
        assert expected == parse_size(text)

    @pytest.mark.parametrize("text", ["lots", "5 parsecs", "-1", 0, "GB"])
    def test_bad(self, text: int | str) -> None:
        """Anything else is BAD_SIZE."""
        with pytest.raises(InvalidArgument) as e:
            parse_size(text)
        assert e.value.reason == "BAD_SIZE"


class TestErrors:
    def test_source_not_found(self, tmp_path: Path) -> None:
        """A missing source is NotFound SOURCE_NOT_FOUND."""
        with pytest.raises(NotFound) as e:
            convert(tmp_path / "missing", tmp_path / "out")
        assert e.value.reason == "SOURCE_NOT_FOUND"

    def test_no_config_and_no_weights(self, tmp_path: Path) -> None:
        """No config.json is NO_CONFIG; a config without weights is NO_WEIGHTS."""
        (tmp_path / "src").mkdir()
        with pytest.raises(InvalidArgument) as e:
            convert(tmp_path / "src", tmp_path / "out")
        assert e.value.reason == "NO_CONFIG"
        (tmp_path / "src" / "config.json").write_text('{"model_type": "toy"}')
        with pytest.raises(InvalidArgument) as e:
            convert(tmp_path / "src", tmp_path / "out")
        assert e.value.reason == "NO_WEIGHTS"

    def test_unsupported_arch_before_reading_weights(self, tmp_path: Path) -> None:
        """An unknown model_type is Unsupported even when the weights are garbage: they are never read."""
        src = tmp_path / "src"
        src.mkdir()
        (src / "config.json").write_text('{"model_type": "no_such_arch"}')
        (src / "model.safetensors").write_bytes(b"garbage")
        with pytest.raises(Unsupported) as e:
            convert(src, tmp_path / "out")
        assert e.value.reason == "UNSUPPORTED_ARCHITECTURE"

    def test_output_exists(self, tmp_path: Path) -> None:
        """An existing output without overwrite is OUTPUT_EXISTS and says how to proceed."""
        (tmp_path / "out").mkdir()
        with pytest.raises(FailedPrecondition) as e:
            convert(make_src(tmp_path / "src"), tmp_path / "out")
        assert e.value.reason == "OUTPUT_EXISTS"
        assert "pass --overwrite or choose another path" in e.value.message

    def test_output_containing_source(self, tmp_path: Path) -> None:
        """An output path that is or contains the source is refused, even with --overwrite."""
        src = make_src(tmp_path / "src")
        for dst in (src, tmp_path):
            with pytest.raises(InvalidArgument) as e:
                convert(src, dst, overwrite=True)
            assert e.value.reason == "OUTPUT_IS_SOURCE"

    def test_nothing_left_after_mapping(self, tmp_path: Path) -> None:
        """A checkpoint whose every tensor the arch drops is NO_TENSORS rather than an empty model."""
        src = make_src(tmp_path / "src", {"model.position_ids": torch.arange(3)})
        with pytest.raises(InvalidArgument) as e:
            convert(src, tmp_path / "out")
        assert e.value.reason == "NO_TENSORS"

    def test_index_mismatch(self, tmp_path: Path) -> None:
        """A sharded source whose index lacks a tensor is INDEX_MISMATCH."""
        src = make_src(tmp_path / "src", shards=2)
        index = json.loads((src / "model.safetensors.index.json").read_text())
        del index["weight_map"]["model.fc1.bias"]
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(InvalidArgument) as e:
            convert(src, tmp_path / "out")
        assert e.value.reason == "INDEX_MISMATCH" and "model.fc1.bias" in e.value.message

    @pytest.mark.parametrize(
        ("kw", "reason"), [({"bits": 7}, "BAD_QUANT_BITS"), ({"group_size": 48}, "BAD_QUANT_GROUP_SIZE")]
    )
    def test_bad_quantization_flags(self, tmp_path: Path, kw: dict[str, int], reason: str) -> None:
        """Bits outside 2,3,4,5,6,8 and group sizes outside 32/64/128 are rejected."""
        with pytest.raises(InvalidArgument) as e:
            convert(make_src(tmp_path / "src"), tmp_path / "out", quantize=QuantOptions(**kw))
        assert reason == e.value.reason


def cancel_after(n: int) -> Reporter:
    seen = {"reports": 0}

    def emit(event: dict[str, Any]) -> None:
        seen["reports"] += event["kind"] == "report"

    return Reporter(emit, lambda: seen["reports"] >= n)


class TestAtomicity:
    def test_cancel_leaves_nothing(self, tmp_path: Path) -> None:
        """Cancelling mid-write (after some shards were flushed) leaves neither dst nor a temp dir."""
        with pytest.raises(Cancelled):
            convert(make_src(tmp_path / "src"), tmp_path / "out", max_shard_size=1000, reporter=cancel_after(6))
        assert not (tmp_path / "out").exists()
        assert leftovers(tmp_path) == []

    def test_failed_overwrite_keeps_old_output(self, tmp_path: Path) -> None:
        """With overwrite, a failure midway leaves the previous output untouched."""
        old = tmp_path / "out"
        old.mkdir()
        (old / "config.json").write_text("old")
        with pytest.raises(Cancelled):
            convert(make_src(tmp_path / "src"), old, overwrite=True, reporter=cancel_after(3))
        assert [p.name for p in old.iterdir()] == ["config.json"]
        assert (old / "config.json").read_text() == "old"
        assert leftovers(tmp_path) == []

    def test_overwrite_replaces(self, tmp_path: Path) -> None:
        """With overwrite, a completed conversion replaces the previous output entirely."""
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "mlxd_manifest.json").write_text("{}")
        (tmp_path / "out" / "stale.safetensors").write_text("x")
        convert(make_src(tmp_path / "src"), tmp_path / "out", overwrite=True)
        assert not (tmp_path / "out" / "stale.safetensors").exists()
        assert (tmp_path / "out" / "model.safetensors").exists()
        assert leftovers(tmp_path) == []


class TestDryRun:
    def test_writes_nothing(self, tmp_path: Path) -> None:
        """A dry run creates no files and returns the shard plan, dtypes and a memory estimate."""
        result = convert(make_src(tmp_path / "src"), tmp_path / "new" / "out", dry_run=True, max_shard_size=2000)
        assert not (tmp_path / "new").exists()
        assert result["dry_run"] and len(result["shards"]) > 1
        assert result["total_bytes"] == sum(s["bytes"] for s in result["shards"])
        assert result["tensor_dtypes"] == {"float32": 8, "int32": 1}
        assert result["estimated_peak_bytes"] > 0


class TestQuantize:
    def test_quantized_output(self, tmp_path: Path) -> None:
        """Linear/Embedding weights become weight/scales/biases that mx.load reads and dequantize closely."""
        src_t = toy_tensors()
        result = convert(
            make_src(tmp_path / "src", src_t), tmp_path / "out", quantize=QuantOptions(bits=8, group_size=32)
        )
        q = {"group_size": 32, "bits": 8, "mode": "affine"}
        assert {**q, "overrides": [], "recipe": None} == result["quantization"]
        assert result["quantized_layers"] == ["fc1", "tok_embedding"]  # fc2 has input dim 16
        weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
        for layer in result["quantized_layers"]:
            assert mx.uint32 == weights[f"{layer}.weight"].dtype
            w = mx.dequantize(
                weights[f"{layer}.weight"],
                weights[f"{layer}.scales"],
                weights[f"{layer}.biases"],
                group_size=32,
                bits=8,
            )
            ref = src_t[f"model.{layer}.weight"].numpy()
            np.testing.assert_allclose(ref, np.array(w), atol=0.02)
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert (q, q) == (config["quantization"], config["quantization_config"])

    def test_skipped_layers_have_reasons(self, tmp_path: Path) -> None:
        """Convs, norms, position embeddings and non-divisible layers stay float, each with a reason."""
        result = convert(make_src(tmp_path / "src"), tmp_path / "out", quantize=QuantOptions())
        reasons = {s["name"]: s["reason"] for s in result["skipped_layers"]}
        assert reasons["odd"] == "input dim 30 not divisible by group size 64"  # nor by 32: no fallback
        assert reasons["patch"].startswith("convolution")
        assert reasons["norm"] == "normalization layer"
        assert "position embedding" in reasons["position_embedding"]
        out = read_out(tmp_path / "out")
        assert torch.float32 == out["odd.weight"].dtype and "odd.scales" not in out
        assert result["total_bytes"] == sum(t.nbytes for t in out.values())

    @pytest.mark.parametrize("bits", [3, 4, 6])
    def test_planned_shapes_match_mlx(self, tmp_path: Path, bits: int) -> None:
        """The planned byte counts (used for sharding) equal what mx.quantize produced."""
        result = convert(
            make_src(tmp_path / "src"), tmp_path / "out", quantize=QuantOptions(bits=bits), dtype="bfloat16"
        )
        out = read_out(tmp_path / "out")
        assert result["total_bytes"] == sum(t.nbytes for t in out.values())
        assert torch.bfloat16 == out["fc1.scales"].dtype


@pytest.mark.skipif(importlib.util.find_spec("mlxd_daemon.archs.clip") is None, reason="archs/clip.py not there yet")
class TestRealClip:
    @pytest.mark.parametrize("fmt", ["safetensors", "bin"])
    def test_tiny_clip_quantized(self, tmp_path: Path, fmt: str) -> None:
        """A tiny bf16 HF CLIP converts and quantizes with the real arch, and clip.load accepts the result."""
        from mlxd_daemon.archs import clip
        from mlxd_daemon.fixtures import make_clip

        src = make_clip(tmp_path / "src", dtype="bfloat16", weights_format=fmt)
        result = convert(src, tmp_path / "out", quantize=QuantOptions(group_size=32), max_shard_size="50KB")
        assert (result["model_type"], result["dtype"]) == ("clip", "bfloat16")
        assert len(result["shards"]) > 1
        assert {"text_model.embeddings.token_embedding", "text_projection"} <= set(result["quantized_layers"])
        assert not any("position_embedding" in q for q in result["quantized_layers"])
        assert {"tokenizer.json", "vocab.json", "merges.txt"} <= set(result["copied_files"])
        for name in result["copied_files"]:
            assert (src / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
        assert clip.load(tmp_path / "out").quantization == {"group_size": 32, "bits": 4, "mode": "affine"}

    def test_tiny_clip_matches_reference(self, tmp_path: Path) -> None:
        """A float32 conversion loaded by clip.load gives the transformers outputs (CLIP text atol 1e-5)."""
        from mlxd_daemon.archs import clip
        from mlxd_daemon.fixtures import make_clip

        src = make_clip(tmp_path / "src", weights_format="bin")
        convert(src, tmp_path / "out")
        inputs = clip.golden_inputs(tmp_path / "out")
        got = clip.run_mlx(clip.load(tmp_path / "out"), inputs)
        want = clip.run_reference(src, inputs)
        for key in ("text_embeds", "image_embeds"):
            np.testing.assert_allclose(want[key], got[key], atol=1e-4, rtol=1e-4)
