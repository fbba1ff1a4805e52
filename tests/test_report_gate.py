"""The quality gate's lines (console, report.md, the exit-3 error) show numbers that tell apart what differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from twa_tool import pipeline
from twa_tool.cli import cli

FAST = ["--data", "synthetic", "--epochs", "1", "--batch-size", "512", "--threads", "1"]


def fake_gate(twa: float, baseline: float, tolerance: float):
    """quality_gate with given accuracies (as a 50,000-example evaluation split gives them), the rule unchanged."""
    real = pipeline.quality_gate

    def gate(config, metrics):
        out = real(config, metrics)
        passed = baseline - twa <= tolerance + 1e-9
        return {**out, "twa_accuracy": twa, "baseline_accuracy": baseline, "tolerance": tolerance, "passed": passed}
    return gate


@pytest.mark.parametrize("twa, baseline, tolerance, error, verdict", [
    # 76.130% against 76.132%: printed as "76.13% is below last 76.13%", a failure with equal numbers
    (0.76130, 0.76132, 0.0, "TWA accuracy 76.130% is below last 76.132% (tolerance 0.000 points)",
     "(tolerance 0.000 points): FAILED"),
    # a tolerance of 1e-5 (0.001 points) printed as "tolerance 0.00 points"
    (0.76130, 0.76134, 0.00001, "TWA accuracy 76.130% is below last 76.134% (tolerance 0.001 points)",
     "(tolerance 0.001 points): FAILED"),
    # numbers that differ at two decimals keep two
    (0.76, 0.7621, 0.0020, "TWA accuracy 76.00% is below last 76.21% (tolerance 0.20 points)",
     "(tolerance 0.20 points): FAILED"),
    # 0.2 short with a tolerance of 0.1995: "tolerance 0.20 points" beside a 0.20-point shortfall
    (0.76, 0.762, 0.001995, "TWA accuracy 76.000% is below last 76.200% (tolerance 0.199 points)",
     "(tolerance 0.199 points): FAILED"),
])
def test_a_failed_gate_never_reads_as_equal_numbers(demo_ckpts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    twa: float, baseline: float, tolerance: float, error: str,
                                                    verdict: str) -> None:
    monkeypatch.setattr(pipeline, "quality_gate", fake_gate(twa, baseline, tolerance))
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--baselines", "last",
                                      "--fail-if-worse-than", "last", "--tolerance", str(tolerance), "--out", str(out),
                                      "--json"])
    assert result.exit_code == 3, result.output
    assert f"error: quality gate failed: {error}; wrote twa to " in result.stderr
    assert f"quality gate vs last {verdict.replace('FAILED', 'failed')}; wrote twa" in result.stderr
    assert f"Quality gate vs last {verdict}; wrote twa." in (out / "report.md").read_text()
    assert json.loads(result.stdout)["quality_gate"]["tolerance"] == tolerance


def test_ordinary_gate_lines_keep_two_decimals(demo_ckpts: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "quality_gate", fake_gate(0.88, 0.892, 0.002))
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--baselines", "last",
                                      "--fail-if-worse-than", "last", "--tolerance", "0.002", "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 3
    assert "TWA accuracy 88.00% is below last 89.20% (tolerance 0.20 points)" in result.stderr


def test_report_md_and_console_give_the_coefficient_sum_and_name_dropped_checkpoints(tmp_path: Path) -> None:
    """report.md had no Σ a (the console has it), and neither said which 0 coefficient is a dropped checkpoint."""
    from rich.console import Console

    from twa_tool.report import markdown_report, render_average

    metric = {"accuracy": 0.5, "loss": 1.0}
    report = {"checkpoints": ["1.pt", "2.pt", "3.pt"], "coefficients": [0.25, 0.0, 1.0], "dropped": ["2.pt"],
              "coefficients_sum": 1.25, "metrics": {"swa": metric, "twa": metric}, "model": {"spec": "twa:mlp"},
              "data": {"spec": "synthetic", "fit_on": "train"}, "device": "cpu",
              "basis": {"rank": 2, "orthonormality_error": 1e-7, "span_residual": 1e-7}}
    text = markdown_report(report, [])
    assert "| 2.pt (dropped) | +0.0000 |" in text and "| 1.pt | +0.2500 |" in text
    assert "Σ a = 1.2500" in text
    console = Console(record=True, width=200, no_color=True)
    render_average(report, console)
    shown = console.export_text()
    assert "2.pt (dropped)" in shown and "1.pt (dropped)" not in shown and "Σ a = 1.2500" in shown


def test_verbose_gives_a_failed_gate_its_line_and_no_traceback(demo_ckpts: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed gate is a result (exit 3, the output written), not a crash: -v printed its traceback."""
    monkeypatch.setattr(pipeline, "quality_gate", fake_gate(0.5, 0.6, 0.0))
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--baselines", "last",
                                      "--fail-if-worse-than", "last", "--out", str(tmp_path / "o"), "-v"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and "QualityGateFailed" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: quality gate failed: TWA accuracy 50.00% is below last 60.00% (tolerance 0.00 points); "
                      f"wrote twa to {tmp_path / 'o' / 'model.safetensors'}"]


def test_verbose_gives_an_interrupt_before_the_command_its_line_and_no_traceback(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ctrl-C while the arguments are parsed is the user's stop, as once the command runs: no traceback with -v."""
    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.commands["average"], "parse_args", interrupt)
    result = CliRunner().invoke(cli, ["average", str(tmp_path), "--data", "synthetic", "--out", str(tmp_path / "o"),
                                      "-v"])
    assert result.exit_code == 130
    assert "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.strip()] == ["interrupted: nothing was written"]


def test_report_md_of_a_fallback_says_which_model_was_written_and_whose_coefficients_it_shows(
        demo_ckpts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--on-worse fallback wrote the last checkpoint, and report.md listed TWA's coefficients as if they were the
    written model's, beside "wrote last"."""
    monkeypatch.setattr(pipeline, "quality_gate", fake_gate(0.5, 0.6, 0.0))
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--baselines", "last", "--fail-if-worse-than",
                                      "last", "--on-worse", "fallback", "--out", str(out), "--json"])
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["written_method"] == "last" and report["written_coefficients"] == [0.0, 0.0, 0.0, 0.0, 1.0]
    md = (out / "report.md").read_text()
    assert "**The written model is the last checkpoint (4.safetensors), not TWA's result.**" in md
    assert "| checkpoint | coefficient |" not in md
    assert "| checkpoint | TWA coefficient | written (last) |" in md
    twa = report["coefficients"]
    for index, a in enumerate(twa):
        assert f"| {index}.safetensors | {a:+.4f} | {float(index == 4):+.4f} |" in md
    assert f"Σ a (TWA's) = {sum(twa):.4f}" in md
    assert "TWA's coefficients (not the written model's)" in result.stderr and "written (last)" in result.stderr


def test_report_md_of_a_twa_result_keeps_its_one_coefficient_column(demo_ckpts: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--baselines", "none", "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "| checkpoint | coefficient |" in md and "written model is" not in md and "TWA's" not in md


@pytest.mark.parametrize("tolerance, noted", [(0.5, True), (0.1, True), (0.02, False), (0.0, False)])
def test_a_tolerance_written_in_points_gets_a_warning(tolerance: float, noted: bool) -> None:
    """--tolerance 0.5 meant as half a point lets TWA lose 50 points: the run warns and shows the fraction."""
    from twa_tool.config import AverageConfig
    from twa_tool.pipeline import tolerance_note

    config = AverageConfig(checkpoint_dir=Path("c"), out_dir=Path("o"), data="synthetic", fail_if_worse_than="swa",
                           tolerance=tolerance)
    note = tolerance_note(config)
    assert (note is not None) == noted
    if tolerance == 0.5:
        assert note == ("--tolerance 0.5 is a fraction of accuracy: the gate lets TWA lose 50 points against swa; "
                        "for 0.5 points write --tolerance 0.005")


def test_a_tolerance_in_points_is_named_by_the_dry_run(demo_ckpts: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["average", str(demo_ckpts), *FAST, "--fail-if-worse-than", "swa",
                                      "--tolerance", "0.5", "--dry-run", "--out", str(tmp_path / "o")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "--tolerance 0.5 is a fraction of accuracy" in result.stderr.replace("\n", " ")


def test_console_coefficients_of_many_checkpoints_show_the_written_checkpoint_of_a_fallback() -> None:
    """Of more than 12 checkpoints the console shows the 12 largest |a|: they were TWA's only, so a fallback to a
    checkpoint whose TWA coefficient was small showed a written column of zeros, without the row holding its 1."""
    from rich.console import Console

    from twa_tool.report import coefficients_table

    names = [f"{i}.pt" for i in range(20)]
    twa = [0.05 * (1 + i % 7) for i in range(20)]
    twa[3] = 0.001
    report = {"checkpoints": names, "coefficients": twa, "written_method": "best",
              "written_coefficients": [float(i == 3) for i in range(20)], "metrics": {"best": {"checkpoint": "3.pt"}}}
    console = Console(width=200, record=True)
    console.print(coefficients_table(report))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") == 4}
    assert len(rows) == 12 and "3.pt" in rows and "+1.0000" in rows["3.pt"]
