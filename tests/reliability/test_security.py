"""Who may talk to the daemon, and which paths it may touch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlxd_client import Client
from mlxd_client.discovery import is_serving
from mlxd_client.errors import MlxdClientError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "mlxd_daemon", "--log-format", "json", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def wait_serving(address: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not is_serving(address, timeout=0.5):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.1)


class TestTcp:
    def test_token_required(self, tmp_path: Path) -> None:
        """On TCP every call needs the token from --token-file; health checks do not."""
        address = f"127.0.0.1:{free_port()}"
        token_file = tmp_path / "token"
        proc = start("--address", address, "--token-file", str(token_file), "--state-dir", str(tmp_path))
        try:
            wait_serving(address, proc)  # health answers without a token
            assert oct(token_file.stat().st_mode & 0o777) == "0o600"
            with pytest.raises(MlxdClientError) as err:
                Client(address, autostart=False)
            assert (err.value.code, err.value.reason) == ("UNAUTHENTICATED", "BAD_TOKEN")
            with pytest.raises(MlxdClientError):
                Client(address, autostart=False, token="wrong")
            with Client(address, autostart=False, token=token_file.read_text().strip()) as c:
                assert c.list_models().budget_bytes > 0
        finally:
            proc.terminate()
            assert proc.wait(30) == 0

    def test_non_loopback_needs_explicit_flag(self) -> None:
        """Listening on all interfaces is refused unless --allow-remote is given."""
        proc = subprocess.run([sys.executable, "-m", "mlxd_daemon", "--address", f"0.0.0.0:{free_port()}"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 2
        assert "--allow-remote" in proc.stderr


class TestAllowedRoots:
    def test_paths_outside_roots_are_denied(self, tiny_clip: Path, tmp_path: Path) -> None:
        """With --allowed-root, sources, destinations and symlinks escaping it get PERMISSION_DENIED."""
        allowed = tmp_path / "allowed"
        allowed.mkdir()
        (allowed / "escape").symlink_to(tiny_clip)
        with tempfile.TemporaryDirectory(prefix="mlxd-roots-") as root:
            address = f"unix://{root}/mlxd.sock"
            proc = start("--address", address, "--allowed-root", str(allowed))
            try:
                wait_serving(address, proc)
                with Client(address, autostart=False) as c:
                    for src, dst in [(tiny_clip, allowed / "out"), (allowed / "escape", allowed / "out2"),
                                     (allowed / "x", tmp_path / "out3")]:  # fmt: skip
                        with pytest.raises(MlxdClientError) as err:
                            c.convert(src, dst)
                        assert (err.value.code, err.value.reason) == ("PERMISSION_DENIED", "PATH_NOT_ALLOWED")
                    assert sorted(os.listdir(allowed)) == ["escape"]
            finally:
                proc.terminate()
                proc.wait(30)


class TestTls:
    def test_tls_with_token(self, tmp_path: Path) -> None:
        """With --tls-cert/--tls-key the TCP listener speaks TLS: a client trusting the cert connects (with the
        token); a plaintext client does not."""
        import grpc

        key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)  # fmt: skip
        address = f"localhost:{free_port()}"
        token_file = tmp_path / "token"
        proc = start("--address", address, "--token-file", str(token_file), "--state-dir", str(tmp_path),
                     "--tls-cert", str(cert), "--tls-key", str(key))  # fmt: skip
        try:
            os.environ["MLXD_TLS_CA"] = str(cert)  # is_serving and Client pick it up
            try:
                wait_serving(address, proc)
                with Client(address, autostart=False, token=token_file.read_text().strip()) as c:
                    assert c.list_models().budget_bytes > 0
            finally:
                del os.environ["MLXD_TLS_CA"]
            assert not is_serving(address)  # plaintext against a TLS port: no answer
            with grpc.insecure_channel(address) as ch, pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(ch).result(timeout=1)
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
