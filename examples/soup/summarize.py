"""Markdown table of `twa soup` reports: best single, uniform, greedy, twa (held-out and test accuracy, %).

    python examples/soup/summarize.py runs/soup/sweep/*/report.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

COLUMNS = ("best_single", "uniform", "greedy", "twa")


def read_report(path: Path) -> dict:
    """A `twa soup` report.json, or a one-line error naming the file."""
    try:
        report = json.loads(path.read_text())
        config, metrics = report["config"], report["metrics"]
        if not all(isinstance(metrics.get(c), dict) for c in COLUMNS) or not isinstance(config, dict):
            raise KeyError(next((c for c in COLUMNS if not isinstance(metrics.get(c), dict)), "config"))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a JSON document"
        sys.exit(f"error: {path}: {reason}; pass the report.json files `twa soup` writes")
    except (KeyError, TypeError, AttributeError) as exc:
        sys.exit(f"error: {path}: not a `twa soup` report (no {exc}); pass the report.json files `twa soup` writes")
    return report


def main() -> None:
    if not sys.argv[1:]:
        sys.exit("usage: python examples/soup/summarize.py REPORT.json [REPORT.json ...]")
    reports = [(path, read_report(path)) for path in map(Path, sys.argv[1:])]
    print("| run | optimizer | lr | granularity | basis | " + " | ".join(f"{c} (held-out / test)" for c in COLUMNS)
          + " | written | TWA fit (s) |")
    print("|---|---|---:|---|---|" + "---:|" * len(COLUMNS) + "---|---:|")
    for path, report in reports:
        config, metrics = report["config"], report["metrics"]
        cells = [f"{100 * metrics[c]['heldout']['accuracy']:.2f} / {100 * metrics[c]['eval']['accuracy']:.2f}"
                 for c in COLUMNS]
        print(f"| {path.parent.name} | {config['train']['optimizer']} | {config['train']['lr']:g} | "
              f"{config['granularity']} | {config['basis_dtype']} | " + " | ".join(cells)
              + f" | {report['written_method']} | {report['timings']['twa_s']:.0f} |")


if __name__ == "__main__":
    try:
        main()
        sys.stdout.flush()  # a reader that stopped early (`| head`) is found here, not at interpreter exit
    except BrokenPipeError:  # nothing more to write: end quietly, without the interpreter's flush error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
