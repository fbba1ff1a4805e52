"""report.md and the figures with checkpoint names that mean something to Markdown or matplotlib."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from twa_tool.plots import render_plots
from twa_tool.report import markdown_report, markdown_soup_report

NAMES = ["a|b_0.pt", "*bold*_1.pt", "under__score_2.pt", "x$^$_3.pt", "back`tick_4.pt", "L" * 230 + "_5.pt"]


def cells(line: str) -> int:
    """Cells of a Markdown table row: the pipes not escaped by a backslash, less one."""
    return len(re.findall(r"(?<!\\)\|", line)) - 1


def unescaped(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def average_report() -> dict:
    metric = {"accuracy": 0.5, "loss": 1.0}
    return {"checkpoints": NAMES, "coefficients": [1 / len(NAMES)] * len(NAMES),
            "metrics": {"best": {**metric, "checkpoint": NAMES[0]}, "last": {**metric, "checkpoint": NAMES[4]},
                        "swa": metric, "twa": metric},
            "checkpoint_metrics": {n: metric for n in NAMES},
            "model": {"spec": "file`s.py:make"}, "data": {"spec": "synthetic", "fit_on": "train"}, "device": "cpu",
            "basis": {"rank": 6, "orthonormality_error": 1e-7, "span_residual": 1e-7}}


def test_average_tables_keep_their_columns_and_show_names_literally() -> None:
    text = markdown_report(average_report(), [])
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows and all(cells(line) == (3 if "accuracy" in line or "%" in line or "---:|---:" in line else 2)
                        for line in rows)
    table = [line for line in rows if re.match(r"^\| .* \| [+-]\d\.\d{4} \|$", line)]
    assert [unescaped(line[2:line.rindex(" | ")]) for line in table] == NAMES
    assert "best single checkpoint (a\\|b\\_0.pt)" in text
    assert "``file`s.py:make``" in text  # a code span that a backtick in the spec does not close


def test_soup_tables_keep_their_columns() -> None:
    metric = {"heldout": {"accuracy": 0.5, "loss": 1.0}, "eval": {"accuracy": 0.5, "loss": 1.0}}
    report = {"ingredients": NAMES, "model": {"spec": "twa:mlp"}, "device": "cpu", "written_method": "twa",
              "chosen_by": "held-out accuracy", "base": None,
              "data": {"spec": "synthetic", "heldout": "--holdout-fraction 0.1", "heldout_examples": 10,
                       "eval_examples": 10},
              "metrics": {"best_single": {**metric, "ingredient": NAMES[0]}, "uniform": metric, "greedy": metric,
                          "twa": metric, "ingredients": {n: metric for n in NAMES}},
              "greedy": {"soup": NAMES[:1], "trace": [{"candidate": n, "heldout_accuracy": 0.5, "accepted": i == 0}
                                                      for i, n in enumerate(NAMES)]},
              "twa": {"granularity": "model"},
              "coefficients": {k: [1 / len(NAMES)] * len(NAMES) for k in ("uniform", "greedy", "twa")}}
    text = markdown_soup_report(report)
    for header, width in (("| model |", 5), ("| candidate |", 3), ("| ingredient |", 4)):
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(header))
        table = []
        for line in lines[start:]:
            if not line.startswith("|"):
                break
            table.append(line)
        assert all(cells(line) == width for line in table), (header, table)
        assert len(table) >= len(NAMES) + 2


def test_figures_draw_names_with_dollar_signs_as_text() -> None:
    pytest.importorskip("matplotlib")
    figures, note = render_plots(average_report())  # "x$^$_3.pt" was parsed as mathtext: ValueError
    assert note is None and set(figures) == {"coefficients.png", "accuracy.png"}
    assert all(png.startswith(b"\x89PNG") for png in figures.values())


@pytest.mark.parametrize("error", ["ImportError('numpy.core.multiarray failed to import')",
                                   "AttributeError('_ARRAY_API not found')"])
def test_a_matplotlib_that_cannot_be_imported_is_named_not_called_missing(
        error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib < 3.8.4 was built for numpy 1.x and fails to import under numpy 2: report.md said it "is not
    installed" (its ImportError was taken for a missing package), and any other import error failed the run
    after its model was computed."""
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text(f"raise {error}\n")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    figures, note = render_plots(average_report())
    assert figures == {} and note is not None
    assert note.startswith("plots skipped: matplotlib") and "is installed but cannot be imported" in note
    assert f"({error.split('(')[0]}: " in note and note.endswith("upgrade it: pip install -U matplotlib")
    line = markdown_report(average_report(), [], note).splitlines()[-1]  # the italic note line
    assert line.startswith("_plots skipped") and line.endswith("_")
    assert "_" not in line[1:-1].replace("\\_", "")  # "_ARRAY_API" quoted from the error cannot end the emphasis
