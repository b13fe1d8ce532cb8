"""Hugging Face Hub ids as sources: resolve ``org/name[@revision]`` to a local snapshot with huggingface_hub.

Order: the local cache (a snapshot of that revision whose config and weights are all there); else, when downloads
are allowed, ``config.json`` and the tokenizer/processor files first, the caller's check (the architecture) on
them, and only then the weight files the index names (safetensors preferred), one file at a time with byte
progress and cancellation through the job's ``Reporter``. The cache and offline mode are the daemon's own
environment's (``HF_HUB_CACHE``/``HF_HOME``, ``HF_HUB_OFFLINE``), plus ``mlxd --offline``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlxd_common.hub_ids import parse_hub_id

from mlxd_daemon.errors import InvalidArgument, MlxdError, NotFound, PermissionDenied, Unavailable
from mlxd_daemon.progress import Reporter

# What a conversion reads besides the weights: copied byte-for-byte (convert.TOKENIZER_FILES), the indexes
# (they name the weights), and sentence-transformers' module folders.
META_PATTERNS: tuple[str, ...] = (
    "config.json",
    "*.index.json",
    "*.json",
    "*.txt",
    "*.model",
    "*.jinja",
    "[0-9]_*/*.json",
)
Check = Callable[[Path], object]  # raises when the snapshot is unusable; what it returns is ignored


@dataclass(frozen=True)
class HubSource:
    """A resolved hub id: what was asked for, the commit it resolved to, and the local snapshot directory."""

    repo_id: str
    revision: str
    commit_hash: str
    path: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def split_source(source: str, revision: str = "") -> tuple[str, str] | None:
    """``(repo_id, revision)`` for a non-absolute source shaped like a hub id, else None (a path).

    InvalidArgument BAD_REVISION when ``@rev`` and ``revision`` disagree."""
    if source.startswith("/"):
        return None
    parsed = parse_hub_id(source)
    if parsed is None:
        return None
    repo_id, inline = parsed
    if inline and revision and inline != revision:
        msg = f"{source!r} names revision {inline!r} but --revision is {revision!r}: give one"
        raise InvalidArgument(msg, reason="BAD_REVISION", repo_id=repo_id)
    return repo_id, inline or revision or "main"


def cache_dir() -> Path:
    """The hub cache this daemon reads and writes (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def downloads_disabled(offline: bool) -> bool:
    """Whether ids resolve from the cache only: ``mlxd --offline`` or ``HF_HUB_OFFLINE`` in the daemon's env."""
    from huggingface_hub import constants

    return offline or constants.HF_HUB_OFFLINE


def resolve(repo_id: str, revision: str, *, offline: bool, check: Check, reporter: Reporter) -> HubSource:
    """A local snapshot of ``repo_id`` at ``revision`` with what a conversion needs; downloads if allowed.

    ``check(snapshot_dir)`` runs once config.json is local and before any weight is read or downloaded
    (raise ``Unsupported`` there). Errors: NotFound MODEL_NOT_CACHED (offline, not cached), REPO_NOT_FOUND,
    REVISION_NOT_FOUND; PermissionDenied GATED_REPO; Unavailable HUB_UNREACHABLE."""
    offline = downloads_disabled(offline)
    cached = _cached_snapshot(repo_id, revision)
    if cached is not None:
        check(cached)
        if not _missing_weights(cached):
            return HubSource(repo_id, revision, cached.name, str(cached))
    if offline:
        state = "has no complete snapshot of" if cached is not None else "does not contain"
        msg = (
            f"{repo_id}@{revision} is not in the Hugging Face cache ({cache_dir()} {state} it) and downloads are off "
            f"(HF_HUB_OFFLINE or mlxd --offline): download it where the hub is reachable, or pass a local directory"
        )
        raise NotFound(msg, reason="MODEL_NOT_CACHED", repo_id=repo_id, revision=revision, cache_dir=cache_dir())
    return _download(repo_id, revision, check, reporter)


def _cached_snapshot(repo_id: str, revision: str) -> Path | None:
    """The cached snapshot folder of ``revision`` (a branch, tag or commit) holding config.json, else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=["config.json"], local_files_only=True)
        )
    except LocalEntryNotFoundError:  # also IncompleteSnapshotError: the cached tree lists a file not there
        return None
    return folder if (folder / "config.json").is_file() else None


def _missing_weights(folder: Path) -> list[str]:
    """Weight files the snapshot needs but lacks: an index's shards, else one of the single-file names."""
    from mlxd_daemon.checkpoint import WEIGHT_FILES  # torch: only in workers (the servicer imports this module)

    for index_name, single_name, _fmt in WEIGHT_FILES:
        if (folder / index_name).is_file():
            shards = sorted(set(_weight_map(folder / index_name).values()))
            return [s for s in shards if not (folder / s).is_file()]
        if (folder / single_name).is_file():
            return []
    return [WEIGHT_FILES[0][1]]


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        msg = f"{index} is not a weight index (no weight_map): {e}"
        raise InvalidArgument(msg, reason="BAD_INDEX", path=index) from None
    return {str(k): str(v) for k, v in weight_map.items()}


def _download(repo_id: str, revision: str, check: Check, reporter: Reporter) -> HubSource:
    """Config and tokenizer files, then ``check``, then the weights the index names, with progress."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    reporter.begin("download", message=f"{repo_id}@{revision}: config")
    with _hub_errors(repo_id, revision):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(META_PATTERNS)))
        commit = folder.name
        check(folder)
        sizes = {
            f.path: int(f.size or 0)
            for f in HfApi().list_repo_tree(repo_id, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        }
        files = _weights_to_fetch(folder, sizes)
        todo = [f for f in files if not (folder / f).is_file()]
        reporter.begin("download", total_items=len(todo), total_bytes=sum(sizes[f] for f in todo),
                       message=f"{repo_id}@{commit[:12]}: {len(todo)} weight file(s)")  # fmt: skip
        progress = _ByteProgress(reporter)
        for i, name in enumerate(todo):
            hf_hub_download(repo_id, name, revision=commit, tqdm_class=progress.bar_class(i))  # type: ignore[arg-type]
            progress.file_done(i + 1, sizes[name])
        reporter.end(message=f"{repo_id}@{commit[:12]}")
    return HubSource(repo_id, revision, commit, str(folder))


def _weights_to_fetch(folder: Path, sizes: dict[str, int]) -> list[str]:
    """The weight files of the preferred format (safetensors over .bin), as the index (if any) names them."""
    from mlxd_daemon.checkpoint import WEIGHT_FILES

    for index_name, single_name, _fmt in WEIGHT_FILES:
        if index_name in sizes and (folder / index_name).is_file():
            return sorted(set(_weight_map(folder / index_name).values()))
        if single_name in sizes:
            return [single_name]
    looked_for = ", ".join(name for row in WEIGHT_FILES for name in row[:2])
    msg = f"the repository has no weights mlxd reads: looked for {looked_for}"
    raise InvalidArgument(msg, reason="NO_WEIGHTS", path=str(folder))


class _ByteProgress:
    """Turns huggingface_hub's per-file progress bars into the job's Progress events (bytes done of total).

    Each chunk checks for cancellation, so CancelJob stops a download mid-file (huggingface_hub resumes the
    ``.incomplete`` blob next time)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.done_bytes = 0  # finished files
        self.last_emit = 0.0

    def file_done(self, items: int, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.reporter.report(items, self.done_bytes)

    def bar_class(self, index: int) -> type:
        owner = self

        class Bar:
            """The slice of tqdm's interface ``huggingface_hub.file_download.http_get`` uses."""

            def __init__(self, *args: Any, initial: int = 0, **kwargs: Any) -> None:
                self.n = initial

            def __enter__(self) -> Bar:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def update(self, n: int | float | None = 1) -> None:
                self.n += int(n or 0)
                owner.reporter.check_cancelled()
                now = time.monotonic()
                if now - owner.last_emit >= 0.2:  # a few events a second, not one per 10 MB chunk
                    owner.last_emit = now
                    owner.reporter.report(index, owner.done_bytes + self.n)

            def close(self) -> None:
                return None

        return Bar


class _hub_errors:
    """huggingface_hub's exceptions as domain errors with specific reasons (never INTERNAL)."""

    def __init__(self, repo_id: str, revision: str) -> None:
        self.repo_id, self.revision = repo_id, revision

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if exc is None or isinstance(exc, MlxdError):
            return
        where = {"repo_id": self.repo_id, "revision": self.revision}
        name = f"{self.repo_id}@{self.revision}"
        if isinstance(exc, GatedRepoError):
            msg = f"{name} is gated: accept its terms on the Hub and give the daemon a token (HF_TOKEN)"
            raise PermissionDenied(msg, reason="GATED_REPO", **where) from None
        if isinstance(exc, RepositoryNotFoundError):
            msg = f"no repository {self.repo_id} on the Hub (or it is private and the daemon has no token for it)"
            raise NotFound(msg, reason="REPO_NOT_FOUND", **where) from None
        if isinstance(exc, RevisionNotFoundError):
            msg = f"{self.repo_id} has no revision {self.revision!r}"
            raise NotFound(msg, reason="REVISION_NOT_FOUND", **where) from None
        if isinstance(exc, RemoteEntryNotFoundError):
            msg = f"{name}: a file the index names is not in the repository: {exc}"
            raise InvalidArgument(msg, reason="INDEX_MISMATCH", **where) from None
        if isinstance(exc, (LocalEntryNotFoundError, HfHubHTTPError, OSError)):
            msg = f"{name}: the Hugging Face Hub could not be reached and the cache does not have it: {exc}"
            raise Unavailable(msg, reason="HUB_UNREACHABLE", cache_dir=cache_dir(), **where) from None


def cached_models() -> dict[str, Any]:
    """Every model repo in the local cache: revisions (refs and commit), model_type from its config.json,
    size on disk and whether its weights are all there. Support is decided by the caller."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    root = cache_dir()
    try:
        info = scan_cache_dir(root)
    except CacheNotFound:
        return {"cache_dir": str(root), "models": []}
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: (not r.refs, sorted(r.refs))):
            config = rev.snapshot_path / "config.json"
            model_type = ""
            if config.is_file():
                try:
                    model_type = str(json.loads(config.read_text()).get("model_type") or "")
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    model_type = ""
            complete = config.is_file() and not _missing_weights(rev.snapshot_path)
            models.append({
                "repo_id": repo.repo_id, "refs": sorted(rev.refs), "commit_hash": rev.commit_hash,
                "snapshot_path": str(rev.snapshot_path), "model_type": model_type,
                "size_on_disk": rev.size_on_disk, "complete": complete,
            })  # fmt: skip
    return {"cache_dir": str(root), "models": models}
