"""Helpers shared by test modules (not fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import DaemonProcess
from safetensors.torch import save_file


def slow_checkpoint(root: Path, tensors: int = 48, numel: int = 2_000_000) -> Path:
    """A CLIP-typed checkpoint of many large tensors: converting it takes long enough to interfere with."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "clip"}))
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            f"text_model.encoder.layers.{i}.mlp.fc1.weight": torch.randn(numel // 1000, 1000, generator=g)
            for i in range(tensors)
        },
        root / "model.safetensors",
    )
    return root


def worker_pid(daemon: DaemonProcess, role: str) -> int:
    """The pid of the daemon's worker ``role``, read from the daemon's own structured log."""
    pids = [
        json.loads(line)["pid"]
        for line in daemon.log.read_text().splitlines()
        if line.startswith("{") and '"worker_started"' in line and f'"role": "{role}"' in line
    ]
    assert pids, daemon.log.read_text()
    return int(pids[-1])
