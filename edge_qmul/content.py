"""Content ids: the one definition of a sample's id, shared by the server's datasets and the devices.

A sample is named by the sha256 of its content, never by where it sits: the bytes of its image file as
stored on disk (a device holding the file can name it without decoding it), or, for samples held as arrays,
its uint8 (C, H, W) pixels in C order. ``edge_qmul.data`` records these ids at train time and
``edge_qmul.devices.state`` indexes a device's own samples with them, so both sides agree by construction.

Only the standard library and numpy: this module runs on a lean device install (no torch).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edge_qmul.errors import ConfigError, DataError

_HEX_DIGITS = frozenset("0123456789abcdef")


def is_sha256_hex(value: object) -> bool:
    """True for a content id as stored: 64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX_DIGITS


def hash_bytes(raw: bytes) -> str:
    """Content id of an image file already read into memory (the same digest as ``hash_file``)."""
    return hashlib.sha256(raw).hexdigest()


def hash_file(path: str | Path) -> str:
    """Content id of an image file: sha256 hex of its bytes exactly as stored on disk."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}", "check that the file exists and is readable") from exc
    return digest.hexdigest()


def hash_pixels(image: np.ndarray) -> str:
    """Content id of one image held as pixels: sha256 hex of its uint8 (C, H, W) values in C order.

    The same digest as ``store.sample_sha256``; a device computes it from the array the dataset holds
    (an HWC array must be transposed to CHW first, ``image.transpose(2, 0, 1)``).
    """
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ConfigError(
            f"hash_pixels takes one uint8 image of shape (C, H, W), got {array.dtype} {array.shape}",
            "pass the image as the dataset holds it: uint8 values 0..255 in (C, H, W) layout",
        )
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
