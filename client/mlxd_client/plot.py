"""``mlxctl validate --plot``: relative error per layer (log scale) against its tolerance line."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_layers(report: dict[str, Any], path: Path) -> Path:
    """Draw the per-layer errors of a validation report to ``path`` (PNG, SVG or PDF by suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        msg = "plotting needs matplotlib: pip install 'mlxd[plot]'"
        raise SystemExit(msg) from e

    layers = report["layers"]
    names = [layer["name"] for layer in layers]
    errors = [max(layer["rel_error"], 1e-12) if layer["rel_error"] != float("inf") else 1e3 for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2), 4.2), layout="constrained")
    colors = ["tab:blue" if layer["passed"] else "tab:red" for layer in layers]
    ax.bar(range(len(layers)), errors, color=colors)
    if layers:
        ax.axhline(layers[0]["tolerance"], color="black", linestyle="--", linewidth=1, label="tolerance")
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("‖mlx − torch‖ / ‖torch‖")
    first = report.get("first_divergent_layer") or "none"
    verdict = "passed" if report["passed"] else "FAILED"
    ax.set_title(f"{report['model_type']} {report['dtype']} ({report.get('band', '')}): {verdict}; "
                 f"first divergent layer: {first}", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
