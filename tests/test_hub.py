"""Hugging Face Hub ids as sources: resolved by the daemon from its cache, or downloaded when it may.

The cache is written by huggingface_hub itself (``snapshot_download`` from a local file-serving endpoint, see
``hub_server.py``), so it has the real layout: ``models--org--name/{refs,snapshots/<commit>,blobs}`` with
snapshot files linking into blobs. One daemon runs offline on that cache, one online against the endpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DaemonProcess
from hub_server import FakeHub, Repo, commit_sha
from mlxd.v1 import mlxd_pb2 as pb
from mlxd_client.errors import CancelledError, MlxdClientError
from mlxd_client.wire import source_arg
from mlxd_common.hub_ids import parse_hub_id
from safetensors.numpy import load_file

MAIN, V2, NET = commit_sha("tiny-bert main"), commit_sha("tiny-bert v2"), commit_sha("acme-net")


class Setup:
    """Model directories, the endpoint serving them, the offline cache and both daemons."""

    def __init__(self, root: Path) -> None:
        from huggingface_hub import snapshot_download
        from mlxd_daemon.fixtures import make_bert

        self.root = root
        self.work = root / "work"
        self.work.mkdir()
        bert_a, bert_b = make_bert(root / "src" / "a", seed=0), make_bert(root / "src" / "b", seed=1)
        net = root / "src" / "net"
        net.mkdir()
        (net / "config.json").write_text(json.dumps({"model_type": "acme_net", "hidden_size": 8}))
        (net / "model.safetensors").write_bytes(b"\x00" * 64)  # reading it would fail: BAD_CHECKPOINT
        both = root / "src" / "both"  # safetensors and a .bin: only the safetensors may be downloaded
        shutil.copytree(bert_a, both)
        (both / "pytorch_model.bin").write_bytes(b"\x00" * 4096)
        bert = Repo({MAIN: bert_a, V2: bert_b}, {"main": MAIN, "v2": V2})
        self.hub = FakeHub({
            "acme/tiny-bert": bert,
            "acme/acme-net": Repo({NET: net}, {"main": NET}),
            "acme/dl-bert": Repo({MAIN: both}, {"main": MAIN}),
            "acme/dl-net": Repo({NET: net}, {"main": NET}),
            "acme/gated": Repo({MAIN: bert_a}, {"main": MAIN}, gated=True),
            "acme/slow-bert": Repo({MAIN: bert_a}, {"main": MAIN}, slow_files={"model.safetensors": 4.0}),
        })  # fmt: skip
        self.hub.__enter__()
        self.offline_cache = root / "hf-offline"
        for repo, revision in (("acme/tiny-bert", "main"), ("acme/tiny-bert", "v2"), ("acme/acme-net", "main")):
            snapshot_download(repo, revision=revision, cache_dir=self.offline_cache, endpoint=self.hub.url)
        self.online_cache = self.work / "hf-online"
        # Offline: the cache is outside the allowed root, so --allow-hub-cache is what lets it be read.
        self.offline = DaemonProcess(
            root / "off", "--allowed-root", str(self.work), "--allow-hub-cache",
            env={"HF_HUB_CACHE": str(self.offline_cache), "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        self.online = DaemonProcess(
            root / "on", "--allowed-root", str(self.work),
            env={"HF_HUB_CACHE": str(self.online_cache), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": self.hub.url,
                 "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": ""},
        )  # fmt: skip

    def close(self) -> None:
        self.offline.stop()
        self.online.stop()
        self.hub.__exit__()


@pytest.fixture(scope="module")
def hub() -> Iterator[Setup]:
    with tempfile.TemporaryDirectory(prefix="mlxd-hub-") as root:  # short: unix socket paths are limited
        for sub in ("src", "off", "on"):
            (Path(root) / sub).mkdir()
        setup = Setup(Path(root))
        try:
            yield setup
        finally:
            setup.close()


def _error(fn: object) -> MlxdClientError:
    with pytest.raises(MlxdClientError) as err:
        fn()  # type: ignore[operator]
    return err.value


class TestIds:
    def test_shapes(self) -> None:
        """org/name[@rev] is an id; absolute, dotted-relative and one-part names are not."""
        assert parse_hub_id("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", "")
        assert parse_hub_id("acme/tiny-bert@v2") == ("acme/tiny-bert", "v2")
        assert [parse_hub_id(s) for s in ("/abs/path", "./a/b", "name", "a/b/c", "a--b/c", "ünï/code")] == [None] * 6

    def test_existing_path_wins(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The client sends an existing directory named like an id as a path, and an absent one as an id."""
        monkeypatch.chdir(tmp_path)
        assert source_arg("acme/tiny-bert") == "acme/tiny-bert"
        (tmp_path / "acme" / "tiny-bert").mkdir(parents=True)
        assert source_arg("acme/tiny-bert") == str(tmp_path / "acme" / "tiny-bert")


class TestOffline:
    def test_convert_by_id_records_the_commit(self, hub: Setup) -> None:
        """An id converts from the cache with downloads off; result and manifest name repo, revision, commit."""
        dst = hub.work / "by-id"
        with hub.offline.client() as c:
            r = c.convert("acme/tiny-bert", dst)
        assert (r.hub_source.repo_id, r.hub_source.revision, r.hub_source.commit_hash) == (
            "acme/tiny-bert",
            "main",
            MAIN,
        )
        manifest = json.loads((dst / "mlxd_manifest.json").read_text())
        assert manifest["source"]["hub"]["commit_hash"] == MAIN
        assert r.model_type == "bert" and (dst / "tokenizer.json").is_file()

    def test_revision_picks_another_snapshot(self, hub: Setup) -> None:
        """@v2 (or revision=) converts the other cached commit: different weights, its commit recorded."""
        with hub.offline.client() as c:
            r2 = c.convert("acme/tiny-bert@v2", hub.work / "v2")
            r3 = c.convert("acme/tiny-bert", hub.work / "v2-kw", revision="v2")
            r1 = c.convert("acme/tiny-bert@main", hub.work / "main")
        assert r2.hub_source.commit_hash == r3.hub_source.commit_hash == V2 and r1.hub_source.commit_hash == MAIN
        main_w, v2_w = (load_file(hub.work / d / "model.safetensors") for d in ("main", "v2"))
        name = next(k for k in v2_w if k.endswith("query.weight"))
        assert main_w[name].shape == v2_w[name].shape and not (main_w[name] == v2_w[name]).all()

    def test_not_cached_is_not_found(self, hub: Setup) -> None:
        """Not cached, offline: NOT_FOUND MODEL_NOT_CACHED naming id, revision and cache dir; nothing written."""
        dst = hub.work / "absent"
        with hub.offline.client() as c:
            e = _error(lambda: c.convert("acme/absent", dst))
        assert (e.code, e.reason) == ("NOT_FOUND", "MODEL_NOT_CACHED")
        assert e.metadata["repo_id"] == "acme/absent" and e.metadata["revision"] == "main"
        assert e.metadata["cache_dir"] == str(hub.offline_cache)
        assert not dst.exists() and not list(hub.work.glob(".absent*"))

    def test_unsupported_architecture_before_weights(self, hub: Setup) -> None:
        """A cached config naming an unknown model_type: UNIMPLEMENTED, and its (unreadable) weights are never read."""
        with hub.offline.client() as c:
            e = _error(lambda: c.convert("acme/acme-net", hub.work / "net"))
        assert (e.code, e.reason) == ("UNIMPLEMENTED", "UNSUPPORTED_ARCHITECTURE")
        assert not (hub.work / "net").exists()

    def test_validate_reference_by_id(self, hub: Setup) -> None:
        """Validate takes the PyTorch reference as an id too, and reports the commit it used."""
        with hub.offline.client() as c:
            c.convert("acme/tiny-bert", hub.work / "for-validate")
            report = c.validate(hub.work / "for-validate", "acme/tiny-bert")
        assert report.passed and report.reference_hub.commit_hash == MAIN

    def test_list_cached_models(self, hub: Setup) -> None:
        """ListCachedModels shows every cached snapshot with its model_type and whether mlxd converts it."""
        with hub.offline.client() as c:
            listing = c.list_cached_models()
        rows = {(m.repo_id, m.commit_hash): m for m in listing.models}
        assert listing.cache_dir == str(hub.offline_cache) and listing.offline
        assert (rows["acme/tiny-bert", MAIN].model_type, rows["acme/tiny-bert", MAIN].support) == ("bert", "native")
        assert list(rows["acme/tiny-bert", V2].refs) == ["v2"] and rows["acme/tiny-bert", V2].complete
        assert (rows["acme/acme-net", NET].model_type, rows["acme/acme-net", NET].support) == ("acme_net", "")

    def test_mlxctl_takes_ids(self, hub: Setup) -> None:
        """mlxctl convert ORG/NAME --revision REV and mlxctl models --cached, as a user runs them."""

        def mlxctl(*args: str) -> dict:
            cmd = [sys.executable, "-m", "mlxd_client.cli", "--address", hub.offline.address, "--json"]
            proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=hub.work)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            return json.loads(proc.stdout)

        converted = mlxctl("convert", "acme/tiny-bert", str(hub.work / "cli"), "--revision", "v2")
        assert converted["hub_source"]["commit_hash"] == V2
        cached = mlxctl("models", "--cached")
        assert {(m["repo_id"], m["support"]) for m in cached["models"]} >= {("acme/tiny-bert", "native")}

    def test_cache_outside_allowed_roots_is_refused(self, hub: Setup) -> None:
        """With --allowed-root and no --allow-hub-cache, an id whose cache lies outside is PERMISSION_DENIED."""
        (hub.root / "strict").mkdir(exist_ok=True)
        strict = DaemonProcess(hub.root / "strict", "--allowed-root", str(hub.work),
                               env={"HF_HUB_CACHE": str(hub.offline_cache)})  # fmt: skip
        try:
            with strict.client() as c:
                e = _error(lambda: c.convert("acme/tiny-bert", hub.work / "strict-out"))
        finally:
            strict.stop()
        assert (e.code, e.reason) == ("PERMISSION_DENIED", "HUB_CACHE_NOT_ALLOWED")


class TestDownload:
    def test_downloads_config_first_then_only_the_safetensors(self, hub: Setup) -> None:
        """Online and not cached: config.json comes first, then only the safetensors, with byte progress."""
        events: list[pb.Progress] = []
        with hub.online.client() as c:
            r = c.convert("acme/dl-bert", hub.work / "dl", on_progress=events.append)
        fetched = hub.hub.downloaded("acme/dl-bert")
        assert fetched.index("config.json") < fetched.index("model.safetensors")
        assert "pytorch_model.bin" not in fetched and r.hub_source.commit_hash == MAIN
        size = (hub.root / "src" / "both" / "model.safetensors").stat().st_size
        download = [e for e in events if e.stage == "download" and e.bytes_total]
        assert download[-1].bytes_done == download[-1].bytes_total == size

    def test_unsupported_architecture_downloads_no_weights(self, hub: Setup) -> None:
        """Online, an unknown model_type is refused after config.json alone: no weight file is requested."""
        with hub.online.client() as c:
            e = _error(lambda: c.convert("acme/dl-net", hub.work / "dl-net"))
        assert (e.code, e.reason) == ("UNIMPLEMENTED", "UNSUPPORTED_ARCHITECTURE")
        assert "model.safetensors" not in hub.hub.downloaded("acme/dl-net")

    def test_gated_and_missing_repos_have_reasons(self, hub: Setup) -> None:
        """A gated repo is PERMISSION_DENIED GATED_REPO; an unknown one NOT_FOUND REPO_NOT_FOUND; a bad revision
        NOT_FOUND REVISION_NOT_FOUND."""
        with hub.online.client() as c:
            gated = _error(lambda: c.convert("acme/gated", hub.work / "gated"))
            missing = _error(lambda: c.convert("acme/nope", hub.work / "nope"))
            bad_rev = _error(lambda: c.convert("acme/tiny-bert@nope", hub.work / "nope"))
        assert (gated.code, gated.reason) == ("PERMISSION_DENIED", "GATED_REPO")
        assert (missing.code, missing.reason) == ("NOT_FOUND", "REPO_NOT_FOUND")
        assert (bad_rev.code, bad_rev.reason) == ("NOT_FOUND", "REVISION_NOT_FOUND")

    def test_cancel_during_download(self, hub: Setup) -> None:
        """CancelJob while a weight file is streaming stops the job: CANCELLED, nothing at the destination."""
        dst = hub.work / "slow"
        with hub.online.client() as c, pytest.raises(CancelledError):
            for event in c.convert_events("acme/slow-bert", dst):
                if isinstance(event, pb.Progress) and event.stage == "download" and event.items_total:
                    c.cancel_job(event.job_id)
        assert not dst.exists()
