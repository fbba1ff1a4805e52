"""Facts a report must carry to make a result reproducible."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from twa_tool.cli import cli


def test_average_records_the_thread_count(demo_ckpts: Path, tmp_path: Path) -> None:
    args = ["average", str(demo_ckpts), "--data", "synthetic", "--epochs", "1", "--baselines", "none",
            "--threads", "1", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "report.json").read_text())["threads"] == 1
