"""Bundled real datasets for demos and tests: sklearn digits (8x8) and MNIST-5k (28x28).

`load_dataset` returns a data dict in the project's format: `input` float32 (N, 1, H, W)
with pixels x / 255 in [0, 1], and `labels` int64. Splits are fixed in the files (see
`scripts/make_datasets.py` for sources, licences and how they were made).
"""

from __future__ import annotations

import io
import os
from importlib import resources
from pathlib import Path

import numpy as np

from qgraph.errors import DataError
from qgraph.files import atomic_write_bytes

DATASETS = ("digits", "mnist")
SPLITS = ("train", "val", "all")
_FILES = {"digits": "digits.npz", "mnist": "mnist5k.npz"}
_SPLIT_CODES = {"train": 0, "val": 1}


def dataset_path(name: str) -> Path:
    """Path of the bundled npz file of dataset `name`."""
    if name not in _FILES:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return Path(str(resources.files("qgraph.models").joinpath("data", _FILES[name])))


def load_dataset(name: str, split: str = "train",
                 image_size: int | tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Images of one split as {"input": float32 (N, 1, H, W) in [0, 1], "labels": int64 (N,)}.

    `image_size` (an int or (H, W)) resizes: by block means when it divides the stored size
    (mnist 28 -> 14 averages 2x2), otherwise by nearest neighbour.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of dataset {name!r}; choose one of: {', '.join(SPLITS)}")
    with np.load(dataset_path(name), allow_pickle=False) as stored:
        images, labels, split_codes = stored["images"], stored["labels"], stored["split"]
    if split != "all":
        keep = split_codes == _SPLIT_CODES[split]
        images, labels = images[keep], labels[keep]
    pixels = images.astype(np.float32) / np.float32(255.0)
    if image_size is not None:
        pixels = resize_images(pixels, image_size)
    return {"input": np.ascontiguousarray(pixels[:, None]), "labels": labels.astype(np.int64)}


def resize_images(images: np.ndarray, image_size: int | tuple[int, int]) -> np.ndarray:
    """Resize (N, H, W) images: block means for whole-number shrink factors, else nearest."""
    out_h, out_w = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    if out_h < 1 or out_w < 1:
        raise DataError(f"image_size {image_size!r} must be positive")
    n, height, width = images.shape
    if (out_h, out_w) == (height, width):
        return images
    if height % out_h == 0 and width % out_w == 0:
        blocks = images.reshape(n, out_h, height // out_h, out_w, width // out_w)
        return blocks.mean(axis=(2, 4), dtype=np.float32)
    rows = (np.arange(out_h) * height) // out_h
    cols = (np.arange(out_w) * width) // out_w
    return images[:, rows[:, None], cols[None, :]]


def encode_npz(data: dict[str, np.ndarray]) -> bytes:
    """`data` as the bytes of a compressed npz file."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{key: np.asarray(value) for key, value in data.items()})
    return buffer.getvalue()


def save_npz(data: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write `data` as a compressed npz at `path` atomically (temp file in the same folder, then rename)."""
    return atomic_write_bytes(path, encode_npz(data))
