"""Markdown table of `twa soup` reports: best single, uniform, greedy, twa (held-out and test accuracy, %).

    python examples/soup/summarize.py runs/soup/sweep/*/report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("best_single", "uniform", "greedy", "twa")


def main() -> None:
    print("| run | optimizer | lr | granularity | basis | " + " | ".join(f"{c} (held-out / test)" for c in COLUMNS)
          + " | written | TWA fit (s) |")
    print("|---|---|---:|---|---|" + "---:|" * len(COLUMNS) + "---|---:|")
    for path in map(Path, sys.argv[1:]):
        report = json.loads(path.read_text())
        config, metrics = report["config"], report["metrics"]
        cells = [f"{100 * metrics[c]['heldout']['accuracy']:.2f} / {100 * metrics[c]['eval']['accuracy']:.2f}"
                 for c in COLUMNS]
        print(f"| {path.parent.name} | {config['train']['optimizer']} | {config['train']['lr']:g} | "
              f"{config['granularity']} | {config['basis_dtype']} | " + " | ".join(cells)
              + f" | {report['written_method']} | {report['timings']['twa_s']:.0f} |")


if __name__ == "__main__":
    main()
