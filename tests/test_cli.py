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

    def test_daemon_stop(self, mlxctl: Mlxctl) -> None:
        """`daemon stop` shuts the daemon down; status then says it is not running."""
        _, stopped, _ = mlxctl.run("daemon", "stop")
        assert stopped["stopped"] is True
        _, status, _ = mlxctl.run("daemon", "status", check=False)
        assert status["running"] is False
