"""The zoo: every architecture in ``tests/zoo.py`` built tiny and random, converted and validated through one daemon.

The result table (architecture, path taken, max abs error, verdict and reason) is printed, and written to
``$MLXD_ZOO_TABLE`` when set (the README's table comes from there).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zoo
from conftest import DaemonProcess
from mlxd_client.errors import MlxdClientError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
GOAL = 0.9  # the fraction of the zoo that must convert and validate within its band
MIN_SIZE = 35


@dataclass
class Row:
    name: str
    family: str
    cls: str
    path: str = ""  # the converter Convert chose: "export" (torch.export), "mlx_lm", "mlxd:<arch>" (hand-written)
    max_abs: float | None = None
    passed: bool = False
    reason: str = ""
    code: str = ""  # the gRPC status of a failed request
    seconds: float = 0.0


def _run(client: object, entry: zoo.Entry, root: Path) -> Row:
    row = Row(entry.name, entry.family, entry.cls)
    start = time.monotonic()
    try:
        src = zoo.build(entry, root / "hf")
        result = client.convert(src, root / "mlx" / entry.name)  # type: ignore[attr-defined]
        row.path = result.path or result.model_type  # "export", "mlx_lm" or "mlxd:<arch>" (hand-written)
        report = client.validate(root / "mlx" / entry.name, src)  # type: ignore[attr-defined]
        row.max_abs = max((o.max_abs for o in report.outputs), default=0.0)
        row.passed = report.passed
        if not report.passed:
            bad = [o for o in report.outputs if not o.passed]
            row.reason = f"{bad[0].name}: max abs {bad[0].max_abs:.2g}" if bad else report.first_divergent_layer
    except MlxdClientError as e:
        row.code, row.reason = str(e.code), f"{e.reason}: {e.message[:160]}"
    row.seconds = round(time.monotonic() - start, 1)
    return row


def table(rows: list[Row]) -> str:
    """The zoo's markdown table plus the count line."""
    passed = sum(r.passed for r in rows)
    lines = [
        f"{passed}/{len(rows)} architectures convert and validate within their band ({passed / len(rows):.0%}).",
        "",
        "| architecture | family | class | path | max abs error | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = f"{r.max_abs:.1e}" if r.max_abs is not None else "—"
        verdict = "pass" if r.passed else f"FAIL: {r.reason}".replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.name} | {r.family} | `{r.cls}` | {r.path or '—'} | {err} | {verdict} |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Row]]:
    """Every zoo entry converted and validated through one daemon of this module."""
    import tempfile

    root = tmp_path_factory.mktemp("zoo")
    with tempfile.TemporaryDirectory(prefix="mlxd-zoo-") as sock_root:
        daemon = DaemonProcess(Path(sock_root))
        try:
            with daemon.client() as client:
                out = [_run(client, entry, root) for entry in zoo.ZOO]
        finally:
            daemon.stop()
    text = table(out)
    print("\n" + text)
    if os.environ.get("MLXD_ZOO_TABLE"):
        Path(os.environ["MLXD_ZOO_TABLE"]).write_text(text)
    yield out


class TestZoo:
    def test_zoo_spans_the_families(self) -> None:
        """At least 35 architectures, across text, encoder-decoder, vision, segmentation, audio, dual, decoder."""
        families = {e.family for e in zoo.ZOO}
        assert len(zoo.ZOO) >= MIN_SIZE
        assert families == {"text", "seq2seq", "vision", "segmentation", "audio", "dual", "decoder"}

    def test_goal_pass_rate(self, rows: list[Row]) -> None:
        """At least 90% of the zoo converts and validates within its band; each failure carries its reason."""
        failed = [r for r in rows if not r.passed]
        assert all(r.reason for r in failed), failed
        assert sum(r.passed for r in rows) / len(rows) >= GOAL, table(rows)

    def test_no_internal_errors(self, rows: list[Row]) -> None:
        """No conversion or validation ended in INTERNAL or UNKNOWN: failures are domain errors with a reason."""
        assert [r for r in rows if r.code in ("INTERNAL", "UNKNOWN")] == []
