"""Tests for edge_qmul.data: loaders on tiny files in the real on-disk formats, split.json, forget selection."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from imagedata import digits_uint8, write_image_folder
from PIL import Image

from edge_qmul.data import (
    CIFAR10_CLASSES,
    DATASETS,
    FASHION_MNIST_CLASSES,
    ArrayDataset,
    DatasetSource,
    Split,
    channel_stats,
    content_ids,
    hash_file,
    hash_pixels,
    load_dataset,
    make_split,
    select_forget,
    to_tensors,
)
from edge_qmul.errors import ConfigError, DataError, EdgeQmulError, ForgetRequestError

N_TRAIN, N_TEST = 20, 10

# --------------------------------------------------------------------------------------------------
# Writers for the real file formats
# --------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in IDX format: magic 0x0000 08 <ndim>, big-endian int32 dims, raw data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_file(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_idx_dataset(root: Path, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Write tiny train/t10k IDX files; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=N_TRAIN, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=N_TEST, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_file(root / name, idx_bytes(array), gz)
    return arrays


def pickle_to(path: Path, obj: Any, protocol: int) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


def cifar_batch(rng: np.random.Generator, n: int, label_key: bytes, num_classes: int) -> dict[bytes, Any]:
    return {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def write_cifar10(root: Path, protocol: int, meta: bool = True) -> dict[str, dict[bytes, Any]]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(rng, 4, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(rng, 3, b"labels", 10)
    for name, batch in batches.items():
        pickle_to(root / name, batch, protocol)
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        pickle_to(root / "batches.meta", {b"label_names": names, b"num_vis": 3072}, protocol)
    return batches


def write_cifar100(root: Path, protocol: int, meta: bool = True) -> dict[str, dict[bytes, Any]]:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name, n in (("train", 12), ("test", 5)):
        batch = cifar_batch(rng, n, b"fine_labels", 100)
        batch[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, size=n)]
        batches[name] = batch
        pickle_to(root / name, batch, protocol)
    if meta:
        names = [f"fine{i}".encode() for i in range(100)]
        pickle_to(root / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}, protocol)
    return batches


# --------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_round_trip(tmp_path: Path, name: str, gz: bool) -> None:
    arrays = write_idx_dataset(tmp_path, gz)
    source = load_dataset(name, tmp_path)

    assert source.name == name and source.root == str(tmp_path.resolve())
    assert source.test is not None
    assert source.train.images.shape == (N_TRAIN, 1, 28, 28)
    assert source.test.images.shape == (N_TEST, 1, 28, 28)
    assert source.train.images.dtype == np.uint8 and source.train.labels.dtype == np.int64
    assert source.train.scale == 255.0 and len(source.train) == N_TRAIN
    np.testing.assert_array_equal(source.train.images[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(source.train.labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(source.test.images[:, 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(source.test.labels, arrays["t10k-labels-idx1-ubyte"])
    assert source.input_shape == (1, 28, 28) and source.num_classes == 10
    assert source.classes[0] == ("T-shirt/top" if name == "fashion-mnist" else "0")


def test_idx_gzip_content_is_sniffed(tmp_path: Path) -> None:
    """A gzipped file without the .gz suffix still loads (content decides, not the name)."""
    arrays = write_idx_dataset(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").rename(tmp_path / "train-images-idx3-ubyte")
    source = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(source.train.images[:, 0], arrays["train-images-idx3-ubyte"])


def _bad_magic(data: bytes) -> bytes:
    return b"\x00\x00\x08\x02" + data[4:]


def _truncate(data: bytes) -> bytes:
    return data[:-7]


def _header_only(data: bytes) -> bytes:
    return data[:2]


def _extra_bytes(data: bytes) -> bytes:
    return data + b"\x00"


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize(
    ("target", "corrupt", "needle"),
    [
        ("train-images-idx3-ubyte", _bad_magic, "magic"),
        ("train-labels-idx1-ubyte", _bad_magic, "magic"),
        ("t10k-images-idx3-ubyte", _truncate, "truncated"),
        ("t10k-labels-idx1-ubyte", _header_only, "truncated"),
        ("train-images-idx3-ubyte", _extra_bytes, "longer"),
    ],
)
def test_corrupt_idx_names_file(
    tmp_path: Path, target: str, corrupt: Callable[[bytes], bytes], needle: str, gz: bool
) -> None:
    arrays = write_idx_dataset(tmp_path, gz)
    write_file(tmp_path / target, corrupt(idx_bytes(arrays[target])), gz)
    with pytest.raises(DataError, match=needle) as info:
        load_dataset("fashion-mnist", tmp_path)
    assert target in str(info.value)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, gz=False)
    write_file(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(N_TRAIN - 1, np.uint8)), gz=False)
    with pytest.raises(DataError, match="19 labels") as info:
        load_dataset("mnist", tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value) and "train-labels-idx1-ubyte" in str(info.value)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, gz=False)
    write_file(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.full(N_TEST, 10, np.uint8)), gz=False)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*label 10"):
        load_dataset("mnist", tmp_path)


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_missing_file(tmp_path: Path, name: str) -> None:
    write_idx_dataset(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\[\.gz\]") as info:
        load_dataset(name, tmp_path)
    if name == "fashion-mnist":
        assert "apt-get install -y dataset-fashion-mnist" in str(info.value)


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10", "cifar100"])
def test_missing_directory(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset(name, missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_root_required(name: str) -> None:
    with pytest.raises(ConfigError, match="--data-root"):
        load_dataset(name)


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in DATASETS)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed"
)
def test_real_fashion_mnist_default_root() -> None:
    source = load_dataset("fashion-mnist")
    assert source.test is not None
    assert source.train.images.shape == (60000, 1, 28, 28) and source.test.images.shape == (10000, 1, 28, 28)
    assert source.classes == FASHION_MNIST_CLASSES
    assert np.bincount(source.train.labels).tolist() == [6000] * 10


# --------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("subdir", [False, True], ids=["flat", "subdir"])
def test_cifar10(tmp_path: Path, protocol: int, subdir: bool) -> None:
    batches = write_cifar10(tmp_path / "cifar-10-batches-py" if subdir else tmp_path, protocol)
    source = load_dataset("cifar10", tmp_path)

    assert source.test is not None
    assert source.train.images.shape == (20, 3, 32, 32) and source.test.images.shape == (3, 3, 32, 32)
    assert source.train.images.dtype == np.uint8 and source.train.scale == 255.0
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    np.testing.assert_array_equal(source.train.images.reshape(20, 3072), expected)
    np.testing.assert_array_equal(source.test.labels, batches["test_batch"][b"labels"])
    # Row layout is 1024 red values, then green, then blue.
    np.testing.assert_array_equal(source.train.images[0, 1].ravel(), expected[0, 1024:2048])
    assert source.classes == tuple(f"class{i}" for i in range(10))
    assert source.input_shape == (3, 32, 32)


def test_cifar10_numpy1_module_names(tmp_path: Path) -> None:
    """Pickles written with numpy 1 (like the original files) name ``numpy.core.multiarray``."""
    batches = write_cifar10(tmp_path, 2)
    path = tmp_path / "data_batch_1"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    source = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(source.train.images[:4].reshape(4, 3072), batches["data_batch_1"][b"data"])


def test_cifar10_default_names_without_meta(tmp_path: Path) -> None:
    write_cifar10(tmp_path, 2, meta=False)
    assert load_dataset("cifar10", tmp_path).classes == CIFAR10_CLASSES


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
@pytest.mark.parametrize("meta", [True, False])
def test_cifar100(tmp_path: Path, protocol: int, meta: bool) -> None:
    batches = write_cifar100(tmp_path / "cifar-100-python", protocol, meta)
    source = load_dataset("cifar100", tmp_path)

    assert source.test is not None
    assert source.train.images.shape == (12, 3, 32, 32) and source.test.images.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(source.train.labels, batches["train"][b"fine_labels"])
    assert source.num_classes == 100
    assert source.classes[7] == ("fine7" if meta else "7")


class _Evil:
    """Unpickling this would call ``func(*args)``."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


@pytest.mark.parametrize(
    ("make_payload", "global_name"),
    [
        (lambda marker: _Evil(os.system, (f"echo pwned > {marker}",)), "system"),
        (lambda marker: _Evil(builtins.exec, (f"open({str(marker)!r}, 'w').write('pwned')",)), "exec"),
        # Protocol 2 spells this global "commands.call" (its Python 2 name).
        (lambda marker: _Evil(subprocess.call, (["touch", str(marker)],)), "call"),
    ],
    ids=["os.system", "exec", "subprocess"],
)
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_malicious_pickle_is_refused(
    tmp_path: Path, make_payload: Callable[[Path], _Evil], global_name: str, protocol: int
) -> None:
    root = tmp_path / "cifar"
    write_cifar10(root, protocol)
    marker = tmp_path / "pwned"
    batch = cifar_batch(np.random.default_rng(0), 4, b"labels", 10)
    batch[b"labels"] = make_payload(marker)
    pickle_to(root / "data_batch_3", batch, protocol)

    with pytest.raises(DataError, match="forbidden global") as info:
        load_dataset("cifar10", root)
    assert global_name in str(info.value) and "data_batch_3" in str(info.value)
    assert not marker.exists(), "the payload was executed"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b.pop(b"labels"), "'labels'"),
        (lambda b: b.__setitem__(b"data", np.zeros((4, 100), np.uint8)), r"\(N, 3072\)"),
        (lambda b: b.__setitem__(b"data", np.zeros((4, 3072), np.float32)), "uint8"),
        (lambda b: b.__setitem__(b"labels", [0, 1]), "must be 3 integers"),
        (lambda b: b.__setitem__(b"labels", [0, 1, 10]), r"0\.\.9"),
    ],
    ids=["no-labels", "bad-shape", "bad-dtype", "label-count", "label-range"],
)
def test_cifar_bad_batch(tmp_path: Path, mutate: Callable[[dict[bytes, Any]], Any], needle: str) -> None:
    batches = write_cifar10(tmp_path, 2)
    batch = batches["test_batch"]
    mutate(batch)
    pickle_to(tmp_path / "test_batch", batch, 2)
    with pytest.raises(DataError, match=needle) as info:
        load_dataset("cifar10", tmp_path)
    assert "test_batch" in str(info.value)


@pytest.mark.parametrize(
    "content", [b"not a pickle at all", pickle.dumps([1, 2, 3], protocol=2)], ids=["garbage", "not-dict"]
)
def test_cifar_corrupt_pickle(tmp_path: Path, content: bytes) -> None:
    write_cifar100(tmp_path, 2)
    (tmp_path / "test").write_bytes(content)
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", tmp_path)
    assert str(tmp_path / "test") in str(info.value)


@pytest.mark.parametrize(("name", "missing"), [("cifar10", "data_batch_4"), ("cifar100", "train")])
def test_cifar_missing_file(tmp_path: Path, name: str, missing: str) -> None:
    (write_cifar10 if name == "cifar10" else write_cifar100)(tmp_path, 2)
    (tmp_path / missing).unlink()
    with pytest.raises(DataError, match=f"expected {missing} in"):
        load_dataset(name, tmp_path)


# --------------------------------------------------------------------------------------------------
# Embedded and generated datasets
# --------------------------------------------------------------------------------------------------


def test_digits() -> None:
    source = load_dataset("digits")
    assert source.test is None and source.root is None and source.single_pool
    assert source.train.images.shape == (1797, 1, 8, 8) and source.train.images.dtype == np.uint8
    assert source.train.scale == 16.0 and int(source.train.images.max()) == 16
    assert source.classes == tuple(str(i) for i in range(10))
    assert source.pool("test") is source.train


def test_synthetic_deterministic() -> None:
    a, b = load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=3)
    c = load_dataset("synthetic", seed=4)
    assert a.train.images.shape == (600, 1, 8, 8) and a.train.scale == 255.0 and a.num_classes == 4
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    assert not np.array_equal(a.train.images, c.train.images)
    assert np.bincount(a.train.labels).tolist() == [150] * 4
    assert len(load_dataset("synthetic", synthetic_size=40).train) == 40


def test_synthetic_classes_are_separable() -> None:
    """Nearest class mean on raw pixels should already be near-perfect, so a small CNN can learn it."""
    source = load_dataset("synthetic", seed=0)
    x = source.train.images.reshape(len(source.train), -1).astype(np.float64)
    y = source.train.labels
    means = np.stack([x[:300][y[:300] == k].mean(axis=0) for k in range(4)])  # (4, 64)
    predicted = np.argmin(((x[300:, None, :] - means[None]) ** 2).sum(axis=2), axis=1)
    assert (predicted == y[300:]).mean() > 0.9


@pytest.mark.parametrize("size", [0, 3, -5])
def test_synthetic_bad_size(size: int) -> None:
    with pytest.raises(ConfigError, match="synthetic_size"):
        load_dataset("synthetic", synthetic_size=size)


# --------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------


def _fake_source(n_train: int, n_test: int | None, num_classes: int = 10) -> DatasetSource:
    def ds(n: int) -> ArrayDataset:
        images = np.arange(n * 4, dtype=np.int64).astype(np.uint8).reshape(n, 1, 2, 2)
        return ArrayDataset(images, np.arange(n, dtype=np.int64) % num_classes, 255.0)

    test = None if n_test is None else ds(n_test)
    return DatasetSource("fake", None, ds(n_train), test, tuple(str(i) for i in range(num_classes)))


@pytest.fixture(params=["two-file", "single-pool"])
def source(request: pytest.FixtureRequest) -> DatasetSource:
    return _fake_source(200, 50 if request.param == "two-file" else None)


def test_make_split_partition(source: DatasetSource) -> None:
    split = make_split(source, seed=7)
    train, val, test = set(split.train), set(split.val), set(split.test)
    assert len(train) == len(split.train) and not train & val
    assert split.forget == [] and split.single_pool == (source.test is None)
    if source.test is None:
        assert not test & (train | val)
        assert train | val | test == set(range(200))
        assert (len(split.train), len(split.val), len(split.test)) == (140, 20, 40)
    else:
        assert train | val == set(range(200)) and len(split.val) == 20
        assert split.test == list(range(50))
    assert split.train != sorted(split.train), "train order should be shuffled"
    assert split.retain() == split.train


def test_make_split_deterministic(source: DatasetSource) -> None:
    assert make_split(source, 1).to_json() == make_split(source, 1).to_json()
    assert make_split(source, 1).train != make_split(source, 2).train


@pytest.mark.parametrize(
    "kwargs", [{"val_fraction": 0.0}, {"val_fraction": 1.0}, {"test_fraction": -0.1}, {"val_fraction": True}]
)
def test_make_split_bad_fractions(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        make_split(_fake_source(100, None), 0, **kwargs)


def test_make_split_too_small() -> None:
    with pytest.raises(ConfigError, match="no training samples"):
        make_split(_fake_source(2, None), 0, val_fraction=0.5, test_fraction=0.5)


def test_split_save_load_round_trip(tmp_path: Path, source: DatasetSource) -> None:
    split = make_split(source, 3)
    path = tmp_path / "split.json"
    split.save(path)

    raw = json.loads(path.read_text())
    assert {"dataset", "root", "train", "val", "test"} <= raw.keys()
    assert "forget" not in raw  # the forget set lives in the ledger only
    loaded = Split.load(path)
    assert loaded == split
    assert not list(tmp_path.glob(".*tmp")), "atomic write left a temporary file behind"


def test_a_forget_list_in_an_old_split_file_is_not_the_forget_set(tmp_path: Path, source: DatasetSource) -> None:
    split = make_split(source, 3)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({**split.to_json(), "forget": split.train[:5]}))
    loaded = Split.load(path)
    assert loaded.forget == [] and loaded.retain() == split.train


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "JSON object"),
        ('{"dataset": "x"}', "missing key"),
        (
            '{"dataset": "x", "root": null, "seed": 0, "train": [1, "a"], "val": [], "test": [], "forget": []}',
            "'train'",
        ),
        (
            '{"dataset": "x", "root": null, "seed": 0, "train": [1, 2], "val": [2], "test": [], "forget": []}',
            "overlap",
        ),
        (
            '{"dataset": "x", "root": 3, "seed": 0, "train": [], "val": [], "test": [], "forget": []}',
            "'root'",
        ),
    ],
)
def test_split_load_corrupt(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(DataError, match=needle) as info:
        Split.load(path)
    assert str(path) in str(info.value) and "edge-qmul train --run" in str(info.value)


def test_split_load_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        Split.load(tmp_path / "split.json")
    assert "edge-qmul train --run" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Forget selection
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def pool_split() -> tuple[Split, np.ndarray]:
    source = _fake_source(200, None)
    return make_split(source, 0), source.train.labels


def test_forget_fraction_and_count(pool_split: tuple[Split, np.ndarray]) -> None:
    split, labels = pool_split
    by_fraction = select_forget(split, labels, fraction=0.1, seed=5)
    assert len(by_fraction) == 14 and by_fraction == sorted(by_fraction)
    assert set(by_fraction) <= set(split.train)
    assert by_fraction == select_forget(split, labels, fraction=0.1, seed=5)
    assert by_fraction != select_forget(split, labels, fraction=0.1, seed=6)
    by_count = select_forget(split, labels, count=len(split.train))
    assert by_count == sorted(split.train)


def test_forget_class(pool_split: tuple[Split, np.ndarray]) -> None:
    split, labels = pool_split
    chosen = select_forget(split, labels, klass=3)
    assert chosen == sorted(i for i in split.train if labels[i] == 3) and chosen


def test_forget_ids(pool_split: tuple[Split, np.ndarray]) -> None:
    split, labels = pool_split
    ids: list[Any] = [split.train[4], split.train[1], split.train[4], np.int64(split.train[0])]
    assert select_forget(split, labels, ids=ids) == sorted({split.train[0], split.train[1], split.train[4]})


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({}, ConfigError, "exactly one"),
        ({"fraction": 0.1, "count": 3}, ConfigError, "exactly one"),
        ({"fraction": 1.5}, ConfigError, "between 0 and 1"),
        ({"fraction": 0.001}, ForgetRequestError, "selects nothing"),
        ({"count": 0}, ConfigError, "positive integer"),
        ({"count": 10_000}, ForgetRequestError, "only 140 training samples"),
        ({"klass": 10}, ForgetRequestError, "out of range"),
        ({"klass": -1}, ForgetRequestError, "out of range"),
        ({"ids": []}, ForgetRequestError, "no ids"),
        ({"ids": [1.5]}, ForgetRequestError, "integers"),
        ({"ids": [250, -3, 999, 1000, 1001, 1002, 5]}, ForgetRequestError, r"-3, 250, 999.*0\.\.199"),
    ],
)
def test_forget_rejects(
    pool_split: tuple[Split, np.ndarray], kwargs: dict[str, Any], error: type[Exception], needle: str
) -> None:
    split, labels = pool_split
    with pytest.raises(error, match=needle):
        select_forget(split, labels, **kwargs)


@pytest.mark.parametrize("kind", ["test", "val"])
def test_forget_ids_not_training(pool_split: tuple[Split, np.ndarray], kind: str) -> None:
    split, labels = pool_split
    bad = getattr(split, kind)[0]
    with pytest.raises(ForgetRequestError) as info:
        select_forget(split, labels, ids=[split.train[0], bad])
    word = "a test sample" if kind == "test" else "a validation sample"
    assert f"id {bad} is {word}, not a training sample" in str(info.value)
    assert "split.json 'train'" in str(info.value)


def test_forget_class_without_samples() -> None:
    source = _fake_source(100, 20)
    split = make_split(source, 0)
    labels = source.train.labels.copy()
    labels[split.train] = 0  # class 1 now only appears among validation samples
    labels[split.val] = 1
    with pytest.raises(ForgetRequestError, match="class 1 has no samples"):
        select_forget(split, labels, klass=1)


def test_forget_ids_pool_size_bound(pool_split: tuple[Split, np.ndarray]) -> None:
    split, labels = pool_split
    big = max(split.train)
    with pytest.raises(ForgetRequestError, match=f"0..{big - 1}"):
        select_forget(split, labels, ids=[big], pool_size=big)


# --------------------------------------------------------------------------------------------------
# Tensor helpers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_to_tensors(name: str) -> None:
    torch = pytest.importorskip("torch")
    ds = load_dataset(name).train
    indices = [5, 0, 17]
    images, labels = to_tensors(ds, indices)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert tuple(images.shape) == (3, *ds.images.shape[1:]) and tuple(labels.shape) == (3,)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    np.testing.assert_allclose(images.numpy(), ds.images[indices] / ds.scale, rtol=1e-6)
    assert labels.tolist() == ds.labels[indices].tolist()
    empty_images, _ = to_tensors(ds, np.array([], dtype=np.int64))
    assert tuple(empty_images.shape) == (0, *ds.images.shape[1:])
    with pytest.raises(ConfigError, match="indices"):
        to_tensors(ds, [len(ds)])


def test_channel_stats() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 3, 4, 4), dtype=np.uint8)
    images[:, 2] = 7  # a constant channel: std must be floored, not zero
    ds = ArrayDataset(images, np.zeros(50, np.int64), 255.0)
    indices = np.arange(0, 50, 2)

    mean, std = channel_stats(ds, indices)
    scaled = images[indices].astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std[:2], scaled.std(axis=(0, 2, 3))[:2], rtol=1e-9)
    assert std[2] == pytest.approx(1e-3) and all(isinstance(v, float) for v in mean + std)
    with pytest.raises(ConfigError):
        channel_stats(ds, [])


def test_array_dataset_validates() -> None:
    with pytest.raises(ConfigError, match="uint8"):
        ArrayDataset(np.zeros((2, 1, 2, 2), np.float32), np.zeros(2, np.int64), 1.0)
    with pytest.raises(ConfigError, match="int64"):
        ArrayDataset(np.zeros((2, 1, 2, 2), np.uint8), np.zeros(3, np.int64), 1.0)


def test_pool_rejects_unknown() -> None:
    with pytest.raises(ConfigError, match="unknown pool"):
        _fake_source(10, 5).pool("holdout")


# --------------------------------------------------------------------------------------------------
# Bring-your-own data: image folders (real PNG / JPEG files) and .npz archives
# --------------------------------------------------------------------------------------------------

DIGIT_NAMES = tuple(f"digit{i}" for i in range(10))


def expect_error(error_type: type[EdgeQmulError], call: Callable[[], object], *needles: str) -> EdgeQmulError:
    """``call()`` raises exactly ``error_type`` (not a subclass) naming every needle and a fix, and returns
    nothing."""
    result: object = None
    with pytest.raises(error_type) as info:
        result = call()
    assert result is None
    assert type(info.value) is error_type
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"
    assert info.value.fix
    return info.value


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixel_sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def read_order(paths: list[Path], root: Path) -> list[int]:
    """Indices of ``paths`` in the order the loader reads them: sorted by path relative to ``root``."""
    return sorted(range(len(paths)), key=lambda i: paths[i].relative_to(root).parts)


@pytest.fixture(scope="module")
def digits40() -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits_uint8(40)
    assert set(labels.tolist()) == set(range(10))
    return images, labels


@pytest.fixture
def digit_folder(tmp_path: Path, digits40: tuple[np.ndarray, np.ndarray]) -> tuple[Path, list[Path]]:
    root = tmp_path.resolve() / "digits"
    return root, write_image_folder(root, *digits40, DIGIT_NAMES)


def test_image_folder_round_trip(
    digit_folder: tuple[Path, list[Path]], digits40: tuple[np.ndarray, np.ndarray]
) -> None:
    root, paths = digit_folder
    (root / ".DS_Store").write_bytes(b"\x00junk")  # hidden files and folders are ignored
    (root / "digit3" / ".hidden.png").write_bytes(b"not an image")
    (root / "digit4" / ".cache").mkdir()
    (root / "digit4" / ".cache" / "x.txt").write_text("ignored")
    images, labels = digits40
    source = load_dataset("imagefolder", root)

    order = read_order(paths, root)
    assert source.name == "imagefolder" and source.root == str(root) and source.single_pool
    assert source.classes == DIGIT_NAMES and source.input_shape == (1, 8, 8)
    ds = source.train
    assert ds.scale == 255.0 and ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.images, images[order])  # PNG is lossless
    np.testing.assert_array_equal(ds.labels, labels[order])
    expected_ids = [sha256_of(paths[i]) for i in order]
    assert ds.content_ids == tuple(expected_ids)
    assert content_ids(ds) == expected_ids == [hash_file(paths[i]) for i in order]
    assert np.array_equal(load_dataset("imagefolder", root).train.images, ds.images)  # deterministic
    split = make_split(source, seed=0)
    assert split.single_pool and len(split.train) + len(split.val) + len(split.test) == len(paths)


def test_image_folder_train_test(tmp_path: Path, digits40: tuple[np.ndarray, np.ndarray]) -> None:
    root = tmp_path.resolve() / "data"
    images, labels = digits40
    train_paths = write_image_folder(root, images[:20], labels[:20], DIGIT_NAMES, split="train")
    test_paths = write_image_folder(root, images[20:30], labels[20:30], DIGIT_NAMES, split="test")
    source = load_dataset("imagefolder", root)
    assert source.test is not None and source.classes == DIGIT_NAMES
    for ds, paths, imgs, labs in (
        (source.train, train_paths, images[:20], labels[:20]),
        (source.test, test_paths, images[20:30], labels[20:30]),
    ):
        order = read_order(paths, root)
        np.testing.assert_array_equal(ds.images, imgs[order])
        np.testing.assert_array_equal(ds.labels, labs[order])
        assert content_ids(ds) == [sha256_of(paths[i]) for i in order]
    split = make_split(source, seed=0)
    assert not split.single_pool and split.test == list(range(len(test_paths)))


def test_image_folder_train_test_class_mismatch(tmp_path: Path, digits40: tuple[np.ndarray, np.ndarray]) -> None:
    root = tmp_path.resolve() / "data"
    images, labels = digits40
    write_image_folder(root, images, labels, DIGIT_NAMES, split="train")
    write_image_folder(root, images, labels, DIGIT_NAMES[:9] + ("nine",), split="test")
    error = expect_error(DataError, lambda: load_dataset("imagefolder", root), str(root / "train"), str(root / "test"))
    assert "only in train/: digit9" in str(error) and "only in test/: nine" in str(error)


@pytest.mark.parametrize(
    ("kind", "fmt", "color", "channels", "pillow_mode"),
    [
        ("gray", "png", "auto", 1, "L"),
        ("gray", "png", "grayscale", 1, "L"),
        ("gray", "png", "rgb", 3, "RGB"),
        ("rgb", "jpg", "auto", 3, "RGB"),
        ("rgb", "jpeg", "rgb", 3, "RGB"),
        ("rgb", "jpg", "grayscale", 1, "L"),
        ("rgb", "png", "auto", 3, "RGB"),
    ],
)
def test_image_folder_color(tmp_path: Path, kind: str, fmt: str, color: str, channels: int, pillow_mode: str) -> None:
    rng = np.random.default_rng(1)
    c = 1 if kind == "gray" else 3
    # Smooth random images (JPEG keeps them close, though not exact; the expected values are Pillow's own
    # decoding of the written files).
    base = rng.integers(0, 256, size=(12, c, 3, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(base, 4, axis=2), 4, axis=3)  # (12, c, 12, 12)
    labels = np.arange(12) % 3
    root = tmp_path.resolve() / "imgs"
    paths = write_image_folder(root, images, labels, ("a", "b", "c"), fmt=fmt)
    upper = paths[0].with_suffix(paths[0].suffix.upper())  # extensions match case-insensitively
    paths[0] = paths[0].rename(upper)

    ds = load_dataset("imagefolder", root, color=color).train
    assert ds.images.shape == (12, channels, 12, 12)
    for row, i in enumerate(read_order(paths, root)):
        with Image.open(paths[i]) as im:
            expected = np.asarray(im.convert(pillow_mode))
        expected = expected[None] if channels == 1 else expected.transpose(2, 0, 1)
        np.testing.assert_array_equal(ds.images[row], expected)
    if fmt == "png" and channels == c:
        assert np.array_equal(ds.images, images[read_order(paths, root)])


@pytest.mark.parametrize(
    ("extra", "channels"), [("gray-palette", 1), ("color-palette", 3), ("rgb", 3), ("bilevel", 1)]
)
def test_image_folder_auto_color(
    digit_folder: tuple[Path, list[Path]], digits40: tuple[np.ndarray, np.ndarray], extra: str, channels: int
) -> None:
    """"auto" is grayscale only if every image is single-channel; one colour image makes it RGB."""
    root, paths = digit_folder
    images, _ = digits40
    gray = Image.fromarray(images[0, 0], mode="L")
    if extra == "gray-palette":
        odd = gray.convert("P")  # a palette whose used colours are all gray
    elif extra == "color-palette":
        odd = Image.merge("RGB", (gray, gray.point(lambda v: 255 - v), gray)).convert("P")
    elif extra == "rgb":
        odd = Image.merge("RGB", (gray, gray, gray.point(lambda v: v // 2)))
    else:
        odd = gray.convert("1")
    odd_path = root / "digit5" / "zz-extra.png"
    odd.save(odd_path)
    with Image.open(odd_path) as im:
        assert im.mode == {"gray-palette": "P", "color-palette": "P", "rgb": "RGB", "bilevel": "1"}[extra]

    ds = load_dataset("imagefolder", root).train
    assert ds.images.shape[1] == channels
    order = read_order([*paths, odd_path], root)
    row = order.index(len(paths))
    with Image.open(odd_path) as im:
        expected = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    np.testing.assert_array_equal(ds.images[row], expected[None] if channels == 1 else expected.transpose(2, 0, 1))
    # The gray digits repeat their one channel when the dataset is RGB.
    first_digit = order.index(0)
    assert all(np.array_equal(ds.images[first_digit, k], images[0, 0]) for k in range(channels))


def test_image_folder_image_size(digit_folder: tuple[Path, list[Path]]) -> None:
    root, paths = digit_folder
    odd = root / "digit2" / "big.png"
    Image.fromarray(np.arange(120, dtype=np.uint8).reshape(10, 12), mode="L").save(odd)  # 12x10, not 8x8
    paths = [*paths, odd]
    ds = load_dataset("imagefolder", root, image_size=16).train
    assert ds.images.shape == (len(paths), 1, 16, 16)
    for row, i in enumerate(read_order(paths, root)):
        with Image.open(paths[i]) as im:
            expected = np.asarray(im.resize((16, 16), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(ds.images[row, 0], expected)
    assert ds.content_ids == tuple(sha256_of(paths[i]) for i in read_order(paths, root))  # file bytes, not pixels


def test_image_folder_mixed_sizes(digit_folder: tuple[Path, list[Path]]) -> None:
    root, paths = digit_folder
    odd = root / "digit2" / "big.png"
    Image.new("L", (12, 10)).save(odd)
    first = paths[read_order(paths, root)[0]]
    error = expect_error(DataError, lambda: load_dataset("imagefolder", root), str(first), str(odd), "12x10")
    assert "--image-size" in str(error)


def _truncate_file(root: Path) -> Path:
    path = root / "digit3" / "00003.png"
    path.write_bytes(path.read_bytes()[:60])
    return path


def _garbage_png(root: Path) -> Path:
    path = root / "digit1" / "00001.png"
    path.write_bytes(b"this is not a png at all")
    return path


def _gif_named_png(root: Path) -> Path:
    path = root / "digit1" / "00001.png"
    Image.new("L", (8, 8)).save(path, format="GIF")  # only the PNG and JPEG decoders are allowed
    return path


def _sixteen_bit(root: Path) -> Path:
    path = root / "digit7" / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    return path


def _empty_class(root: Path) -> Path:
    for f in (root / "digit6").iterdir():
        f.unlink()
    return root / "digit6"


def _stray_in_class(root: Path) -> Path:
    path = root / "digit8" / "notes.txt"
    path.write_text("labels are folder names")
    return path


def _stray_at_root(root: Path) -> Path:
    path = root / "README.md"
    path.write_text("my data")
    return path


def _single_class(root: Path) -> Path:
    for name in DIGIT_NAMES[1:]:
        shutil.rmtree(root / name)
    return root


def _no_classes(root: Path) -> Path:
    for name in DIGIT_NAMES:
        shutil.rmtree(root / name)
    return root


def _train_without_test(root: Path) -> Path:
    (root / "train").mkdir()
    return root / "train"


def _extra_folder_next_to_splits(root: Path) -> Path:
    (root / "train").mkdir()
    (root / "test").mkdir()
    return root / "digit0"


def _root_is_file(root: Path) -> Path:
    shutil.rmtree(root)
    root.write_bytes(b"")
    return root


def _root_missing(root: Path) -> Path:
    shutil.rmtree(root)
    return root


@pytest.mark.parametrize(
    ("break_folder", "needle"),
    [
        (_truncate_file, "cannot decode"),
        (_garbage_png, "cannot decode"),
        (_gif_named_png, "cannot decode"),
        (_sixteen_bit, "8-bit"),
        (_empty_class, "holds no images"),
        (_stray_in_class, "not a PNG or JPEG"),
        (_stray_at_root, "only class folders"),
        (_single_class, "single class folder (digit0)"),
        (_no_classes, "no class folders"),
        (_train_without_test, "no test/ folder"),
        (_extra_folder_next_to_splits, "next to train/ and test/"),
        (_root_is_file, "is not a directory"),
        (_root_missing, "does not exist"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_image_folder_errors(
    digit_folder: tuple[Path, list[Path]], break_folder: Callable[[Path], Path], needle: str
) -> None:
    root, _ = digit_folder
    culprit = break_folder(root)
    expect_error(DataError, lambda: load_dataset("imagefolder", root), str(culprit), needle)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"image_size": 3}, "image_size"),
        ({"image_size": 2000}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"image_size": 16.0}, "image_size"),
        ({"color": "grey"}, "grey"),
    ],
)
@pytest.mark.parametrize("name", ["digits", "imagefolder", "npz"])
def test_image_options_validated(tmp_path: Path, name: str, kwargs: dict[str, Any], needle: str) -> None:
    expect_error(ConfigError, lambda: load_dataset(name, tmp_path, **kwargs), needle)


def test_image_options_ignored_by_builtin_and_refused_for_npz(tmp_path: Path) -> None:
    plain = load_dataset("digits")
    sized = load_dataset("digits", image_size=32, color="rgb")
    assert np.array_equal(plain.train.images, sized.train.images)
    expect_error(ConfigError, lambda: load_dataset("npz", tmp_path / "d.npz", image_size=16), "npz")
    expect_error(ConfigError, lambda: load_dataset("npz", tmp_path / "d.npz", color="rgb"), "npz")
    expect_error(ConfigError, lambda: load_dataset("imagefolder"), "imagefolder")
    expect_error(ConfigError, lambda: load_dataset("npz"), "npz")


# --------------------------------------------------------------------------------------------------
# .npz archives
# --------------------------------------------------------------------------------------------------


def canonical_images(channels: int, n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, C, 8, 6) images: digits for C=1, random colour for C=3 (H != W catches a transposition)."""
    if channels == 1:
        return np.ascontiguousarray(digits_uint8(n)[0][:, :, :, :6])
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 8, 6), dtype=np.uint8)


def as_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """Canonical (N, C, H, W) images stored in ``layout``."""
    if layout == "NHW":
        return x[:, 0]
    return x.transpose(0, 2, 3, 1) if layout == "NHWC" else x


def npz_arrays(channels: int = 1, layout: str = "NCHW", n_train: int = 30, n_test: int = 12) -> dict[str, Any]:
    x = canonical_images(channels, n_train + n_test)
    y = np.arange(n_train + n_test, dtype=np.int64) % 3
    return {
        "x_train": as_layout(x[:n_train], layout),
        "y_train": y[:n_train],
        "x_test": as_layout(x[n_train:], layout),
        "y_test": y[n_train:],
    }


@pytest.mark.parametrize("with_classes", [True, False], ids=["classes", "no-classes"])
@pytest.mark.parametrize(
    ("layout", "channels"), [("NHW", 1), ("NHWC", 1), ("NCHW", 1), ("NHWC", 3), ("NCHW", 3)]
)
def test_npz_round_trip(tmp_path: Path, layout: str, channels: int, with_classes: bool) -> None:
    x = canonical_images(channels, 42)
    arrays = npz_arrays(channels, layout)
    arrays["y_train"] = arrays["y_train"].astype(np.uint8)  # any integer dtype
    if with_classes:
        arrays["classes"] = np.array(["cat", "dog", "emu"])
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)

    source = load_dataset("npz", path)
    assert source.name == "npz" and source.root == str(path.resolve()) and source.test is not None
    assert source.classes == (("cat", "dog", "emu") if with_classes else ("0", "1", "2"))
    assert source.input_shape == (channels, 8, 6)
    for ds, expected, labels in ((source.train, x[:30], arrays["y_train"]), (source.test, x[30:], arrays["y_test"])):
        assert ds.images.flags.c_contiguous and ds.scale == 255.0 and ds.content_ids is None
        np.testing.assert_array_equal(ds.images, expected)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.labels.dtype == np.int64
        assert content_ids(ds) == [pixel_sha256(img) for img in expected] == [hash_pixels(img) for img in expected]


def test_npz_content_ids_independent_of_layout(tmp_path: Path) -> None:
    ids = []
    for layout in ("NHWC", "NCHW"):
        np.savez(tmp_path / f"{layout}.npz", **npz_arrays(3, layout))
        ids.append(content_ids(load_dataset("npz", tmp_path / f"{layout}.npz").train))
    assert ids[0] == ids[1]


@pytest.mark.parametrize(
    ("shape", "expected_chw"),
    [((4, 3, 32, 3), (3, 32, 3)), ((4, 1, 1, 1), (1, 1, 1)), ((4, 32, 32, 3), (3, 32, 32)), ((4, 3, 5, 7), (3, 5, 7))],
)
def test_npz_layout_rule(tmp_path: Path, shape: tuple[int, ...], expected_chw: tuple[int, int, int]) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    y = np.array([0, 1, 0, 1])
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    assert load_dataset("npz", tmp_path / "d.npz").input_shape == expected_chw


def _with(labels: np.ndarray, index: int, value: int) -> np.ndarray:
    out = labels.copy()
    out[index] = value
    return out


# (id, the keys to replace (None = drop) given the good arrays, what the message must name)
Changes = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray | None]]
NPZ_ERRORS: list[tuple[str, Changes, tuple[str, ...]]] = [
    ("missing-key", lambda a: {"y_test": None}, ("'y_test'",)),
    (
        "float-pixels",
        lambda a: {"x_train": a["x_train"].astype(np.float32) / 255},
        ("'x_train'", "float32", "uint8", "0..255"),
    ),
    ("int-pixels", lambda a: {"x_test": a["x_test"].astype(np.int64)}, ("'x_test'", "int64")),
    ("length-mismatch", lambda a: {"y_train": a["y_train"][:-1]}, ("'y_train'", "'x_train'", "29")),
    ("float-labels", lambda a: {"y_test": a["y_test"].astype(np.float64)}, ("'y_test'", "integer")),
    ("2d-labels", lambda a: {"y_train": a["y_train"][:, None]}, ("'y_train'", "1-D")),
    ("negative-label", lambda a: {"y_train": _with(a["y_train"], 4, -1)}, ("'y_train'", "-1")),
    (
        "label-out-of-range",
        lambda a: {"classes": np.array(["a", "b", "c"]), "y_test": _with(a["y_test"], 0, 3)},
        ("'y_test'", "label 3", "3 classes"),
    ),
    ("empty-class", lambda a: {"y_train": np.where(a["y_train"] == 1, 3, a["y_train"])}, ("class(es) 1", "'y_train'")),
    ("empty-named-class", lambda a: {"classes": np.array(["a", "b", "c", "d"])}, ("3 ('d')", "'y_train'")),
    (
        "one-class",
        lambda a: {"y_train": np.zeros_like(a["y_train"]), "y_test": np.zeros_like(a["y_test"])},
        ("single class",),
    ),
    (
        "shape-mismatch",
        lambda a: {"x_test": a["x_test"][:, :, :5]},
        ("'x_train'", "'x_test'", "1x8x6", "1x5x6"),
    ),
    ("no-channel-dim", lambda a: {"x_train": np.zeros((30, 8, 8, 2), np.uint8)}, ("'x_train'", "(30, 8, 8, 2)")),
    ("ambiguous-layout", lambda a: {"x_train": np.zeros((30, 3, 3, 3), np.uint8)}, ("'x_train'", "NCHW and as NHWC")),
    ("five-dims", lambda a: {"x_test": np.zeros((12, 1, 1, 8, 6), np.uint8)}, ("'x_test'", "(12, 1, 1, 8, 6)")),
    ("no-images", lambda a: {"x_test": a["x_test"][:0], "y_test": a["y_test"][:0]}, ("'x_test'", "no images")),
    ("unexpected-key", lambda a: {"x_val": np.zeros((2, 8, 6), np.uint8)}, ("'x_val'",)),
    ("classes-not-strings", lambda a: {"classes": np.array([0, 1, 2])}, ("'classes'",)),
    ("repeated-class-names", lambda a: {"classes": np.array(["a", "b", "a"])}, ("'classes'", "repeated")),
    ("object-array", lambda a: {"classes": np.array(["a", "b", 3], dtype=object)}, ("'classes'", "pickle")),
]


@pytest.mark.parametrize(("changes", "needles"), [e[1:] for e in NPZ_ERRORS], ids=[e[0] for e in NPZ_ERRORS])
def test_npz_errors(tmp_path: Path, changes: Changes, needles: tuple[str, ...]) -> None:
    arrays: dict[str, Any] = npz_arrays()
    for key, value in changes(arrays).items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    expect_error(DataError, lambda: load_dataset("npz", path), str(path.resolve()), *needles)


def test_npz_pickle_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    arrays: dict[str, Any] = npz_arrays()
    arrays["classes"] = np.array([_Evil(os.system, (f"touch {marker}",))], dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)
    expect_error(DataError, lambda: load_dataset("npz", path), str(path), "'classes'", "pickle")
    assert not marker.exists(), "the payload was executed"


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 8, 8), np.uint8))
    return buffer.getvalue()


def _corrupt_npz() -> bytes:
    buffer = io.BytesIO()
    arrays: dict[str, Any] = npz_arrays()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    # The central directory at the end survives (so it is still a zip); a member's bytes do not (bad CRC).
    return data[:100] + b"\x00" * 200 + data[300:]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"x_train,y_train\n1,2\n", "not a zip archive"),
        (_npy_bytes(), "single .npy array"),
        (_corrupt_npz(), "cannot read"),
        ("directory", "is a directory"),
        (None, "does not exist"),
    ],
    ids=["text", "npy", "corrupt-zip", "directory", "missing"],
)
def test_npz_not_an_npz(tmp_path: Path, content: bytes | str | None, needle: str) -> None:
    path = tmp_path.resolve() / "data.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "directory":
        path.mkdir()
    expect_error(DataError, lambda: load_dataset("npz", path), str(path), needle)


# --------------------------------------------------------------------------------------------------
# Content ids
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_content_ids_of_array_datasets(name: str) -> None:
    ds = load_dataset(name).train
    assert ds.content_ids is None
    ids = content_ids(ds)
    assert ids == [pixel_sha256(img) for img in ds.images] and len(set(ids)) > len(ids) // 2


def test_content_ids_validated() -> None:
    images, labels = np.zeros((2, 1, 2, 2), np.uint8), np.zeros(2, np.int64)
    good = [hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()]
    ds = ArrayDataset(images, labels, 255.0, good)  # type: ignore[arg-type]
    assert ds.content_ids == tuple(good) and content_ids(ds) == good
    for ids, needle in (((good[0],), "one id per image"), ((good[0], "ABC"), "'ABC'"), ("ab", "tuple")):
        expect_error(ConfigError, lambda ids=ids: ArrayDataset(images, labels, 255.0, ids), needle)  # type: ignore[misc]


@pytest.mark.parametrize("bad", [np.zeros((1, 4, 4), np.float32), np.zeros((4, 4), np.uint8)], ids=["float", "2-D"])
def test_hash_pixels_refuses_non_chw_uint8(bad: np.ndarray) -> None:
    expect_error(ConfigError, lambda: hash_pixels(bad), str(bad.shape))


def test_hash_file_missing(tmp_path: Path) -> None:
    expect_error(DataError, lambda: hash_file(tmp_path / "gone.png"), "gone.png")
