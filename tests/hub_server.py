"""A tiny file-serving stand-in for the Hugging Face Hub on 127.0.0.1, for ``HF_ENDPOINT``.

It answers the three routes huggingface_hub's download path uses (repo info, recursive tree listing,
``resolve`` with the headers ``hf_hub_download`` reads), so the daemon runs huggingface_hub's real code unchanged
against local directories. Every request is logged, which lets tests prove what was (not) downloaded.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    """Commits (sha -> directory whose files are the repo's), named refs (branch/tag -> sha), gated or not."""

    commits: dict[str, Path]
    refs: dict[str, str]
    gated: bool = False
    slow_files: dict[str, float] = field(default_factory=dict)  # file -> seconds to stall mid-body


def commit_sha(seed: str) -> str:
    """A stable 40-hex commit id for a test repo."""
    return hashlib.sha1(seed.encode()).hexdigest()


class FakeHub:
    """``with FakeHub(repos) as hub: hub.url``; ``hub.requests`` lists (method, path) in arrival order."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloaded(self, repo_id: str) -> list[str]:
        """Files of ``repo_id`` fetched with GET .../resolve/..., in order."""
        prefix = f"/{repo_id}/resolve/"
        return [
            p.split("/", 4 + repo_id.count("/"))[-1] for m, p in self.requests if m == "GET" and p.startswith(prefix)
        ]

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path))
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo_id = "/".join(parts[2:4] if api else parts[0:2])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo.gated:
            return self._error(h, 403, "GatedRepo", f"Access to model {repo_id} is restricted")
        if api and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            sha = self._commit(repo, parts[5])
            if sha is None:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {parts[5]}")
            files = sorted(p for p in repo.commits[sha].rglob("*") if p.is_file())
            root = repo.commits[sha]
            if parts[4] == "revision":
                info = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": str(f.relative_to(root))} for f in files]}
                return self._json(h, info)
            tree = [
                {"type": "file", "path": str(f.relative_to(root)), "size": f.stat().st_size, "oid": _sha1(f)}
                for f in files
            ]
            return self._json(h, tree)
        if not api and len(parts) >= 5 and parts[2] == "resolve":
            sha = self._commit(repo, parts[3])
            name = "/".join(parts[4:])
            file = repo.commits[sha] / name if sha else None
            if file is None or not file.is_file():
                return self._error(h, 404, "EntryNotFound", f"{name} not found")
            data = file.read_bytes()
            h.send_response(200)
            h.send_header("X-Repo-Commit", sha)
            h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if body:
                stall = repo.slow_files.get(name, 0.0)
                h.wfile.write(data[: len(data) // 2])
                h.wfile.flush()
                time.sleep(stall)
                h.wfile.write(data[len(data) // 2 :])
            return None
        return self._error(h, 404, "EntryNotFound", f"no route {path}")

    @staticmethod
    def _commit(repo: Repo, rev: str) -> str | None:
        sha = repo.refs.get(rev, rev)
        return sha if sha in repo.commits else None

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, payload: object) -> None:
        data = json.dumps(payload).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "GET":
            h.wfile.write(data)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "GET":
            h.wfile.write(data)


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
