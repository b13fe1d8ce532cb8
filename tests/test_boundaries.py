"""The front end's import boundary: the daemon process never loads mlx or torch (they live in the workers)."""

from __future__ import annotations

import json
import subprocess
import sys

FRONT_END = (
    "mlxd_daemon.__main__", "mlxd_daemon.server", "mlxd_daemon.servicer", "mlxd_daemon.service",
    "mlxd_daemon.messages", "mlxd_daemon.batching", "mlxd_daemon.jobs", "mlxd_daemon.workers",
    "mlxd_daemon.http_front", "mlxd_daemon.openai_wire", "mlxd_client", "mlxd_client.cli",
)  # fmt: skip


def loaded_packages(modules: tuple[str, ...], packages: tuple[str, ...]) -> list[str]:
    """Modules of ``packages`` in ``sys.modules`` after importing ``modules`` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


class TestFrontEndImports:
    def test_front_end_modules_import_neither_mlx_nor_torch(self) -> None:
        """Importing every front-end module (gRPC and HTTP) in a fresh interpreter loads no mlx and no torch."""
        assert loaded_packages(FRONT_END, ("mlx", "torch")) == []


class TestDaemonDoesNotImportTheClient:
    def test_daemon_modules_import_no_mlxd_client(self) -> None:
        """The daemon's front end loads nothing from mlxd_client: shared facts live in mlxd_common."""
        daemon_modules = tuple(m for m in FRONT_END if m.startswith("mlxd_daemon"))
        assert loaded_packages(daemon_modules, ("mlxd_client",)) == []
