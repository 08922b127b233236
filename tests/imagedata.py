"""Test helpers that write real image folders (PNG / JPEG files via Pillow) and real image arrays."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


@functools.cache
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.data).reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    return images, np.asarray(bunch.target, dtype=np.int64)


def digits_uint8(count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as uint8 (N, 1, 8, 8) images scaled 0..16 -> 0..255, and int64 labels (N,)."""
    images, labels = _all_digits()
    return images[:count].copy(), labels[:count].copy()


def to_pil(image: np.ndarray) -> Image.Image:
    """A uint8 (C, H, W) array with C 1 or 3 as a Pillow image of mode L or RGB."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 (C, H, W) image with C 1 or 3, got {image.dtype} {image.shape}")
    if image.shape[0] == 1:
        return Image.fromarray(image[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB")


def write_image_folder(
    root: str | Path,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    *,
    fmt: str = "png",
    split: str | None = None,
) -> list[Path]:
    """Write ``images`` (uint8 (N, C, H, W)) as ``root[/split]/<class name>/<index>.<fmt>`` files.

    ``fmt`` is "png" (lossless) or "jpg" / "jpeg" (quality 95). Every class folder is created, so a
    class without images leaves an empty folder. Returns the written paths in the order of ``images``.
    """
    fmt = fmt.lower()
    pillow_format = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}.get(fmt)
    if pillow_format is None:
        raise ValueError(f"fmt must be png, jpg or jpeg, got {fmt!r}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    base = Path(root) / split if split is not None else Path(root)
    for name in class_names:
        (base / name).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = base / class_names[int(label)] / f"{i:05d}.{fmt}"
        options = {"quality": 95} if pillow_format == "JPEG" else {}
        to_pil(image).save(path, format=pillow_format, **options)
        paths.append(path)
    return paths
