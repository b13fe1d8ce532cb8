"""The front end's import boundary: the daemon process never loads mlx or torch (they live in the workers)."""

from __future__ import annotations

import subprocess
import sys

FRONT_END = (
    "mlxd_daemon.__main__", "mlxd_daemon.server", "mlxd_daemon.servicer", "mlxd_daemon.service",
    "mlxd_daemon.messages", "mlxd_daemon.batching", "mlxd_daemon.jobs", "mlxd_daemon.workers",
    "mlxd_daemon.http_front", "mlxd_daemon.openai_wire", "mlxd_client", "mlxd_client.cli",
)  # fmt: skip


class TestFrontEndImports:
    def test_front_end_modules_import_neither_mlx_nor_torch(self) -> None:
        """Importing every front-end module (gRPC and HTTP) in a fresh interpreter loads no mlx and no torch."""
        code = (
            "import importlib, sys\n"
            f"for name in {FRONT_END!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch')))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "[]"


class TestDaemonDoesNotImportTheClient:
    def test_daemon_modules_import_no_mlxd_client(self) -> None:
        """The daemon's front end loads nothing from mlxd_client: shared facts live in mlxd_common."""
        daemon_modules = tuple(m for m in FRONT_END if m.startswith("mlxd_daemon"))
        code = (
            "import importlib, sys\n"
            f"for name in {daemon_modules!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlxd_client'))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "[]"
