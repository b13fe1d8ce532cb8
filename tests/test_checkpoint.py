"""Specs for reading source checkpoints: config, weight discovery, index cross-check, safe unpickling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlxd_daemon.checkpoint import dominant_float_dtype, find_weights, open_checkpoint, read_config
from mlxd_daemon.errors import InvalidArgument, NotFound
from safetensors.torch import save_file


def write_dir(root: Path, tensors: dict[str, torch.Tensor], fmt: str = "safetensors", shards: int = 1) -> Path:
    """A minimal HF directory with ``tensors`` split round-robin over ``shards`` files of format ``fmt``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "toy"}))
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    names = sorted(tensors)
    if shards == 1:
        _save(tensors, root / f"{stem}.{ext}", fmt)
        return root
    weight_map = {}
    for i in range(shards):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: tensors[n] for n in names[i::shards]}
        _save(part, root / file, fmt)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return root


def _save(tensors: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


class Evil:
    """Unpickling this would run code that writes a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


TENSORS = {
    "a.weight": torch.randn(4, 8),
    "b.weight": torch.randn(8, dtype=torch.float64),
    "c.ids": torch.arange(5),
}


class TestReadConfig:
    def test_missing_source(self, tmp_path: Path) -> None:
        """A source path that does not exist is NotFound with reason SOURCE_NOT_FOUND."""
        with pytest.raises(NotFound) as e:
            read_config(tmp_path / "nope")
        assert e.value.reason == "SOURCE_NOT_FOUND"

    def test_no_config(self, tmp_path: Path) -> None:
        """A directory without config.json is rejected with NO_CONFIG."""
        with pytest.raises(InvalidArgument) as e:
            read_config(tmp_path)
        assert e.value.reason == "NO_CONFIG"

    def test_no_model_type(self, tmp_path: Path) -> None:
        """A config.json without model_type is rejected with NO_MODEL_TYPE."""
        (tmp_path / "config.json").write_text("{}")
        with pytest.raises(InvalidArgument) as e:
            read_config(tmp_path)
        assert e.value.reason == "NO_MODEL_TYPE"


class TestFindWeights:
    def test_no_weights_lists_what_was_looked_for(self, tmp_path: Path) -> None:
        """Without weights the NO_WEIGHTS message names every file name that was tried."""
        (tmp_path / "config.json").write_text('{"model_type": "toy"}')
        with pytest.raises(InvalidArgument) as e:
            find_weights(tmp_path)
        assert e.value.reason == "NO_WEIGHTS"
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            assert name in e.value.message

    def test_prefers_safetensors(self, tmp_path: Path) -> None:
        """When both formats are present safetensors is used, since it needs no unpickling."""
        write_dir(tmp_path, TENSORS, "bin")
        write_dir(tmp_path, TENSORS, "safetensors")
        assert find_weights(tmp_path)[0] == "safetensors"


class TestOpenCheckpoint:
    @pytest.mark.parametrize(("fmt", "shards"), [("safetensors", 1), ("safetensors", 2), ("bin", 1), ("bin", 2)])
    def test_reads_every_tensor(self, tmp_path: Path, fmt: str, shards: int) -> None:
        """Names, dtypes and shapes come from headers and every tensor reads back equal."""
        ckpt = open_checkpoint(write_dir(tmp_path, TENSORS, fmt, shards), {"model_type": "toy"})
        assert sorted(TENSORS) == sorted(ckpt.tensors)
        for name, t in TENSORS.items():
            assert (t.dtype, tuple(t.shape)) == (ckpt.tensors[name].dtype, ckpt.tensors[name].shape)
            assert torch.equal(t, ckpt.get(name))
        assert ckpt.weight_format == fmt
        assert len(ckpt.weight_files) == shards

    def test_legacy_pickle_format(self, tmp_path: Path) -> None:
        """A pre-zip torch.save file (cannot be mmap'd) still loads, with weights_only."""
        write_dir(tmp_path, {})
        (tmp_path / "model.safetensors").unlink()
        torch.save(TENSORS, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        ckpt = open_checkpoint(tmp_path, {"model_type": "toy"})
        assert torch.equal(TENSORS["a.weight"], ckpt.get("a.weight"))

    @pytest.mark.parametrize("legacy", [False, True])
    def test_unsafe_pickle_is_refused_without_running_it(self, tmp_path: Path, legacy: bool) -> None:
        """A pickle that needs code to load raises UNSAFE_PICKLE and its payload never runs."""
        write_dir(tmp_path, {})
        (tmp_path / "model.safetensors").unlink()
        marker = tmp_path / "pwned.txt"
        payload = {"w": torch.ones(2), "evil": Evil(marker)}
        torch.save(payload, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        with pytest.raises(InvalidArgument) as e:
            open_checkpoint(tmp_path, {"model_type": "toy"})
        assert e.value.reason == "UNSAFE_PICKLE"
        assert not marker.exists()

    def test_missing_shard_file(self, tmp_path: Path) -> None:
        """An index naming a shard that is not on disk is INDEX_MISMATCH naming that file."""
        write_dir(tmp_path, TENSORS, shards=2)
        (tmp_path / "model-00002-of-00002.safetensors").unlink()
        with pytest.raises(InvalidArgument) as e:
            open_checkpoint(tmp_path, {"model_type": "toy"})
        assert e.value.reason == "INDEX_MISMATCH"
        assert "model-00002-of-00002.safetensors" in e.value.message

    def test_indexed_tensor_missing_from_shards(self, tmp_path: Path) -> None:
        """A tensor listed in the index but absent from the shards is INDEX_MISMATCH naming it."""
        write_dir(tmp_path, TENSORS, shards=2)
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(InvalidArgument) as e:
            open_checkpoint(tmp_path, {"model_type": "toy"})
        assert e.value.reason == "INDEX_MISMATCH"
        assert "ghost.weight" in e.value.message

    def test_shard_tensor_missing_from_index(self, tmp_path: Path) -> None:
        """A tensor present in a shard but not in the index is INDEX_MISMATCH naming it."""
        write_dir(tmp_path, TENSORS, "bin", shards=2)
        index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
        del index["weight_map"]["c.ids"]
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        with pytest.raises(InvalidArgument) as e:
            open_checkpoint(tmp_path, {"model_type": "toy"})
        assert e.value.reason == "INDEX_MISMATCH"
        assert "c.ids" in e.value.message


class TestDominantFloatDtype:
    def test_majority_by_bytes(self, tmp_path: Path) -> None:
        """The dtype holding most bytes wins, not the one with most tensors; int tensors do not vote."""
        tensors = {
            "big": torch.zeros(1000, dtype=torch.bfloat16),
            "s1": torch.zeros(10),
            "s2": torch.zeros(10),
            "ids": torch.zeros(10_000, dtype=torch.int64),
        }
        ckpt = open_checkpoint(write_dir(tmp_path, tensors), {"model_type": "toy"})
        assert torch.bfloat16 == dominant_float_dtype(ckpt.tensors)
