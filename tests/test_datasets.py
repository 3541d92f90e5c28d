import numpy as np
import pytest

from qgraph.errors import DataError
from qgraph.models.datasets import DATASETS, dataset_path, load_dataset, resize_images, save_npz

SIZES = {("digits", "train"): (1438, 8), ("digits", "val"): (359, 8),
         ("mnist", "train"): (4000, 28), ("mnist", "val"): (1000, 28)}


@pytest.mark.parametrize("name,split", sorted(SIZES))
def test_split_shapes_dtypes_and_ranges(name, split):
    count, side = SIZES[(name, split)]
    data = load_dataset(name, split)
    assert set(data) == {"input", "labels"}
    assert data["input"].shape == (count, 1, side, side) and data["input"].dtype == np.float32
    assert data["labels"].shape == (count,) and data["labels"].dtype == np.int64
    assert data["input"].min() == 0.0 and data["input"].max() == 1.0
    assert set(np.unique(data["labels"])) == set(range(10))
    # Stratified: every class within one sample of an even share.
    counts = np.bincount(data["labels"], minlength=10)
    assert counts.max() - counts.min() <= count // 10 * 0.1 + 2


@pytest.mark.parametrize("name", DATASETS)
def test_splits_are_disjoint_and_cover_all(name):
    train, val, everything = (load_dataset(name, s)["input"] for s in ("train", "val", "all"))
    assert len(train) + len(val) == len(everything)
    train_keys = {img.tobytes() for img in train}
    assert sum(img.tobytes() in train_keys for img in val) < len(val) * 0.02  # only duplicate images


def test_pixels_are_stored_bytes_over_255():
    with np.load(dataset_path("mnist")) as stored:
        raw, codes = stored["images"], stored["split"]
        assert "source" in stored and "MNIST" in str(stored["source"])
    expected = raw[codes == 1].astype(np.float32) / 255.0
    np.testing.assert_array_equal(load_dataset("mnist", "val")["input"][:, 0], expected)


def test_first_batch_mixes_classes():
    assert len(set(load_dataset("mnist", "train")["labels"][:20])) >= 5


def test_image_size_block_mean_and_nearest():
    full = load_dataset("mnist", "val")["input"]
    half = load_dataset("mnist", "val", image_size=14)["input"]
    assert half.shape == (1000, 1, 14, 14) and half.dtype == np.float32
    np.testing.assert_allclose(half[:, :, 3, 5], full[:, :, 6:8, 10:12].mean(axis=(2, 3)), rtol=1e-6)
    big = load_dataset("digits", "val", image_size=(16, 24))["input"]
    assert big.shape == (359, 1, 16, 24)
    small = load_dataset("digits", "val")["input"]
    np.testing.assert_array_equal(big[:, :, ::2, ::3], small)


def test_resize_rejects_non_positive_size():
    with pytest.raises(DataError):
        resize_images(np.zeros((1, 8, 8), np.float32), 0)


def test_unknown_name_and_split_list_valid_choices():
    with pytest.raises(DataError, match="digits, mnist"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="train, val"):
        load_dataset("mnist", "test")


def test_save_npz_round_trip_leaves_no_temp_file(tmp_path):
    data = load_dataset("digits", "val")
    path = save_npz(data, tmp_path / "digits_val.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_val.npz"]
    with np.load(path) as loaded:
        np.testing.assert_array_equal(loaded["input"], data["input"])
        assert loaded["labels"].dtype == np.int64
