"""Both `pip install .` and `pip install -e .` expose export/, federated/ and devices/ as edge_qmul.*."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib, json; "
    "mods = ['edge_qmul', 'edge_qmul.export', 'edge_qmul.federated', 'edge_qmul.devices']; "
    "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))"
)


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_install_maps_the_sub_packages(tmp_path: Path, editable: bool) -> None:
    src = tmp_path / "src"
    # a clean copy, so the build never writes into the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"))
    prefix = tmp_path / "prefix"
    # --no-deps / --no-build-isolation / --no-index: only the package mapping is under test (no network)
    target = ["-e", str(src)] if editable else [str(src)]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--ignore-installed",  # never touch the running environment's own install
         "--prefix", str(prefix), *target],
        check=True, capture_output=True, cwd=tmp_path,
    )
    site_dir = next(prefix.glob("lib/python3*/site-packages"))
    # -S: no site-packages of this environment (it holds the developer's own editable install);
    # addsitedir processes the .pth files an editable install relies on.
    boot = f"import site; site.addsitedir({str(site_dir)!r}); "
    out = subprocess.run([sys.executable, "-S", "-c", boot + PROBE], check=True, capture_output=True, text=True,
                         cwd=tmp_path)
    files = {k: Path(v) for k, v in json.loads(out.stdout).items()}
    assert files["edge_qmul.export"].parent.name == "export"
    assert files["edge_qmul.federated"].parent.name == "federated"
    assert files["edge_qmul.devices"].parent.name == "devices"
    for path in files.values():
        # an editable install points at the source tree; a regular install copies into site-packages
        assert (src in path.parents) == editable, path
        assert (site_dir in path.parents) != editable, path
    generic = subprocess.run([sys.executable, "-S", "-c", boot + "import export"], capture_output=True, cwd=tmp_path)
    assert generic.returncode != 0  # no generic top-level module leaks into the environment
