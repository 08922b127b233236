"""The README's step-by-step block runs as written after `make demo` (slow: ~1.5 min on 2 cores)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def step_by_step() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("Step by step", 1)[1]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]


@pytest.mark.slow
def test_the_readme_step_by_step_runs_as_written(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent  # the .venv `make demo` made
    (tmp_path / ".venv").symlink_to(venv)
    env = {**os.environ, "PATH": os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", "-e", "-c", step_by_step()], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "certificate(s) issued" in proc.stdout and "validation: qmul for x86-server: passed" in proc.stdout
    assert "Warning" not in proc.stderr  # library deprecation notices stay off the terminal
