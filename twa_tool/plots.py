"""PNG figures for report.md, drawn with matplotlib when it is installed (``pip install twa-tool[plots]``).

Pure: returns PNG bytes; the pipeline writes them. Without matplotlib it returns nothing and says why.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
from types import ModuleType
from typing import Any

PLOT_FILES = ("coefficients.png", "accuracy.png")


def plots_installed() -> bool:
    """Whether matplotlib is installed (the figures are drawn then, unless its import fails)."""
    return importlib.util.find_spec("matplotlib") is not None


class _Unusable(Exception):
    """matplotlib is installed but cannot be imported (e.g. a build for numpy 1.x under numpy 2)."""


def _pyplot() -> ModuleType | None:
    """``matplotlib.pyplot`` (Agg), or None when matplotlib is not installed; raises ``_Unusable`` when it is
    installed but its import fails."""
    if not plots_installed():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # a broken optional extra must not fail a run whose model is already computed
        try:
            version = " " + importlib.metadata.version("matplotlib")
        except importlib.metadata.PackageNotFoundError:
            version = ""
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise _Unusable(f"matplotlib{version} is installed but cannot be imported "
                        f"({type(exc).__name__}: {reason}); upgrade it: pip install -U matplotlib") from exc
    return plt


def _png(fig: Any) -> bytes:  # a matplotlib Figure (matplotlib is optional)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def render_plots(report: dict) -> tuple[dict[str, bytes], str | None]:
    """(file name -> PNG bytes, note). The note explains a skip (matplotlib missing or not importable)."""
    try:
        plt = _pyplot()
    except _Unusable as exc:
        return {}, f"plots skipped: {exc}"
    if plt is None:
        return {}, "plots skipped: matplotlib is not installed (pip install 'twa-tool[plots]')"
    names = report["checkpoints"]
    figures = {}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 2), 3))
    ax.bar(range(len(names)), report["coefficients"], color="tab:blue")
    ax.axhline(1 / len(names), color="tab:orange", linestyle="--", label="SWA (uniform)")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7, parse_math=False)  # "$" in a name is text
    ax.set_ylabel("coefficient aᵢ")
    ax.set_title("TWA coefficients over the checkpoints")
    ax.legend(fontsize=8)
    figures["coefficients.png"] = _png(fig)
    plt.close(fig)

    per = report.get("checkpoint_metrics") or {}
    metrics = report["metrics"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 2), 3))
    if per:
        xs = [i for i, n in enumerate(names) if n in per]
        ax.plot(xs, [100 * per[names[i]]["accuracy"] for i in xs], marker="o",
                label="each checkpoint (BN re-estimated)")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7, parse_math=False)  # "$" in a name is text
    for method, style in (("swa", "tab:orange"), ("twa", "tab:green"), ("last", "tab:gray")):
        if method in metrics:
            ax.axhline(100 * metrics[method]["accuracy"], color=style, linestyle="--", label=method.upper())
    ax.set_ylabel("eval accuracy (%)")
    ax.set_title("Accuracy: checkpoints vs SWA vs TWA")
    ax.legend(fontsize=8)
    figures["accuracy.png"] = _png(fig)
    plt.close(fig)
    return figures, None
