"""Facts a report must carry to make a result reproducible."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from click.testing import CliRunner

from twa_tool.cli import cli


def test_average_records_the_thread_count_and_writes_files_with_the_umask(demo_ckpts: Path, tmp_path: Path) -> None:
    args = ["average", str(demo_ckpts), "--data", "synthetic", "--epochs", "1", "--baselines", "none",
            "--threads", "1", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "report.json").read_text())["threads"] == 1
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("model.safetensors", "report.json", "report.md"):  # as open() would make them, not mkstemp's 0600
        assert stat.S_IMODE((tmp_path / "o" / name).stat().st_mode) == 0o666 & ~mask, name
