"""bench/table.py on a CIFAR-10 directory in the real python-pickle format (a small synthetic one).

The committed table is Fashion-MNIST; this proves the CIFAR-10 path a user with the files would take:
CIFAR ResNet-8, every method, int8 ONNX metrics, both scenarios, written beside (not over) the Fashion
table.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _write_cifar10(root: Path, per_batch: int = 80, test: int = 100) -> None:
    """Class-dependent colour blobs plus noise, so a model can learn something in one epoch."""
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 226, size=(10, 3))

    def batch(n: int) -> dict[bytes, object]:
        labels = rng.integers(0, 10, size=n)
        img = colours[labels][:, :, None, None] + rng.normal(0, 40, size=(n, 3, 32, 32))
        data = np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072)
        return {b"data": data, b"labels": [int(v) for v in labels]}

    root.mkdir(parents=True)
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        with open(root / name, "wb") as fh:
            pickle.dump(batch(n), fh, protocol=2)


@pytest.mark.slow
def test_table_runs_on_cifar10_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    assert spec and spec.loader
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    data_root = tmp_path / "cifar-10-batches-py"
    _write_cifar10(data_root)
    out = tmp_path / "results"
    code = table.main(["--dataset", "cifar10", "--data-root", str(data_root), "--seeds", "0", "--quick",
                       "--root", str(tmp_path / "runs"), "--out", str(out), "--train-epochs", "1"])
    assert code == 0
    payload = json.loads((out / "table-cifar10.json").read_text())
    assert payload["model"] == "resnet8" and payload["dataset"] == "cifar10"
    assert set(payload["summary"]) == {"random 10%", "class 0 (airplane)"}
    for rows in payload["summary"].values():
        assert set(rows) == {"none", *table.METHODS}
        for cell in rows.values():
            assert all(0.0 <= cell[k][0] <= 100.0 for k in ("FA", "RA", "TA", "MIA"))
    assert rows["retrain"]["avg_gap"][0] == 0.0
    assert "(resnet8, int8 ONNX in onnxruntime)" in (out / "table-cifar10.md").read_text()
    assert (out / "table-cifar10.png").stat().st_size > 1000
    assert not (out / "table.md").exists()
