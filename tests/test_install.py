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
    if not editable:  # the test harnesses (tests/fleet) stay out of the distribution
        assert not {"loopback.py", "inprocess.py"} & {p.name for p in files["edge_qmul.federated"].parent.iterdir()}
    generic = subprocess.run([sys.executable, "-S", "-c", boot + "import export"], capture_output=True, cwd=tmp_path)
    assert generic.returncode != 0  # no generic top-level module leaks into the environment


# A board installs `edge-qmul[device]` (numpy, onnxruntime, flwr, cryptography): no torch. This builds that install
# for real, in a fresh virtualenv, from the package index as a board would. Not `--system-site-packages` (it would
# see this machine's torch) and not `--no-index` from a wheel directory (CI's fresh machine has none): CI runs as
# root with network for pip, and flwr's dependency tree installs in about 40 s there; hence the slow marker.
LEAN_PROBE = (
    "import importlib.util, json; "
    "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
    "['torch', 'sklearn', 'onnx', 'matplotlib', 'PIL', 'numpy', 'onnxruntime', 'flwr', 'cryptography']}))"
)


@pytest.mark.slow
def test_the_device_extra_installs_without_torch_and_runs_the_device_verbs(tmp_path: Path) -> None:
    import venv

    import numpy as np

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"))
    env_dir = tmp_path / "board"
    venv.create(env_dir, with_pip=True, clear=True)  # its own site-packages only
    bin_dir = env_dir / "bin"
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "--quiet", f"{src}[device]"],
                   check=True, capture_output=True, cwd=tmp_path, timeout=900)
    found = json.loads(subprocess.run([bin_dir / "python", "-c", LEAN_PROBE], check=True, capture_output=True,
                                      text=True, cwd=tmp_path).stdout)
    assert found == {"torch": False, "sklearn": False, "onnx": False, "matplotlib": False, "PIL": False,
                     "numpy": True, "onnxruntime": True, "flwr": True, "cryptography": True}

    rng = np.random.default_rng(0)  # the board's own samples: an .npz, as the server's --dataset npz reads one
    x, y = rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), np.arange(24) % 3
    np.savez(tmp_path / "mine.npz", x_train=x[:18], y_train=y[:18], x_test=x[18:], y_test=y[18:])
    fleet = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")  # RFC 8032 test 1
    edge_qmul = str(bin_dir / "edge-qmul")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([edge_qmul, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)

    state = str(tmp_path / "state")
    init = run("device", "init", "--state", state, "--dataset", "npz", "--data-root", "mine.npz",
               "--fleet-key", fleet.hex())
    assert init.returncode == 0 and "24 samples in 3 classes" in init.stdout, init.stderr
    forget = run("device", "forget", "--state", state, "--class", "2")
    assert forget.returncode == 0 and "class 2 (8 sample(s))" in forget.stdout, forget.stderr
    status = run("device", "status", "--state", state, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["pending"] == 1
    server = run("train", "--run", str(tmp_path / "run"))  # a server verb on a board: one line, not a traceback
    assert server.returncode == 2
    assert server.stderr.strip() == "edge-qmul train: error: torch is not installed: pip install 'edge-qmul[server]'"
