"""Image-classification datasets held in memory, the seeded split (split.json) and forget-set selection.

Every dataset is loaded into uint8 arrays of shape (N, C, H, W) plus int64 labels; conversion to float
tensors happens late (``to_tensors``) so a whole dataset costs one byte per pixel. Nothing here downloads:
files must already be on disk, and a missing or malformed file raises ``DataError`` naming it and the fix.

CIFAR files are Python pickles. Pickles can execute code, so they are read with ``_RestrictedUnpickler``,
which only resolves the handful of globals needed to rebuild numpy arrays and plain containers. The user's
own ``.npz`` archives are read with ``allow_pickle=False``, so an object array in one is refused.

Every sample has a content id (``content_ids``): the sha256 of the image file's bytes for image folders (a
device holding the file can name it without decoding it), else the sha256 of its uint8 (C, H, W) pixels.
The hash functions live in ``edge_qmul.content``, which the devices share (re-exported here).
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import io
import json
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_qmul.atomic import write_json
from edge_qmul.config import DATASETS
from edge_qmul.content import hash_bytes, is_sha256_hex
from edge_qmul.content import hash_file as hash_file
from edge_qmul.content import hash_pixels as hash_pixels
from edge_qmul.errors import ConfigError, DataError, ForgetRequestError

if TYPE_CHECKING:
    import torch
    from PIL import Image

COLORS: tuple[str, ...] = ("auto", "grayscale", "rgb")  # the ``color`` choices of ``load_dataset``
IMAGE_SIZE_RANGE: tuple[int, int] = (4, 1024)  # allowed ``image_size`` values, inclusive
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")  # matched case-insensitively
DEFAULT_ROOTS: dict[str, str] = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
SYNTHETIC_CLASSES: tuple[str, ...] = ("top-left blob", "bottom-right blob", "horizontal bar", "vertical bar")

SPLIT_FIX = "re-run `edge-qmul train --run DIR` to recreate split.json"
_FORGET_IDS_HINT = "forget ids must index training samples listed in split.json 'train'"


# --------------------------------------------------------------------------------------------------
# In-memory datasets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous
class ArrayDataset:
    """Images and labels in memory; ``images / scale`` lies in [0, 1]."""

    images: np.ndarray  # uint8, (N, C, H, W)
    labels: np.ndarray  # int64, (N,)
    scale: float  # 255.0 for 8-bit images, 16.0 for sklearn digits
    # One sha256 hex digest per sample (the image file's bytes for image folders); None = the pixel hashes,
    # computed on demand by ``content_ids``.
    content_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ConfigError(
                f"images must be a uint8 array (N, C, H, W), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int64 or self.labels.shape != (self.images.shape[0],):
            raise ConfigError(
                f"labels must be an int64 array of shape ({self.images.shape[0]},), got "
                f"{self.labels.dtype} {self.labels.shape}"
            )
        if not self.scale > 0:
            raise ConfigError(f"scale must be positive, got {self.scale}")
        if self.content_ids is not None:
            ids = self.content_ids
            fix = "pass one sha256 hex digest per image (hash_file / hash_pixels), or None for the pixel hashes"
            if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
                raise ConfigError(f"content_ids must be a tuple of sha256 hex strings, got {type(ids).__name__}", fix)
            if len(ids) != self.images.shape[0]:
                raise ConfigError(
                    f"content_ids must hold one id per image ({self.images.shape[0]}), got {len(ids)}", fix
                )
            bad = next((i for i in ids if not is_sha256_hex(i)), None)
            if bad is not None:
                raise ConfigError(f"content_ids must be 64-character lowercase sha256 hex digests, got {bad!r}", fix)
            object.__setattr__(self, "content_ids", tuple(ids))  # frozen: a list given by a caller becomes a tuple

    def __len__(self) -> int:
        return int(self.images.shape[0])


def content_ids(ds: ArrayDataset) -> list[str]:
    """One content id per sample: the stored ids (image files' sha256) if any, else ``hash_pixels`` of each."""
    if ds.content_ids is not None:
        return list(ds.content_ids)
    return [hash_pixels(image) for image in ds.images]


@dataclass(frozen=True, eq=False)
class DatasetSource:
    """A loaded dataset: the training file, the test file (None for single-pool datasets) and class names."""

    name: str
    root: str | None  # resolved absolute path, or None for embedded/generated datasets
    train: ArrayDataset  # the training file, or the single pool for digits/synthetic
    test: ArrayDataset | None  # the test file; None when the dataset is a single pool
    classes: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def single_pool(self) -> bool:
        return self.test is None

    def pool(self, which: str) -> ArrayDataset:
        """The array that split indices of kind ``which`` ("train", "val" or "test") point into.

        For single-pool datasets every split list indexes the one pool; otherwise "test" is the test file
        and "train"/"val" are the training file.
        """
        if which in ("train", "val"):
            return self.train
        if which == "test":
            return self.train if self.test is None else self.test
        raise ConfigError(f"unknown pool {which!r}; expected 'train', 'val' or 'test'")


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    synthetic_size: int = 600,
    seed: int = 0,
    image_size: int | None = None,
    color: str = "auto",
) -> DatasetSource:
    """Load dataset ``name`` from ``root`` (or its default location).

    ``root`` is a directory, except for "npz" where it is the ``.npz`` file. ``seed`` only affects
    "synthetic". ``image_size`` (resize to image_size x image_size) and ``color`` ("auto", "grayscale" or
    "rgb") apply to "imagefolder" (see ``_load_image_folder``); they are validated for every dataset,
    ignored by the built-in ones, and refused for "npz", whose arrays are loaded as stored.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}", f"choose one of: {', '.join(DATASETS)}")
    lo, hi = IMAGE_SIZE_RANGE
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or not lo <= image_size <= hi
    ):
        raise ConfigError(
            f"image_size must be an integer between {lo} and {hi}, got {image_size!r}",
            f"pass --image-size N with {lo} <= N <= {hi}, or leave it out to keep the images' own size",
        )
    if color not in COLORS:
        raise ConfigError(f"unknown color {color!r}", f"choose one of: {', '.join(COLORS)}")
    if key == "npz":
        if image_size is not None or color != "auto":
            raise ConfigError(
                "image_size and color apply to image folders, not to npz arrays (which load as stored)",
                "resize or convert the arrays before saving the .npz, or leave out --image-size / --color",
            )
        return _load_npz(_resolve_npz(root))
    if key == "imagefolder":
        return _load_image_folder(_resolve_root(key, root), image_size, color)
    if key == "digits":
        return _load_digits()
    if key == "synthetic":
        return _load_synthetic(synthetic_size, seed)

    directory = _resolve_root(key, root)
    if key in ("fashion-mnist", "mnist"):
        train, test = _load_idx_pair(directory, key)
        classes = FASHION_MNIST_CLASSES if key == "fashion-mnist" else DIGIT_CLASSES
        return DatasetSource(key, str(directory), train, test, classes)
    if key == "cifar10":
        return _load_cifar10(directory)
    return _load_cifar100(directory)


def _resolve_root(name: str, root: str | Path | None) -> Path:
    """The absolute dataset directory; it must exist."""
    if root is None:
        if name not in DEFAULT_ROOTS:
            raise ConfigError(
                f"dataset {name!r} has no default location",
                f"pass --data-root DIR pointing at the {name} files",
            )
        root = DEFAULT_ROOTS[name]
    directory = Path(root).expanduser().resolve()
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise DataError(f"dataset directory {directory} {what}", _missing_fix(name, directory))
    return directory


def _missing_fix(name: str, directory: Path) -> str:
    if name == "imagefolder":
        return f"point --data-root at a directory holding {_IMAGE_FOLDER_LAYOUT}"
    if name == "fashion-mnist":
        return (
            f"expected the Fashion-MNIST IDX files in {directory}; install with "
            "`apt-get install -y dataset-fashion-mnist` or pass --data-root"
        )
    if name == "mnist":
        return (
            f"put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            f"t10k-labels-idx1-ubyte (plain or .gz) in {directory}, or pass --data-root"
        )
    if name == "cifar10":
        return (
            f"extract the CIFAR-10 python version (cifar-10-python.tar.gz) so that {directory} or its "
            "cifar-10-batches-py subdirectory holds data_batch_1..5 and test_batch, or pass --data-root"
        )
    return (
        f"extract the CIFAR-100 python version (cifar-100-python.tar.gz) so that {directory} or its "
        "cifar-100-python subdirectory holds train and test, or pass --data-root"
    )


# --------------------------------------------------------------------------------------------------
# Embedded and generated datasets
# --------------------------------------------------------------------------------------------------


def _load_digits() -> DatasetSource:
    from sklearn.datasets import load_digits  # local import: sklearn is slow to import and rarely needed

    bunch = load_digits()
    images = np.asarray(bunch.data).reshape(-1, 1, 8, 8).astype(np.uint8)  # (1797, 1, 8, 8), 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    return DatasetSource("digits", None, ArrayDataset(images, labels, 16.0), None, DIGIT_CLASSES)


def _load_synthetic(size: int, seed: int) -> DatasetSource:
    """Four easily separable 8x8 patterns with position jitter and noise, reproducible from ``seed``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < len(SYNTHETIC_CLASSES):
        raise ConfigError(f"synthetic_size must be an integer >= {len(SYNTHETIC_CLASSES)}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    # Balanced classes in random order.
    labels = rng.permutation(np.arange(size, dtype=np.int64) % len(SYNTHETIC_CLASSES))  # (N,)
    canvas = rng.normal(40.0, 20.0, size=(size, 8, 8))  # dark noisy background
    shifts = rng.integers(0, 2, size=(size, 2))  # jitter so the net must learn a pattern, not a pixel
    brightness = rng.uniform(170.0, 230.0, size=size)
    for i in range(size):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        k = int(labels[i])
        if k == 0:
            canvas[i, dy : dy + 3, dx : dx + 3] += brightness[i]  # top-left blob
        elif k == 1:
            canvas[i, 5 - dy : 8 - dy, 5 - dx : 8 - dx] += brightness[i]  # bottom-right blob
        elif k == 2:
            canvas[i, 3 + dy : 5 + dy, :] += brightness[i]  # horizontal bar
        else:
            canvas[i, :, 3 + dx : 5 + dx] += brightness[i]  # vertical bar
    images = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    return DatasetSource("synthetic", None, ArrayDataset(images, labels, 255.0), None, SYNTHETIC_CLASSES)


# --------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"


def _load_idx_pair(directory: Path, name: str) -> tuple[ArrayDataset, ArrayDataset]:
    train = _load_idx_split(directory, name, "train")
    test = _load_idx_split(directory, name, "t10k")
    return train, test


def _load_idx_split(directory: Path, name: str, prefix: str) -> ArrayDataset:
    images_path = _find_idx_file(directory, name, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx_file(directory, name, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)  # (N, 28, 28)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)  # (N,)
    fix = _missing_fix(name, directory)
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"{images_path} holds {images.shape[1]}x{images.shape[2]} images; {name} images are 28x28", fix
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels", fix
        )
    if labels.size and int(labels.max()) >= 10:
        raise DataError(f"{labels_path} contains label {int(labels.max())}; {name} labels are 0..9", fix)
    return ArrayDataset(images[:, None].copy(), labels.astype(np.int64), 255.0)


def _find_idx_file(directory: Path, name: str, base: str) -> Path:
    """``base`` or ``base.gz`` in ``directory`` (the plain file wins if both exist)."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"expected {base}[.gz] in {directory}", _missing_fix(name, directory))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file of uint8 values, validating magic number, dimensions and length."""
    fix = f"replace {path.name} with an intact copy of the original file"
    try:
        raw = path.read_bytes()
        # Sniff the content rather than trusting the suffix: some mirrors ship gunzipped files as .gz.
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}", fix) from exc

    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{path} is truncated: {len(raw)} bytes, shorter than the {header_len}-byte IDX header", fix
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"{path} has IDX magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"(uint8, {ndim}-D); it is not the right IDX file",
            fix,
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if dims[0] < 1 or any(d < 1 for d in dims[1:]):
        raise DataError(f"{path} declares invalid dimensions {dims}", fix)
    expected = header_len + int(np.prod(dims))
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(
            f"{path} is {state}: {len(raw)} bytes, expected {expected} for dimensions {dims}", fix
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python-version pickle batches, read with a restricted unpickler)
# --------------------------------------------------------------------------------------------------


def _numpy_attr(submodule: str, attr: str) -> Callable[[], Any]:
    """Lazily resolve ``numpy._core.<submodule>.<attr>`` (numpy 2) or ``numpy.core...`` (numpy 1)."""

    def resolve() -> Any:
        try:
            module = importlib.import_module(f"numpy._core.{submodule}")
        except ImportError:
            module = importlib.import_module(f"numpy.core.{submodule}")
        return getattr(module, attr)

    return resolve


def _builtin(obj: Any) -> Callable[[], Any]:
    return lambda: obj


# The only globals a CIFAR pickle may reference. Keys are (module, name) exactly as written in the pickle;
# both the numpy 1 ("numpy.core") and numpy 2 ("numpy._core") spellings appear in the wild, and protocol-2
# pickles written by Python 3 name builtins via the Python 2 module "__builtin__".
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): _builtin(np.ndarray),
    ("numpy", "dtype"): _builtin(np.dtype),
    ("_codecs", "encode"): _builtin(codecs.encode),  # protocol-2 pickles encode bytes with it
}
for _prefix in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_prefix}.multiarray", "_reconstruct")] = _numpy_attr("multiarray", "_reconstruct")
    _ALLOWED_GLOBALS[(f"{_prefix}.multiarray", "scalar")] = _numpy_attr("multiarray", "scalar")
    _ALLOWED_GLOBALS[(f"{_prefix}.numeric", "_frombuffer")] = _numpy_attr("numeric", "_frombuffer")
for _module in ("builtins", "__builtin__"):
    for _container in (bytes, bytearray, list, dict, tuple, set, frozenset):
        _ALLOWED_GLOBALS[(_module, _container.__name__)] = _builtin(_container)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside ``_ALLOWED_GLOBALS`` (so no code can run)."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise DataError(
                f"refusing to unpickle {self._path}: it references the forbidden global '{module}.{name}' "
                "(only numpy arrays and plain containers are allowed)",
                "use the original CIFAR python-version files; never load pickles from an untrusted source",
            )
        return resolve()


def _unpickle_dict(path: Path, fix: str) -> dict[bytes, Any]:
    """Safely unpickle ``path`` and return its dict, with str keys normalised to bytes."""
    try:
        with open(path, "rb") as fh:
            obj = _RestrictedUnpickler(fh, path).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}", fix) from exc
    except Exception as exc:  # a corrupt pickle can fail in many ways; all of them mean "bad file"
        raise DataError(f"{path} is not a valid CIFAR pickle: {type(exc).__name__}: {exc}", fix) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a dict", fix)
    # The originals (pickled by Python 2) have bytes keys; re-pickled copies may have str keys.
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _cifar_dir(root: Path, subdir: str, required: Sequence[str], name: str) -> Path:
    """``root`` if it holds all ``required`` files, else ``root/subdir`` if that does."""
    for directory in (root, root / subdir):
        if all((directory / f).is_file() for f in required):
            return directory
    # Report against whichever directory looks like the intended one.
    directory = root / subdir if (root / subdir).is_dir() else root
    missing = next(f for f in required if not (directory / f).is_file())
    raise DataError(
        f"expected {missing} in {directory} (or in its {subdir} subdirectory)", _missing_fix(name, root)
    )


def _cifar_batch(path: Path, label_key: bytes, num_classes: int, fix: str) -> ArrayDataset:
    batch = _unpickle_dict(path, fix)
    for key in (b"data", label_key):
        if key not in batch:
            raise DataError(f"{path} has no {key.decode()!r} entry (keys: {sorted(map(repr, batch))})", fix)
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}", fix)
    try:
        labels = np.asarray(batch[label_key])
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {label_key.decode()!r} is not a list of integers", fix) from exc
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise DataError(
            f"{path}: {label_key.decode()!r} must be {len(data)} integers, got {labels.dtype} {labels.shape}",
            fix,
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{path}: labels must lie in 0..{num_classes - 1}, found "
            f"{int(labels.min())}..{int(labels.max())}",
            fix,
        )
    images = data.reshape(-1, 3, 32, 32).copy()  # rows are 1024 R, then G, then B values
    return ArrayDataset(images, labels.astype(np.int64), 255.0)


def _concat(parts: Sequence[ArrayDataset]) -> ArrayDataset:
    ids = [p.content_ids for p in parts]
    joined = None if any(i is None for i in ids) else tuple(x for i in ids for x in i or ())
    return ArrayDataset(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        parts[0].scale,
        joined,
    )


def _cifar_names(path: Path, key: bytes, count: int, fix: str) -> tuple[str, ...] | None:
    """Class names from an optional meta file; None if the file is absent."""
    if not path.is_file():
        return None
    names = _unpickle_dict(path, fix).get(key)
    if (
        not isinstance(names, list)
        or len(names) != count
        or not all(isinstance(n, bytes | str) for n in names)
    ):
        raise DataError(f"{path}: {key.decode()!r} must be a list of {count} names", fix)
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _load_cifar10(root: Path) -> DatasetSource:
    required = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    directory = _cifar_dir(root, "cifar-10-batches-py", required, "cifar10")
    fix = _missing_fix("cifar10", root)
    train = _concat([_cifar_batch(directory / f, b"labels", 10, fix) for f in required[:5]])
    test = _cifar_batch(directory / "test_batch", b"labels", 10, fix)
    classes = _cifar_names(directory / "batches.meta", b"label_names", 10, fix) or CIFAR10_CLASSES
    return DatasetSource("cifar10", str(root), train, test, classes)


def _load_cifar100(root: Path) -> DatasetSource:
    directory = _cifar_dir(root, "cifar-100-python", ["train", "test"], "cifar100")
    fix = _missing_fix("cifar100", root)
    train = _cifar_batch(directory / "train", b"fine_labels", 100, fix)
    test = _cifar_batch(directory / "test", b"fine_labels", 100, fix)
    classes = _cifar_names(directory / "meta", b"fine_label_names", 100, fix)
    return DatasetSource("cifar100", str(root), train, test, classes or tuple(str(i) for i in range(100)))


# --------------------------------------------------------------------------------------------------
# Image folders (class sub-folders of PNG / JPEG files, decoded with Pillow)
# --------------------------------------------------------------------------------------------------

_IMAGE_FOLDER_LAYOUT = (
    "one sub-folder per class of .png/.jpg/.jpeg files (or train/ and test/ folders that each hold the "
    "same class sub-folders)"
)
_IMAGE_FORMATS = ("PNG", "JPEG")  # the only Pillow decoders an image folder may use
# Pillow modes of 8-bit images; 16-bit ("I;16"), 32-bit ("I") and float ("F") images are refused rather
# than clipped to 0..255 by Pillow's conversion.
_GRAY_MODES = ("1", "L", "LA")
_PALETTE_MODES = ("P", "PA")
_COLOR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


@dataclass(frozen=True)
class ImageFile:
    path: Path
    pool: str  # "train" or "test"
    label: int


def _load_image_folder(root: Path, image_size: int | None, color: str) -> DatasetSource:
    """Read an image folder into uint8 arrays; the file hashes become the samples' content ids.

    Layout: ``root/<class>/*.png|jpg|jpeg`` is one pool, which ``make_split`` carves into train/val/test;
    ``root/train/<class>/...`` plus ``root/test/<class>/...`` (same class names) are the two files. Class
    names are the sorted sub-folder names and a label is its class's index; a class folder's own
    sub-folders are read as part of that class. Files are read in order of relative path; hidden files
    and folders (names starting with ".") are ignored, and any other file that is not .png/.jpg/.jpeg
    (case-insensitive) is an error.

    Pixels: EXIF orientation is applied (images load the way viewers show them) and alpha is dropped.
    ``color`` "grayscale" gives C=1 (Pillow mode L, luma 0.299 R + 0.587 G + 0.114 B), "rgb" gives C=3,
    "auto" gives C=1 if every image is single-channel (mode 1 or L, with or without alpha, or a palette
    whose used colours are all gray) and C=3 otherwise (gray images then repeat their channel).
    ``image_size`` resizes every image to image_size x image_size with Pillow's bilinear filter (which
    widens its support when shrinking, so downscaling averages rather than aliases; the aspect ratio is
    not kept). Without it all images must have one size. Values stay uint8 with scale 255.
    """
    classes, files = image_folder_files(root)
    arrays, ids = _decode_images(files, image_size, color)
    datasets: dict[str, ArrayDataset] = {}
    for pool in dict.fromkeys(f.pool for f in files):  # "train", then "test" for a train/ + test/ layout
        picked = [i for i, f in enumerate(files) if f.pool == pool]
        datasets[pool] = ArrayDataset(
            np.stack([arrays[i] for i in picked]),  # (N, C, H, W)
            np.array([files[i].label for i in picked], dtype=np.int64),  # (N,)
            255.0,
            tuple(ids[i] for i in picked),
        )
    return DatasetSource("imagefolder", str(root), datasets["train"], datasets.get("test"), classes)


def image_folder_files(root: str | Path) -> tuple[tuple[str, ...], list[ImageFile]]:
    """The class names and the image files of an image folder, in the order ``_load_image_folder`` reads them.

    No file is opened: a device indexes its own folder with this and ``content.hash_file``, and gets the ids
    and labels the server's loader gives the same files. The layout rules are in ``_load_image_folder``.
    """
    root = _resolve_root("imagefolder", root)
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        present, missing = ("train", "test") if train_dir.is_dir() else ("test", "train")
        raise DataError(
            f"{root} has a {present}/ folder but no {missing}/ folder",
            f"add {root / missing} with the same class folders as {root / present}, or put the class "
            f"folders directly in {root} for one pool that edge-qmul splits with the seed",
        )
    if train_dir.is_dir():
        _class_folders(root, allowed={"train", "test"})  # refuses stray files next to train/ and test/
        classes = _class_folders(train_dir)
        test_classes = _class_folders(test_dir)
        if classes != test_classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            diff = "; ".join(
                f"only in {where}/: {', '.join(names)}"
                for where, names in (("train", only_train), ("test", only_test))
                if names
            )
            raise DataError(
                f"{train_dir} and {test_dir} have different class folders ({diff})",
                "give train/ and test/ the same class sub-folders (an empty class folder is not allowed)",
            )
        pools = {"train": train_dir, "test": test_dir}
    else:
        classes = _class_folders(root)
        pools = {"train": root}

    files = [
        ImageFile(path, pool, label)
        for pool, directory in pools.items()
        for label, name in enumerate(classes)
        for path in _image_files(directory / name, root)
    ]
    return tuple(classes), files


def _class_folders(directory: Path, allowed: set[str] | None = None) -> list[str]:
    """Sorted non-hidden sub-folder names of ``directory`` (or check that only ``allowed`` ones exist)."""
    try:
        entries = sorted(e for e in directory.iterdir() if not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot list {directory}: {exc}", "check that the folder is readable") from exc
    for entry in entries:
        if not entry.is_dir():
            raise DataError(
                f"{entry} is a file where only class folders belong",
                f"move it into a class folder or out of {directory}; {directory} must hold {_IMAGE_FOLDER_LAYOUT}",
            )
        if allowed is not None and entry.name not in allowed:
            raise DataError(
                f"{entry} sits next to train/ and test/, so it is not read",
                f"move the folder into {directory / 'train'} and {directory / 'test'}, or remove it",
            )
    names = [e.name for e in entries]
    if allowed is not None:
        return names
    if not names:
        raise DataError(f"{directory} has no class folders", f"{directory} must hold {_IMAGE_FOLDER_LAYOUT}")
    if len(names) < 2:
        raise DataError(
            f"{directory} has a single class folder ({names[0]}); a classifier needs at least 2 classes",
            f"add a folder of images for each other class to {directory}",
        )
    return names


def _image_files(class_dir: Path, root: Path) -> list[Path]:
    """The image files under ``class_dir`` (recursively), sorted by path relative to ``root``."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=_raise_walk_error, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # prune hidden folders
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = Path(dirpath, filename)
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(
                    f"{path} is not a PNG or JPEG image (image folders hold only "
                    f"{', '.join(IMAGE_EXTENSIONS)} files)",
                    f"remove it or move it out of {root}, or convert it to PNG; hidden files are ignored",
                )
            found.append(path)
    if not found:
        raise DataError(
            f"class folder {class_dir} holds no images",
            "add .png/.jpg/.jpeg files to it, or remove the folder (and the class)",
        )
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _raise_walk_error(exc: OSError) -> None:
    raise DataError(f"cannot list {exc.filename}: {exc.strerror}", "check that the folder is readable") from exc


def _decode_images(
    files: Sequence[ImageFile], image_size: int | None, color: str
) -> tuple[list[np.ndarray], list[str]]:
    """Decode every file to a uint8 (C, H, W) array with one C for all; also return the files' sha256."""
    arrays: list[np.ndarray] = []
    ids: list[str] = []
    first: tuple[Path, tuple[int, int]] | None = None  # the size every image must share without image_size
    for f in files:
        try:
            raw = f.path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {f.path}: {exc}", "check that the file is readable") from exc
        image = _open_image(f.path, raw)
        if image_size is None:
            if first is None:
                first = (f.path, image.size)
            elif image.size != first[1]:
                (w0, h0), (w1, h1) = first[1], image.size
                raise DataError(
                    f"images differ in size: {first[0]} is {w0}x{h0} pixels but {f.path} is {w1}x{h1}",
                    "pass --image-size N (image_size=N) to resize every image to NxN, or resize the files "
                    "to one size",
                )
        gray = color == "grayscale" or (color == "auto" and _is_single_channel(image))
        image = image.convert("L" if gray else "RGB")
        if image_size is not None:
            from PIL import Image

            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
        arrays.append(pixels[None] if gray else pixels.transpose(2, 0, 1))  # (C, H, W)
        ids.append(hash_bytes(raw))
    if color == "auto" and any(a.shape[0] == 3 for a in arrays):
        # One colour image makes the dataset RGB; a gray image's RGB form repeats its channel (as Pillow's
        # L -> RGB conversion does).
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    return arrays, ids


def _open_image(path: Path, raw: bytes) -> Image.Image:
    """Decode ``raw`` (the bytes of ``path``) as PNG or JPEG, fully, with EXIF orientation applied."""
    from PIL import Image, ImageOps, UnidentifiedImageError  # local import: only image folders need Pillow

    fix = "replace the file with an intact PNG or JPEG (re-export it), or delete it"
    try:
        with Image.open(io.BytesIO(raw), formats=_IMAGE_FORMATS) as opened:
            opened.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(opened)  # a new image, independent of the closed file
    except UnidentifiedImageError as exc:  # its message names the in-memory buffer, not the file
        raise DataError(f"cannot decode {path}: its content is not a PNG or JPEG image", fix) from exc
    except Exception as exc:  # a corrupt image fails in many ways (OSError, SyntaxError, ...): all mean "bad file"
        raise DataError(f"cannot decode {path} as a PNG or JPEG image: {type(exc).__name__}: {exc}", fix) from exc
    if image.mode not in _GRAY_MODES + _PALETTE_MODES + _COLOR_MODES:
        raise DataError(
            f"{path} has Pillow mode {image.mode!r} (16-bit, 32-bit or float pixels); image folders hold "
            "8-bit images",
            "save it as an 8-bit grayscale or RGB PNG/JPEG (scale 16-bit values down by 257)",
        )
    return image


def _is_single_channel(image: Image.Image) -> bool:
    """Gray (mode 1 / L / LA), or a palette image whose used colours are all gray."""
    if image.mode in _GRAY_MODES:
        return True
    if image.mode in _PALETTE_MODES:
        rgb = np.asarray(image.convert("RGB"))  # (H, W, 3)
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


# --------------------------------------------------------------------------------------------------
# NumPy archives (.npz with x_train, y_train, x_test, y_test and optional classes)
# --------------------------------------------------------------------------------------------------

NPZ_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")
_NPZ_OPTIONAL: tuple[str, ...] = ("classes",)
_NPZ_FIX = (
    "save it with np.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=..., classes=np.array(names)): "
    "uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3, and integer labels 0..K-1"
)
_NPY_MAGIC = b"\x93NUMPY"


def _resolve_npz(root: str | Path | None) -> Path:
    if root is None:
        raise ConfigError("dataset 'npz' needs the path of the .npz file", "pass --data-root FILE.npz")
    path = Path(root).expanduser().resolve()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"npz file {path} {what}", f"pass --data-root FILE.npz; {_NPZ_FIX}")
    return path


def _load_npz(path: Path) -> DatasetSource:
    """Load an ``.npz`` archive (never unpickling anything) and check its arrays.

    Image layout, decided per array from its shape: (N, H, W) is grayscale; for (N, a, b, c), NHWC if
    c is 1 or 3 and a is not, else NCHW if a is 1 or 3 (so (N, 3, 32, 3) is NCHW); (N, 3, 3, 3), which
    both readings fit with the same image shape, is refused. Labels are 0..K-1 with K = len(classes)
    when ``classes`` is given, else K = the largest label + 1 (classes are then named "0".."K-1"); every
    class needs a training sample. Content ids are the pixel hashes of the (C, H, W) images.
    """
    try:
        is_zip = zipfile.is_zipfile(path)
        with open(path, "rb") as fh:
            head = fh.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}", _NPZ_FIX) from exc
    if not is_zip:
        what = "a single .npy array" if head == _NPY_MAGIC else "not a zip archive"
        raise DataError(f"{path} is not a valid .npz file ({what})", _NPZ_FIX)

    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [k for k in NPZ_KEYS if k not in keys]
            if missing:
                raise DataError(
                    f"{path} has no {', '.join(repr(k) for k in missing)} (keys: {', '.join(sorted(keys)) or 'none'})",
                    _NPZ_FIX,
                )
            unexpected = sorted(keys - set(NPZ_KEYS) - set(_NPZ_OPTIONAL))
            if unexpected:
                raise DataError(
                    f"{path} has unexpected key(s) {', '.join(repr(k) for k in unexpected)}; only "
                    f"{', '.join(NPZ_KEYS + _NPZ_OPTIONAL)} are read",
                    "remove them (the validation set is carved out of x_train with the seed)",
                )
            for key in sorted(keys):
                arrays[key] = _npz_member(npz, path, key)
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"cannot read {path}: {type(exc).__name__}: {exc}", f"the archive is damaged: re-create it; {_NPZ_FIX}"
        ) from exc

    x_train = _npz_images(path, "x_train", arrays["x_train"])
    x_test = _npz_images(path, "x_test", arrays["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{path}: 'x_train' images are {_chw(x_train)} but 'x_test' images are {_chw(x_test)} (C x H x W)",
            "store train and test images with the same size and number of channels",
        )
    y_train = _npz_labels(path, "y_train", arrays["y_train"], "x_train", len(x_train))
    y_test = _npz_labels(path, "y_test", arrays["y_test"], "x_test", len(x_test))
    if "classes" in arrays:
        classes = _npz_classes(path, arrays["classes"])
        for key, labels in (("y_train", y_train), ("y_test", y_test)):
            if int(labels.max()) >= len(classes):
                raise DataError(
                    f"{path}: {key!r} has label {int(labels.max())} but 'classes' names {len(classes)} "
                    f"classes (labels 0..{len(classes) - 1})",
                    "fix the labels, or list every class in 'classes' (in label order)",
                )
    else:
        k = int(max(y_train.max(), y_test.max())) + 1
        if k < 2:
            raise DataError(
                f"{path}: every label is 0, so there is a single class; a classifier needs at least 2",
                "store the samples of at least two classes, labelled 0..K-1",
            )
        classes = tuple(str(i) for i in range(k))
    counts = np.bincount(y_train, minlength=len(classes))  # (K,)
    empty = [i for i in range(len(classes)) if counts[i] == 0]
    if empty:
        names = ", ".join(f"{i} ({classes[i]!r})" for i in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise DataError(
            f"{path}: class(es) {names} have no sample in 'y_train'; labels must be 0..K-1 with every class "
            "present in training",
            "relabel the classes to consecutive integers 0..K-1 or add training samples of the empty classes",
        )
    return DatasetSource(
        "npz", str(path), ArrayDataset(x_train, y_train, 255.0), ArrayDataset(x_test, y_test, 255.0), classes
    )


def _npz_member(npz: Any, path: Path, key: str) -> np.ndarray:
    """``npz[key]`` as an array; object arrays (which only a pickle can hold) are refused."""
    try:
        value = npz[key]
    except ValueError as exc:
        if "pickle" not in str(exc).lower() and "object arrays" not in str(exc).lower():
            raise
        raise DataError(
            f"{path}: {key!r} is an object array, which needs pickle to load; pickles are refused because "
            "loading one can run code",
            f"store {key!r} as a plain numeric array (class names as np.array(names, dtype=str))",
        ) from exc
    if not isinstance(value, np.ndarray):  # a zip member that is not a .npy file comes back as bytes
        raise DataError(f"{path}: {key!r} is not a numpy array (.npy member)", _NPZ_FIX)
    return value


def _chw(x: np.ndarray) -> str:
    return "x".join(str(d) for d in x.shape[1:])


def _npz_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """``x`` as a contiguous uint8 (N, C, H, W) array; the layout rule is in ``_load_npz``."""
    if x.dtype != np.uint8:
        if x.dtype.kind == "f":
            fix = (
                f"convert {key!r} to uint8 0..255: (x * 255).round().astype(np.uint8) for values in [0, 1], "
                "x.round().astype(np.uint8) for values already in 0..255"
            )
        else:
            fix = f"convert {key!r} to uint8 0..255 (x.astype(np.uint8) once its values lie in 0..255)"
        raise DataError(f"{path}: {key!r} has dtype {x.dtype}; images must be uint8 (0..255)", fix)
    layouts = "(N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3"
    if x.ndim == 3:
        out = x[:, None]  # (N, 1, H, W)
    elif x.ndim == 4:
        a, b, c = x.shape[1:]
        if c in (1, 3) and a not in (1, 3):
            out = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        elif a in (1, 3):
            if a == b == c == 3:
                raise DataError(
                    f"{path}: {key!r} has shape {x.shape}, which reads as NCHW and as NHWC alike",
                    "the images are too small to tell channels from pixels: store larger images, or "
                    "grayscale ones as (N, H, W)",
                )
            out = x
        else:
            raise DataError(
                f"{path}: {key!r} has shape {x.shape} with no channel dimension of size 1 or 3",
                f"store the images as {layouts}",
            )
    else:
        raise DataError(f"{path}: {key!r} has shape {x.shape}; images must be {layouts}", _NPZ_FIX)
    if out.shape[0] == 0 or 0 in out.shape[2:]:
        raise DataError(f"{path}: {key!r} holds no images (shape {x.shape})", _NPZ_FIX)
    return np.ascontiguousarray(out)


def _npz_labels(path: Path, key: str, y: np.ndarray, images_key: str, n: int) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(
            f"{path}: {key!r} must be a 1-D integer array, got {y.dtype} {y.shape}",
            f"store {key!r} as integers 0..K-1, one per image: y.astype(np.int64)",
        )
    if len(y) != n:
        raise DataError(
            f"{path}: {key!r} has {len(y)} labels but {images_key!r} has {n} images",
            "store exactly one label per image",
        )
    if int(y.min()) < 0:
        raise DataError(f"{path}: {key!r} has negative label {int(y.min())}", "labels must be 0..K-1")
    if int(y.max()) > np.iinfo(np.int64).max:
        raise DataError(f"{path}: {key!r} has label {int(y.max())}, too large", "labels must be 0..K-1")
    return y.astype(np.int64)


def _npz_classes(path: Path, names: np.ndarray) -> tuple[str, ...]:
    fix = "store 'classes' as a 1-D string array of distinct names in label order: np.array(names, dtype=str)"
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: 'classes' must be a 1-D string array, got {names.dtype} {names.shape}", fix)
    classes = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names.tolist())
    if len(classes) < 2:
        raise DataError(f"{path}: 'classes' names {len(classes)} class(es); a classifier needs at least 2", fix)
    if len(set(classes)) != len(classes) or not all(classes):
        raise DataError(f"{path}: 'classes' has empty or repeated names", fix)
    return classes


# --------------------------------------------------------------------------------------------------
# Split (split.json)
# --------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Seeded partition of a dataset into train/val/test index lists, plus the current forget set.

    For two-file datasets train and val index the training file and test indexes the test file; for
    single-pool datasets all three index the one pool. The order of ``train`` is meaningful. ``forget`` is
    filled from the run's forget ledger when the split is loaded (``pipeline.load_run_data``); it is never
    written to the split file, so the forget set has one home, the ledger.
    """

    dataset: str
    root: str | None
    seed: int
    train: list[int]
    val: list[int]
    test: list[int]
    forget: list[int] = field(default_factory=list)  # subset of train, sorted
    single_pool: bool = False

    def retain(self) -> list[int]:
        """Training indices not being forgotten, in ``train`` order."""
        forget = set(self.forget)
        return [i for i in self.train if i not in forget]

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "root": self.root,
            "seed": self.seed,
            "single_pool": self.single_pool,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], source_path: str = "the split file") -> Split:
        """Build a Split from parsed JSON, checking keys, types and consistency. A ``forget`` list (written by
        versions before the ledger held the forget set alone) is ignored: the ledger is the forget set."""

        def bad(problem: str) -> DataError:
            return DataError(f"{source_path}: {problem}", SPLIT_FIX)

        if not isinstance(d, dict):
            raise bad(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("dataset", "root", "seed", "train", "val", "test") if k not in d]
        if missing:
            raise bad(f"missing key(s) {', '.join(missing)}")
        if not isinstance(d["dataset"], str):
            raise bad("'dataset' must be a string")
        if d["root"] is not None and not isinstance(d["root"], str):
            raise bad("'root' must be a string or null")
        if isinstance(d["seed"], bool) or not isinstance(d["seed"], int):
            raise bad("'seed' must be an integer")
        single_pool = d.get("single_pool", False)
        if not isinstance(single_pool, bool):
            raise bad("'single_pool' must be true or false")

        lists: dict[str, list[int]] = {}
        for key in ("train", "val", "test"):
            value = d[key]
            if not isinstance(value, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
            ):
                raise bad(f"'{key}' must be a list of non-negative integers")
            if len(set(value)) != len(value):
                raise bad(f"'{key}' contains duplicate indices")
            lists[key] = value

        train = set(lists["train"])
        if train & set(lists["val"]):
            raise bad("'train' and 'val' overlap")
        if single_pool and (train | set(lists["val"])) & set(lists["test"]):
            raise bad("'test' overlaps 'train' or 'val' in a single-pool split")
        return cls(
            d["dataset"],
            d["root"],
            d["seed"],
            lists["train"],
            lists["val"],
            lists["test"],
            [],
            single_pool,
        )

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"split file {path} does not exist", SPLIT_FIX)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read split file {path}: {exc}", SPLIT_FIX) from exc
        return cls.from_json(d, str(path))


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
        raise ConfigError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def make_split(
    source: DatasetSource, seed: int, *, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> Split:
    """Seeded split. Two-file datasets: test = the whole test file; single pool: carve out test too.

    ``test_fraction`` only applies to single-pool datasets. Val and test lists are sorted; train is in
    seeded shuffled order, which downstream metrics rely on.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    rng = np.random.default_rng(seed)
    n = len(source.train)
    perm = rng.permutation(n).tolist()

    n_val = max(1, round(val_fraction * n))
    if source.test is None:
        n_test = max(1, round(test_fraction * n))
        if n - n_val - n_test < 1:
            raise ConfigError(
                f"val_fraction {val_fraction} + test_fraction {test_fraction} leave no training "
                f"samples out of {n}"
            )
        test = sorted(perm[:n_test])
        val = sorted(perm[n_test : n_test + n_val])
        train = perm[n_test + n_val :]
    else:
        if n - n_val < 1:
            raise ConfigError(f"val_fraction {val_fraction} leaves no training samples out of {n}")
        test = list(range(len(source.test)))
        val = sorted(perm[:n_val])
        train = perm[n_val:]
    return Split(source.name, source.root, seed, train, val, test, [], source.test is None)


# --------------------------------------------------------------------------------------------------
# Forget-set selection
# --------------------------------------------------------------------------------------------------


def select_forget(
    split: Split,
    labels: np.ndarray,
    *,
    fraction: float | None = None,
    count: int | None = None,
    klass: int | None = None,
    ids: Sequence[int] | None = None,
    seed: int = 0,
    pool_size: int | None = None,
) -> list[int]:
    """Choose training indices to forget, by exactly one of fraction, count, class or explicit ids.

    ``labels`` are the training-file labels; ``pool_size`` (default ``len(labels)``) bounds valid ids.
    Malformed arguments raise ConfigError; selections the split cannot satisfy raise ForgetRequestError.
    Returns a sorted, duplicate-free list.
    """
    given = [
        name
        for name, value in (("fraction", fraction), ("count", count), ("klass", klass), ("ids", ids))
        if value is not None
    ]
    if len(given) != 1:
        raise ConfigError(
            f"give exactly one of fraction, count, klass or ids (got {', '.join(given) or 'none'})"
        )
    train = list(split.train)
    if not train:
        raise ForgetRequestError("the split has no training samples to forget", SPLIT_FIX)
    rng = np.random.default_rng(seed)

    if fraction is not None:
        fraction = _check_fraction("fraction", fraction)
        k = round(fraction * len(train))
        if k < 1:
            raise ForgetRequestError(
                f"fraction {fraction} of {len(train)} training samples selects nothing",
                "use a larger fraction or --count",
            )
        return sorted(int(train[i]) for i in rng.choice(len(train), size=k, replace=False))

    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
            raise ConfigError(f"count must be a positive integer, got {count!r}")
        if count > len(train):
            raise ForgetRequestError(
                f"cannot forget {count} samples: the split has only {len(train)} training samples",
                f"use a count between 1 and {len(train)}",
            )
        return sorted(int(train[i]) for i in rng.choice(len(train), size=int(count), replace=False))

    labels = np.asarray(labels)
    if klass is not None:
        if isinstance(klass, bool) or not isinstance(klass, int | np.integer):
            raise ConfigError(f"class must be an integer, got {klass!r}")
        if labels.ndim != 1 or len(labels) <= max(train):
            raise ConfigError(
                f"labels must be the 1-D training-file labels (length > {max(train)}), "
                f"got shape {labels.shape}"
            )
        top = int(labels.max()) if labels.size else -1
        if not 0 <= klass <= top:
            raise ForgetRequestError(f"class {klass} is out of range", f"choose a class between 0 and {top}")
        train_arr = np.asarray(train, dtype=np.int64)  # (n_train,)
        chosen = sorted(int(i) for i in train_arr[labels[train_arr] == klass])
        if not chosen:
            raise ForgetRequestError(
                f"class {klass} has no samples in split.json 'train'",
                "choose a class that occurs in the training set",
            )
        return chosen

    assert ids is not None  # exactly one option is set, and it is not one of the above
    return _validate_ids(split, ids, len(labels) if pool_size is None else pool_size)


def _validate_ids(split: Split, ids: Sequence[int], pool_size: int) -> list[int]:
    """Check explicit forget ids: integers, in range, and listed in split.train."""
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | np.ndarray):
        raise ConfigError(f"ids must be a sequence of integers, got {type(ids).__name__}")
    if len(ids) == 0:
        raise ForgetRequestError("the forget request lists no ids", "pass at least one training-sample id")
    not_int = [i for i in ids if isinstance(i, bool) or not isinstance(i, int | np.integer)]
    if not_int:
        raise ForgetRequestError(f"forget ids must be integers; got {_preview(not_int)}", _FORGET_IDS_HINT)
    unique = sorted({int(i) for i in ids})
    out_of_range = [i for i in unique if not 0 <= i < pool_size]
    if out_of_range:
        raise ForgetRequestError(
            f"forget id(s) {_preview(out_of_range)} out of range: valid ids are 0..{pool_size - 1}",
            _FORGET_IDS_HINT,
        )
    train = set(split.train)
    outside = [i for i in unique if i not in train]
    if outside:
        first = outside[0]
        if first in set(split.val):
            kind = "a validation sample"
        elif split.single_pool and first in set(split.test):
            kind = "a test sample"
        else:
            kind = "not listed in split.json 'train'"
        what = kind if kind.startswith("not") else f"{kind}, not a training sample"
        more = f" ({len(outside) - 1} more id(s) are not training samples either)" if len(outside) > 1 else ""
        raise ForgetRequestError(
            f"id {first} is {what}; {_FORGET_IDS_HINT}{more}", "remove ids that are not in split.json 'train'"
        )
    return unique


def _preview(values: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in total)" if len(values) > limit else "")


# --------------------------------------------------------------------------------------------------
# Conversion helpers
# --------------------------------------------------------------------------------------------------


def _index_array(ds: ArrayDataset, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (n,)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= len(ds)):
        raise ConfigError(f"indices must lie in 0..{len(ds) - 1}, got {int(idx.min())}..{int(idx.max())}")
    return idx


def to_tensors(ds: ArrayDataset, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 images in [0, 1] of shape (n, C, H, W) and int64 labels (n,) for ``indices``."""
    import torch  # local import: loading data must not require torch

    idx = _index_array(ds, indices)
    images = ds.images[idx].astype(np.float32) / np.float32(ds.scale)  # (n, C, H, W)
    labels = ds.labels[idx].astype(np.int64)  # (n,)
    return torch.from_numpy(images), torch.from_numpy(labels)


def to_labels(ds: ArrayDataset, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
    """The int64 labels (n,) of ``indices``, without touching the images."""
    import torch  # local import: loading data must not require torch

    return torch.from_numpy(ds.labels[_index_array(ds, indices)].astype(np.int64))


def channel_stats(ds: ArrayDataset, indices: Sequence[int] | np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (floored at 1e-3) of the [0, 1]-scaled images at ``indices``.

    Computed exactly from per-channel histograms of the uint8 values, so memory stays small even for
    the whole CIFAR training set.
    """
    idx = _index_array(ds, indices)
    if idx.size == 0:
        raise ConfigError("channel_stats needs at least one index")
    channels = ds.images.shape[1]
    counts = np.zeros((channels, 256), dtype=np.int64)  # (C, 256) histogram of raw pixel values
    for start in range(0, idx.size, 4096):  # chunks bound the temporary copy
        chunk = ds.images[idx[start : start + 4096]]  # (b, C, H, W)
        for c in range(channels):
            counts[c] += np.bincount(chunk[:, c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / ds.scale  # (256,)
    totals = counts.sum(axis=1)  # (C,)
    means = (counts @ values) / totals  # (C,)
    variances = (counts * (values[None, :] - means[:, None]) ** 2).sum(axis=1) / totals
    stds = np.maximum(np.sqrt(variances), 1e-3)
    return [float(m) for m in means], [float(s) for s in stds]
