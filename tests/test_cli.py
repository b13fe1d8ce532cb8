"""mlxctl as a user runs it: a subprocess that auto-starts its daemon and prints one JSON object per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest


class Mlxctl:
    def __init__(self, address: str) -> None:
        self.env = {**os.environ, "MLXD_ADDRESS": address}

    def run(self, *args: str, check: bool = True) -> tuple[int, Any, str]:
        proc = subprocess.run(
            [sys.executable, "-m", "mlxd_client.cli", "--json", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=300,
        )
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1, f"expected one JSON line, got:\n{proc.stdout}\n{proc.stderr}"
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.returncode, json.loads(lines[0]), proc.stderr


@pytest.fixture(scope="module")
def mlxctl() -> Iterator[Mlxctl]:
    with tempfile.TemporaryDirectory(prefix="mlxctl-") as root:
        cli = Mlxctl(f"unix://{root}/mlxd.sock")
        yield cli
        cli.run("daemon", "stop", check=False)


class TestMlxctl:
    def test_autostart_and_status(self, mlxctl: Mlxctl) -> None:
        """`daemon start --http` starts a daemon that also serves HTTP; `daemon status` reports both addresses."""
        _, status, _ = mlxctl.run("daemon", "status", check=False)
        assert status["running"] is False
        _, started, _ = mlxctl.run("daemon", "start", "--http", "127.0.0.1:0")
        assert started["started"] is True and started["protocol_version"] == 1
        assert started["http_address"].startswith("127.0.0.1:") and not started["http_address"].endswith(":0")
        _, status, _ = mlxctl.run("daemon", "status")
        assert status["running"] is True and status["pid"] == started["pid"]
        assert status["http_address"] == started["http_address"]

    def test_convert_validate_infer_models(
        self, mlxctl: Mlxctl, tiny_clip: Path, golden_pngs: list[Path], tmp_path: Path
    ) -> None:
        """convert, validate, infer and models each print one JSON object with the documented keys."""
        dst = tmp_path / "mlx"
        _, conv, _ = mlxctl.run("convert", str(tiny_clip), str(dst), "--dtype", "float32")
        assert conv["dtype"] == "float32" and conv["shards"][0]["file"] == "model.safetensors"
        assert conv["num_parameters"] > 0 and isinstance(conv["total_bytes"], int)
        code, report, _ = mlxctl.run("validate", str(dst), "--reference", str(tiny_clip), check=False)
        assert code == 0 and report["passed"] is True
        assert {o["name"] for o in report["outputs"]} >= {"text_embeds", "image_embeds"}
        _, out, _ = mlxctl.run("infer", str(dst), "--text", "a cat", "--text", "a dog", "--image", str(golden_pngs[0]))
        assert len(out["text_embeds"]) == 2 and len(out["image_embeds"]) == 1
        assert len(out["logits_per_image"]) == 1 and len(out["logits_per_image"][0]) == 2
        _, models, _ = mlxctl.run("models")
        assert [m["id"] for m in models["models"]] == [str(dst)]

    def test_dry_run_writes_nothing(self, mlxctl: Mlxctl, tiny_clip: Path, tmp_path: Path) -> None:
        """convert --dry-run prints the plan and writes nothing."""
        _, plan, _ = mlxctl.run("convert", str(tiny_clip), str(tmp_path / "x"), "--dry-run")
        assert plan["dry_run"] is True and plan["num_tensors"] > 0
        assert not (tmp_path / "x").exists()

    def test_error_is_json_with_code_and_reason(self, mlxctl: Mlxctl, tmp_path: Path) -> None:
        """A failed command exits 1 and prints {"error": {code, reason, message}}."""
        code, out, _ = mlxctl.run("convert", str(tmp_path / "missing"), str(tmp_path / "o"), check=False)
        assert code == 1
        assert out["error"]["code"] == "NOT_FOUND" and out["error"]["reason"] == "SOURCE_NOT_FOUND"

    def test_human_output_without_json(self, mlxctl: Mlxctl, tiny_clip: Path, tmp_path: Path) -> None:
        """Without --json, convert prints a readable summary (and no progress bar when not on a TTY)."""
        proc = subprocess.run(
            [sys.executable, "-m", "mlxd_client.cli", "convert", str(tiny_clip), str(tmp_path / "h")],
            capture_output=True,
            text=True,
            env=mlxctl.env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("wrote ") and "tensors" in proc.stdout
        assert "\r" not in proc.stderr

    def test_classifier_infer_prints_top_labels(self, mlxctl: Mlxctl, golden_pngs: list[Path], tmp_path: Path) -> None:
        """infer on a ViT classifier: --json carries logits, labels and the --top-k best labels with their softmax
        probabilities (best first); the human output prints them per image."""
        from mlxd_daemon.fixtures import make_vit

        dst = tmp_path / "mlx-vit"
        mlxctl.run("convert", str(make_vit(tmp_path / "vit", num_labels=5)), str(dst))
        images = [arg for p in golden_pngs[:2] for arg in ("--image", str(p))]
        _, out, _ = mlxctl.run("infer", str(dst), *images, "--top-k", "3")
        assert len(out["logits"]) == 2 and len(out["logits"][0]) == len(out["labels"]) == 5
        for logits, best in zip(out["logits"], out["top_k"], strict=True):
            probs = np.exp(np.array(logits) - max(logits))
            probs /= probs.sum()
            assert [b["label"] for b in best] == [out["labels"][i] for i in np.argsort(-probs)[:3]]
            np.testing.assert_allclose([b["probability"] for b in best], np.sort(probs)[::-1][:3], rtol=1e-6)
        text = subprocess.run([sys.executable, "-m", "mlxd_client.cli", "infer", str(dst), *images], env=mlxctl.env,
                              capture_output=True, text=True, timeout=300).stdout  # fmt: skip
        first = out["top_k"][0][0]
        assert f"image {golden_pngs[0]}: {first['label']} {first['probability']:.3f}, " in text
        assert "image_embeds" not in text

    def test_unmeasured_agreement_is_na(self, mlxctl: Mlxctl, tmp_path: Path) -> None:
        """validate of a model with nothing to match (a plain ViT encoder): matching_agreement is null, "n/a"."""
        from mlxd_daemon.fixtures import make_vit

        src, dst = make_vit(tmp_path / "vit", classifier=False), tmp_path / "mlx"
        mlxctl.run("convert", str(src), str(dst))
        _, report, _ = mlxctl.run("validate", str(dst), "--reference", str(src))
        assert report["passed"] is True and report["matching_agreement"] is None
        text = subprocess.run([sys.executable, "-m", "mlxd_client.cli", "validate", str(dst), "--reference", str(src)],
                              env=mlxctl.env, capture_output=True, text=True, timeout=300).stdout  # fmt: skip
        assert "matching agreement: n/a" in text

    def test_daemon_stop(self, mlxctl: Mlxctl) -> None:
        """`daemon stop` shuts the daemon down; status then says it is not running."""
        _, stopped, _ = mlxctl.run("daemon", "stop")
        assert stopped["stopped"] is True
        _, status, _ = mlxctl.run("daemon", "status", check=False)
        assert status["running"] is False
