"""Import boundaries: the daemon's front end never loads mlx or torch (they live in the workers), the client never
loads the daemon, and the daemon's modules import each other without cycles."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import mlxd_daemon

FRONT_END = (
    "mlxd_daemon.__main__", "mlxd_daemon.server", "mlxd_daemon.servicer", "mlxd_daemon.service",
    "mlxd_daemon.messages", "mlxd_daemon.batching", "mlxd_daemon.jobs", "mlxd_daemon.workers",
    "mlxd_daemon.http_front", "mlxd_daemon.openai_wire", "mlxd_client", "mlxd_client.cli",
)  # fmt: skip


def loaded_packages(modules: tuple[str, ...], packages: tuple[str, ...], then: str = "") -> list[str]:
    """Modules of ``packages`` in ``sys.modules`` after importing ``modules`` (and running the statement ``then``)
    in a fresh interpreter."""
    code = (
        "import contextlib, importlib, io, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"{then}\n"
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


class TestClientDoesNotImportTheDaemon:
    def test_mlxctl_help_loads_no_daemon_module(self) -> None:
        """``mlxctl --help`` (the whole parser, epilog included) loads nothing of mlxd_daemon, mlx or torch."""
        then = (
            "from mlxd_client.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): main(['--help'])"
        )
        assert loaded_packages(("mlxd_client.cli",), ("mlxd_daemon", "mlx", "torch"), then) == []


def import_graph(package: Path, *, lazy: bool) -> dict[str, set[str]]:
    """Module → the package's modules it imports (statically), ``lazy``: also inside functions; imports under
    ``if TYPE_CHECKING:`` never count (they do not run)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}

    def visit(name: str, nodes: list[ast.AST] | ast.AST) -> None:
        for node in nodes if isinstance(nodes, list) else ast.iter_child_nodes(nodes):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]  # fmt: skip
            elif not lazy and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            else:
                visit(name, node)
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}

    for name, path in modules.items():
        visit(name, ast.parse(path.read_text(encoding="utf-8")).body)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


class TestNoImportCycles:
    package = Path(mlxd_daemon.__file__).parent

    def test_no_module_imports_itself_at_import_time(self) -> None:
        """No cycle among the daemon's module-level imports (the order modules are imported in never matters)."""
        assert cycles(import_graph(self.package, lazy=False)) == []

    def test_archs_and_export_do_not_import_each_other_in_a_cycle(self) -> None:
        """The export package and the arch modules form no cycle, even through imports inside functions: export
        uses the registry and loading helpers, ``archs.mlxd_program`` uses export, never the reverse."""
        layers = ("mlxd_daemon.archs", "mlxd_daemon.export")
        spanning = [c for c in cycles(import_graph(self.package, lazy=True))
                    if all(any(m.startswith(layer) for m in c) for layer in layers)]  # fmt: skip
        assert spanning == []
