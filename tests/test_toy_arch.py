"""The architecture contract, as the acceptance test of adding one: ``toy_mlp.py`` (a module in tests/, nothing in
the daemon names it) is registered with ``MLXD_ARCH_MODULES`` and goes through a real daemon: convert, validate
(per layer too), infer, and calibrated quantization (AWQ) followed by validation of the quantized model."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import toy_mlp
from conftest import DaemonProcess, bug_responses
from mlxd_client import Client

TESTS = Path(__file__).parent
TEXTS = ["a toy sentence", "another, longer toy sentence with more bytes in it", "é"]


@pytest.fixture(scope="module")
def toy_daemon() -> Iterator[DaemonProcess]:
    """A daemon whose workers import ``toy_mlp`` from tests/ (registered, not a file in the package)."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="mlxd-toy-") as root:
        d = DaemonProcess(Path(root), env={"MLXD_ARCH_MODULES": "toy_mlp", "PYTHONPATH": path})
        yield d
        d.stop()
        assert bug_responses(d.log)[0] == []  # every error had its own code and reason


@pytest.fixture()
def toy_client(toy_daemon: DaemonProcess) -> Iterator[Client]:
    with toy_daemon.client() as c:
        yield c


def reference_embeds(src: Path, texts: list[str]) -> np.ndarray:
    return toy_mlp.run_reference(src, toy_mlp.tokenize(texts))["text_embeds"]


class TestToyArchitecture:
    def test_registered_module_goes_through_the_daemon(self, toy_client: Client, tmp_path: Path) -> None:
        """Convert takes route mlxd:toy_mlp; Validate passes with every layer paired; Infer equals the PyTorch
        reference; AWQ calibrates both blocks' Linears and the q4 model still validates and infers close."""
        from mlxd_daemon.archs.contract import ArchModule, Calibrates

        assert isinstance(toy_mlp, ArchModule) and isinstance(toy_mlp, Calibrates)  # what mypy checks structurally
        src = toy_mlp.make_checkpoint(tmp_path / "hf")
        assert "toy_mlp" in toy_client.initialize().capabilities.architectures

        converted = toy_client.convert(src, tmp_path / "mlx")
        assert (converted.model_type, converted.path) == ("toy_mlp", "mlxd:toy_mlp")

        report = toy_client.validate(tmp_path / "mlx", src)
        assert report.passed, [(o.name, o.max_abs, o.note) for o in report.outputs]
        assert [x.name for x in report.layers] == ["layers.0", "layers.1"]
        assert report.num_texts == len(toy_mlp.GOLDEN_SENTENCES)

        ref = reference_embeds(src, TEXTS)
        got = toy_client.infer(tmp_path / "mlx", texts=TEXTS).text_embeds
        np.testing.assert_allclose(got, ref, atol=1e-5)

        data = tmp_path / "calibration.txt"
        data.write_text("\n".join(f"calibration sample {i}: {' '.join(TEXTS[: i % 3 + 1])}" for i in range(64)))
        toy_client.convert(src, tmp_path / "awq", q_bits=4, q_group_size=32, q_method="awq",
                           q_calibration_data=str(data))  # fmt: skip
        manifest = json.loads((tmp_path / "awq" / "mlxd_manifest.json").read_text())
        methods = {x["name"]: x["method"] for x in manifest["layer_reports"] if x["bits"]}
        assert methods["layers.0.up"].startswith("awq: input scales")  # folded into layers.0.norm
        assert methods["layers.1.down"].startswith("awq→gptq")  # after the GELU: not scalable
        calibration = manifest["quantization"]["calibration"][0]
        assert (calibration["tower"], calibration["kind"], calibration["count"]) == ("model", "text", 64)

        q_report = toy_client.validate(tmp_path / "awq", src)
        assert (q_report.passed, q_report.band) == (True, "q4"), [(o.name, o.cosine) for o in q_report.outputs]
        q_embeds = toy_client.infer(tmp_path / "awq", texts=TEXTS).text_embeds
        assert float((q_embeds * ref).sum(-1).min()) > 0.95

    def test_unimportable_registered_module_says_so(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A module named in MLXD_ARCH_MODULES that does not import is FailedPrecondition naming the variable;
        the registry lists its model_type without importing it."""
        from mlxd_daemon import archs
        from mlxd_daemon.errors import FailedPrecondition

        monkeypatch.setenv("MLXD_ARCH_MODULES", "no_such_package.toy_mlp, clip")
        assert archs.resolve("toy_mlp").module == "no_such_package.toy_mlp" and "toy_mlp" in archs.architectures()
        with pytest.raises(FailedPrecondition) as e:
            archs.get_arch("toy_mlp")
        assert e.value.reason == "ARCH_MODULE_NOT_IMPORTABLE" and "MLXD_ARCH_MODULES" in e.value.message
