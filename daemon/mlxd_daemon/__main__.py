"""``mlxd``: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType

from mlxd_client.discovery import default_address

from mlxd_daemon import logs

LOOPBACK = ("localhost:", "127.0.0.1:", "[::1]:")


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxd", description="mlxd: PyTorch/Hugging Face -> MLX daemon")
    parser.add_argument(
        "--address",
        default=None,
        help="unix:///path/to.sock or localhost:PORT (default: $MLXD_ADDRESS or a per-user socket)",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=0.5,
        help="resident model budget: a fraction of RAM (<= 1) or bytes (default 0.5)",
    )
    parser.add_argument("--idle-timeout", type=float, default=0, help="exit after this many idle seconds (0: never)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    args = parser.parse_args(argv)

    log_json = None if args.log_format == "auto" else args.log_format == "json"
    logs.configure(args.log_level, log_json)
    from mlxd_daemon.server import Daemon

    budget = args.memory_budget
    budget_bytes = int(budget * total_memory_bytes()) if budget <= 1 else int(budget)
    address = args.address or default_address()
    if not address.startswith("unix://") and not address.startswith(LOOPBACK):
        parser.error(
            f"refusing to listen on {address}: mlxd has no authentication yet, so it listens only on a "
            "unix socket or a loopback address (localhost:PORT, 127.0.0.1:PORT, [::1]:PORT)"
        )
    daemon = Daemon(
        address,
        memory_budget=budget_bytes,
        log_level=args.log_level,
        log_json=log_json,
        idle_timeout=args.idle_timeout,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        daemon.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.start()
    daemon.wait()
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
