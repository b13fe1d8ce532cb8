"""Bad input over gRPC: each class gets a specific status code and ErrorInfo reason, the daemon keeps serving,
and nothing is left at the destination."""

from __future__ import annotations

import io
import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import DaemonProcess
from mlxd.v1 import mlxd_pb2 as pb
from mlxd.v1 import mlxd_pb2_grpc as pb_grpc
from mlxd_client import Client
from mlxd_client.discovery import is_serving
from mlxd_client.errors import MlxdClientError
from safetensors.torch import save_file


def clip_dir(root: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "clip"}))
    if tensors is not None:
        save_file(tensors, root / "model.safetensors")
    return root


class Exploit:
    """Would create a marker file if unpickled with code execution allowed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pwned"))  # type: ignore[return-value]


def truncated(root: Path) -> Path:
    src = clip_dir(root, {"text_model.w": torch.randn(64, 64)})
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    return src


def corrupt_header(root: Path) -> Path:
    src = clip_dir(root)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}")
    return src


def missing_shard(root: Path) -> Path:
    src = clip_dir(root, None)
    save_file({"a.weight": torch.randn(4, 4)}, src / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src


def pickle_with_code(root: Path) -> Path:
    src = clip_dir(root)
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Exploit(root.parent / "PWNED")}, f)
    return src


def unknown_arch(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "not_a_real_arch"}))
    return root


def fp16_overflow(root: Path) -> Path:
    return clip_dir(root, {"text_model.w": torch.full((4, 4), 1e6)})


def no_weights(root: Path) -> Path:
    return clip_dir(root)


def bad_config(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text("{ this is not json")
    return root


def plain(root: Path) -> Path:
    return clip_dir(root, {"text_model.w": torch.randn(64, 64)})


# (name, source builder, convert options, expected code, expected reason)
CASES = [
    ("truncated safetensors", truncated, {}, "INVALID_ARGUMENT", "BAD_CHECKPOINT"),
    ("corrupt header", corrupt_header, {}, "INVALID_ARGUMENT", "BAD_CHECKPOINT"),
    ("index names a missing shard", missing_shard, {}, "INVALID_ARGUMENT", "INDEX_MISMATCH"),
    ("pickle with code", pickle_with_code, {}, "INVALID_ARGUMENT", "UNSAFE_PICKLE"),
    ("unknown architecture", unknown_arch, {}, "UNIMPLEMENTED", "UNSUPPORTED_ARCHITECTURE"),
    ("fp16 overflow", fp16_overflow, {"dtype": "float16"}, "INVALID_ARGUMENT", "FLOAT16_OVERFLOW"),
    ("no weights", no_weights, {}, "INVALID_ARGUMENT", "NO_WEIGHTS"),
    ("malformed config.json", bad_config, {}, "INVALID_ARGUMENT", "BAD_CONFIG"),
    ("bad shard size", plain, {"max_shard_size": "12XB"}, "INVALID_ARGUMENT", "BAD_SIZE"),
    ("group size not allowed", plain, {"q_bits": 4, "q_group_size": 100}, "INVALID_ARGUMENT", "BAD_QUANT_GROUP_SIZE"),
    ("bits not allowed", plain, {"q_bits": 7}, "INVALID_ARGUMENT", "BAD_QUANT_BITS"),
    ("missing source", lambda root: root / "nope", {}, "NOT_FOUND", "SOURCE_NOT_FOUND"),
]


class TestConvertBadInput:
    @pytest.mark.parametrize(("name", "build", "options", "code", "reason"), CASES, ids=[c[0] for c in CASES])
    def test_specific_status_and_nothing_left(self, client: Client, tmp_path: Path, name: str,
                                              build: Callable[[Path], Path], options: dict[str, object],
                                              code: str, reason: str) -> None:  # fmt: skip
        """The case fails with its code and reason; health still SERVING; no output or temp dir left."""
        src = build(tmp_path / "src")
        dst = tmp_path / "out"
        with pytest.raises(MlxdClientError) as err:
            client.convert(src, dst, **options)
        assert (err.value.code, err.value.reason) == (code, reason), err.value.message
        assert err.value.message
        assert is_serving(client.address)
        assert not dst.exists()
        assert not [p for p in tmp_path.iterdir() if ".mlxd-" in p.name]
        assert not (tmp_path / "PWNED").exists()


class TestRequestBadInput:
    def test_bad_image_bytes(self, client: Client, tiny_clip: Path, tmp_path: Path) -> None:
        """Infer with bytes that are no image: INVALID_ARGUMENT / BAD_IMAGE."""
        dst = tmp_path / "mlx"
        client.convert(tiny_clip, dst)
        with pytest.raises(MlxdClientError) as err:
            client.infer(dst, images=[b"\x89PNG garbage"])
        assert (err.value.code, err.value.reason) == ("INVALID_ARGUMENT", "BAD_IMAGE")

    def test_empty_and_malformed_fields(self, daemon: DaemonProcess) -> None:
        """Empty paths, unknown enum numbers and empty inputs are INVALID_ARGUMENT, never UNKNOWN."""
        with grpc.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.MlxdStub(channel)
            calls = [
                lambda: list(stub.Convert(pb.ConvertRequest(src="", dst=""))),
                lambda: list(stub.Convert(pb.ConvertRequest(src="/a", dst="/b", dtype=99))),  # type: ignore[arg-type]
                lambda: list(stub.Validate(pb.ValidateRequest(model_dir="", reference=""))),
                lambda: stub.Infer(pb.InferRequest(model="")),
                lambda: stub.LoadModel(pb.LoadModelRequest(path="relative/path")),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert is_serving(daemon.address)

    def test_empty_infer_request(self, client: Client, tiny_clip: Path, tmp_path: Path) -> None:
        """Infer with neither texts nor images: INVALID_ARGUMENT / EMPTY_INPUT."""
        dst = tmp_path / "mlx"
        client.convert(tiny_clip, dst)
        with pytest.raises(MlxdClientError) as err:
            client.infer(dst)
        assert (err.value.code, err.value.reason) == ("INVALID_ARGUMENT", "EMPTY_INPUT")

    def test_oversize_message(self, daemon: DaemonProcess) -> None:
        """A request over the daemon's message limit is RESOURCE_EXHAUSTED, and the daemon keeps serving."""
        from mlxd_client.discovery import MAX_MESSAGE_BYTES

        big = b"\0" * (MAX_MESSAGE_BYTES + 1024)
        options = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(daemon.address, options=options) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.MlxdStub(channel).Infer(pb.InferRequest(model="/x", images=[big]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert is_serving(daemon.address)


class TestDamagedInputsFoundBySweep:
    def test_truncated_mlx_weights(self, client: Client, tiny_clip: Path, tmp_path: Path) -> None:
        """A converted model whose safetensors was cut short: Infer, LoadModel and Validate answer INVALID_ARGUMENT /
        BAD_CHECKPOINT naming the file (they answered INTERNAL)."""
        dst = tmp_path / "mlx"
        client.convert(tiny_clip, dst)
        weights = dst / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
        for call in (lambda: client.infer(dst, texts=["a"]), lambda: client.load_model(dst),
                     lambda: client.validate(dst, tiny_clip)):  # fmt: skip
            with pytest.raises(MlxdClientError) as err:
                call()
            assert (err.value.code, err.value.reason) == ("INVALID_ARGUMENT", "BAD_CHECKPOINT"), err.value.message
            assert str(weights) in err.value.message

    def test_garbage_calibration_npz(self, client: Client, tiny_clip: Path, tmp_path: Path) -> None:
        """Calibration data that is no readable .npz (here: not a zip at all): BAD_CALIBRATION_DATA, nothing left."""
        garbage = tmp_path / "calib.npz"
        garbage.write_bytes(b"\x93NUMPY garbage")
        with pytest.raises(MlxdClientError) as err:
            client.convert(tiny_clip, tmp_path / "out", q_bits=4, q_method="gptq", q_calibration_data=str(garbage))
        assert (err.value.code, err.value.reason) == ("INVALID_ARGUMENT", "BAD_CALIBRATION_DATA")
        assert not (tmp_path / "out").exists()

    def test_npy_passed_as_npz(self, client: Client, tiny_clip: Path, tmp_path: Path) -> None:
        """Validate inputs that are a lone .npy array, not an .npz archive: INVALID_ARGUMENT / BAD_NPZ (was
        INTERNAL: numpy returns an array, which is no archive)."""
        dst = tmp_path / "mlx"
        client.convert(tiny_clip, dst)
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((1, 7), dtype=np.int64))
        with pytest.raises(MlxdClientError) as err:
            client.validate(dst, tiny_clip, inputs_npz=buffer.getvalue())
        assert (err.value.code, err.value.reason) == ("INVALID_ARGUMENT", "BAD_NPZ")
