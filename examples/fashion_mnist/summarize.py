"""Print the example's results as a markdown table.

    python examples/fashion_mnist/summarize.py RUN_DIR [LABEL=REPORT.json ...]

Reads RUN_DIR/ckpts/history.json (the plain training run) and the `twa average --json` reports
RUN_DIR/head.json and RUN_DIR/tail.json, or the LABEL=REPORT.json pairs given instead (e.g. to
compare TWA learning rates). Accuracies are on the Fashion-MNIST test split, in percent.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def last_epoch(names: list[str]) -> int:
    return max(int(n) for name in names for n in re.findall(r"\d+", name))


def row(label: str, report: dict, regular: float, regular_epochs: int) -> str:
    metrics, train = report["metrics"], report["config"]["train"]
    names = report["checkpoints"]
    sgd_epochs, twa_epochs = last_epoch(names), train["epochs"]
    best = metrics.get("best")
    best_text = f"{percent(best['accuracy'])} ({best['checkpoint']})" if best else "–"
    twa = metrics["twa"]["accuracy"]
    swa = metrics.get("swa", {}).get("accuracy")
    cells = [
        label,
        f"{names[0]}..{names[-1]} ({len(names)})",
        f"{sgd_epochs} + {twa_epochs}",
        f"lr {train['lr']:g}, wd {train['weight_decay']:g}, start {report['train']['start']}"
        + (f", fit on {report['data']['fit_examples']} held-out" if report["data"]["fit_on"] == "holdout" else ""),
        percent(metrics.get("last", {}).get("accuracy")),
        best_text,
        percent(swa),
        f"**{percent(twa)}**",
        "–" if swa is None else f"{100 * (twa - swa):+.2f}",
        f"{percent(regular)} ({regular_epochs} ep)",
    ]
    return "| " + " | ".join(cells) + " |"


def read_json(path: Path, what: str) -> dict:
    """The JSON document at ``path``, or exit with one line naming the file and what writes it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a JSON document"
        sys.exit(f"error: {path}: {reason}; {what}")


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    run_dir = Path(argv[0])
    history = read_json(run_dir / "ckpts" / "history.json", "it is written by examples/fashion_mnist/train.py")
    regular_epochs = max(int(e) for e in history)
    regular = history[str(regular_epochs)]["test_accuracy"]
    bad = [a for a in argv[1:] if "=" not in a]
    if bad:
        sys.exit(f"error: {bad[0]}: expected LABEL=REPORT.json (e.g. head_lr1=$OUT/lr_sweep/head_lr1.json)")
    pairs = [a.split("=", 1) for a in argv[1:]] or [["head", run_dir / "head.json"], ["tail", run_dir / "tail.json"]]
    reports = [(label, read_json(path, "it is the stdout of `twa average ... --json` (see its .log beside it)"))
               for label, path in pairs]

    print("| stage | checkpoints (n) | epochs used (SGD + TWA) | TWA settings | last | best (ckpt) | SWA | TWA "
          "| TWA − SWA | regular run |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    seconds = []
    for label, report in reports:
        print(row(label, report, regular, regular_epochs))
        seconds.append(f"{label} {sum(report['timings'].values()):.0f}s")
    best_epoch = max(history, key=lambda e: history[e]["test_accuracy"])
    print()
    print(f"Regular run: {regular_epochs} epochs of SGD, test accuracy {percent(regular)}% after the last epoch "
          f"(best epoch {best_epoch}: {percent(history[best_epoch]['test_accuracy'])}%; training time "
          f"{sum(h['seconds'] for h in history.values()):.0f}s).")
    print("last/best/SWA/TWA: BatchNorm statistics re-estimated on the training split before evaluation "
          "(the regular run's numbers use the running statistics from training).")
    print(f"twa average time (load + baselines + TWA): {', '.join(seconds)}.")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
        sys.stdout.flush()  # a reader that stopped early (`| head`) is found here, not at interpreter exit
    except BrokenPipeError:  # nothing more to write: end quietly, without the interpreter's flush error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
