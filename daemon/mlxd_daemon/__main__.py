"""``mlxd``: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from pathlib import Path
from types import FrameType

from mlxd_common.endpoint import ENV_TOKEN, default_address, runtime_dir

from mlxd_daemon import logs

LOOPBACK = ("localhost:", "127.0.0.1:", "[::1]:")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxd", description="mlxd: PyTorch/Hugging Face -> MLX daemon (foreground)")
    p.add_argument("--address", help="unix:///path/to.sock or HOST:PORT (default: $MLXD_ADDRESS or a per-user socket)")
    p.add_argument("--memory-budget", type=float, default=0.5,
                   help="resident model budget: a fraction of RAM (<= 1) or bytes (default 0.5)")  # fmt: skip
    p.add_argument("--idle-timeout", type=float, default=0, help="exit after this many idle seconds (0: never)")
    p.add_argument("--state-dir", type=Path, help="job journal and discovery files (default: beside the socket)")
    p.add_argument("--allowed-root", action="append", default=[],
                   help="only read and write model paths under this directory (repeatable)")  # fmt: skip
    p.add_argument("--offline", action="store_true",
                   help="resolve Hugging Face Hub ids from the cache only (as HF_HUB_OFFLINE=1)")  # fmt: skip
    p.add_argument("--allow-hub-cache", action="store_true",
                   help="with --allowed-root: the Hugging Face cache may be read (and written) too")  # fmt: skip
    p.add_argument("--token-file", type=Path,
                   help=f"TCP: file with the token clients send (${ENV_TOKEN}); created if missing")  # fmt: skip
    p.add_argument("--allow-remote", action="store_true", help="allow a TCP address (or --http) other than loopback")
    p.add_argument("--http", metavar="[HOST:]PORT",
                   help="also serve the OpenAI-compatible HTTP API (default: off; clients send the token)")  # fmt: skip
    p.add_argument("--tls-cert", type=Path, help="TCP: serve TLS with this PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="TCP: the PEM private key of --tls-cert")
    p.add_argument("--max-queued-jobs", type=int, default=16)
    p.add_argument("--max-generations", type=int, default=64,
                   help="generations running or waiting (gRPC and HTTP); more get QUEUE_FULL (HTTP 429)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=32, help="Infer inputs coalesced into one forward (1: off)")
    p.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="hold a lone Infer this long to gather a batch (default 0: batch only while busy)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    return p


def tcp_token(token_file: Path | None, state_dir: Path) -> tuple[str, Path]:
    """The token TCP clients must present: from --token-file (created 0600 with a random token if missing)."""
    path = token_file or state_dir / "token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip(), path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_json = None if args.log_format == "auto" else args.log_format == "json"
    logs.configure(args.log_level, log_json)
    import structlog

    from mlxd_daemon.http_front import parse_http_address
    from mlxd_daemon.server import Daemon, socket_path

    address = args.address or default_address()
    is_unix = address.startswith("unix://")
    if not is_unix and not address.startswith(LOOPBACK) and not args.allow_remote:
        parser.error(f"refusing to listen on {address}: pass --allow-remote to accept connections from other hosts")
    http = None
    if args.http:
        try:
            http = parse_http_address(args.http)
        except ValueError as e:
            parser.error(str(e))
        if http[0] not in LOOPBACK_HOSTS and not args.allow_remote:
            parser.error(f"refusing to serve HTTP on {args.http}: pass --allow-remote to accept other hosts")
    sock = socket_path(address)
    state_dir = args.state_dir or (sock.parent if sock is not None else runtime_dir())
    token = None
    if not is_unix or http is not None:  # TCP listeners (gRPC or HTTP) require the token
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        token, token_path = tcp_token(args.token_file, state_dir)
        structlog.get_logger().info("tcp_token_required", token_file=str(token_path))
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key) or is_unix:
            parser.error("--tls-cert and --tls-key go together, and only with a TCP --address")
        tls = (args.tls_key.read_bytes(), args.tls_cert.read_bytes())
    budget = args.memory_budget
    daemon = Daemon(
        address,
        memory_budget=int(budget * total_memory_bytes()) if budget <= 1 else int(budget),
        state_dir=state_dir,
        log_level=args.log_level,
        log_json=log_json,
        idle_timeout=args.idle_timeout,
        token=None if is_unix else token,
        tls=tls,
        allowed_roots=tuple(args.allowed_root),
        max_queued_jobs=args.max_queued_jobs,
        max_batch=args.max_batch,
        batch_window_s=args.batch_window_ms / 1000,
        max_generations=args.max_generations,
        http=http,
        http_token=token,
        offline=args.offline,
        allow_hub_cache=args.allow_hub_cache,
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
