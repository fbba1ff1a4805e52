"""Render run reports for people: rich tables onto a Console the caller owns. Nothing else formats output."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

METHOD_LABELS = {
    "last": "last checkpoint",
    "best": "best single checkpoint",
    "swa": "SWA (uniform mean + BN)",
    "twa": "TWA (trained coefficients + BN)",
}


def metrics_table(report: dict, title: str = "Evaluation split") -> Table:
    """Baselines and the result side by side, with the difference to SWA (or the best baseline)."""
    metrics = report["metrics"]
    reference_name = "swa" if "swa" in metrics else next((m for m in ("best", "last") if m in metrics), None)
    table = Table(title=title)
    table.add_column("method")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    if reference_name:
        table.add_column(f"Δ acc vs {reference_name}", justify="right")
    for name, values in metrics.items():
        label = METHOD_LABELS.get(name, name)
        if "checkpoint" in values:
            label += f" [dim]({values['checkpoint']})[/dim]"
        row = [label, f"{100 * values['accuracy']:.2f}%", f"{values['loss']:.4f}"]
        if reference_name:
            delta = 100 * (values["accuracy"] - metrics[reference_name]["accuracy"])
            style = "green" if delta > 0 else "red" if delta < 0 else ""
            row.append(f"[{style}]{delta:+.2f}[/{style}]" if style else f"{delta:+.2f}")
        table.add_row(*row, style="bold" if name == "twa" else None)
    return table


def coefficients_table(report: dict, limit: int = 12) -> Table:
    """The learned coefficients a_i over the checkpoints (largest |a_i| first when there are many)."""
    pairs = list(zip(report["checkpoints"], report["coefficients"]))
    shown = pairs if len(pairs) <= limit else sorted(pairs, key=lambda p: -abs(p[1]))[:limit]
    title = "Coefficients w = Σ aᵢ wᵢ" + ("" if len(pairs) <= limit else f" (largest {limit} of {len(pairs)})")
    table = Table(title=title)
    table.add_column("checkpoint")
    table.add_column("a", justify="right")
    for name, value in shown:
        table.add_row(name, f"{value:+.4f}")
    table.caption = f"Σ a = {sum(report['coefficients']):.4f}"
    return table


def render_average(report: dict, console: Console) -> None:
    """Print the human summary of a ``twa average`` report."""
    console.print(metrics_table(report))
    console.print(coefficients_table(report))
    basis = report["basis"]
    console.print(f"basis rank {basis['rank']} of {len(report['checkpoints'])}, "
                  f"max|PPᵀ-I| = {basis['orthonormality_error']:.1e}, "
                  f"distance to span = {basis['span_residual']:.1e}")
    outputs = report.get("outputs", {})
    if "model" in outputs:
        console.print(f"wrote {outputs['model']['path']} (sha256 {outputs['model']['sha256'][:16]}…) "
                      f"and {outputs['report']['path']}")
