import numpy as np
import pytest

from qgraph.data import check_finite, iter_batches, load_data, random_inputs
from qgraph.errors import DataError


def test_valid_file_loads(small_cnn, small_data_file):
    data = load_data(small_data_file, small_cnn, need_labels=True)
    assert data["input"].shape == (16, 1, 8, 8)


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((2, 1, 8, 8), np.float32)}, "missing input 'input'.*'image'"),
    ({"input": np.zeros((2, 1, 8, 8), np.float64)}, "dtype float64.*float32"),
    ({"input": np.zeros((2, 1, 9, 8), np.float32)}, r"shape \[2, 1, 9, 8\].*\['N', 1, 8, 8\]"),
    ({"input": np.zeros((2, 8, 8), np.float32)}, "shape"),
    ({"input": np.zeros((2, 1, 8, 8), np.float32), "labels": np.zeros(3, np.int64)}, "different numbers of samples"),
])
def test_mismatched_files_are_refused(tmp_path, small_cnn, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_data(path, small_cnn)


def test_missing_labels_not_npz_and_missing_file(tmp_path, small_cnn):
    path = tmp_path / "d.npz"
    np.savez(path, input=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match="no 'labels'"):
        load_data(path, small_cnn, need_labels=True)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_data(junk)
    with pytest.raises(DataError, match="no such data file"):
        load_data(tmp_path / "absent.npz")


def test_nan_is_named_by_input_and_batch():
    batch = {"input": np.array([0.0, np.nan], np.float32)}
    with pytest.raises(DataError, match="'input'.*batch 3"):
        check_finite(batch, 3)


def test_batches_shuffle_deterministically(small_cnn):
    data = {"input": np.arange(10, dtype=np.float32), "labels": np.arange(10)}
    a = [b["labels"].tolist() for b in iter_batches(data, 4, shuffle=True, seed=7)]
    b = [b["labels"].tolist() for b in iter_batches(data, 4, shuffle=True, seed=7)]
    assert a == b and sorted(sum(a, [])) == list(range(10)) and a != [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    feeds = random_inputs(small_cnn, batch=3)
    assert feeds["input"].shape == (3, 1, 8, 8) and feeds["input"].dtype == np.float32
