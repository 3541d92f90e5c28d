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


def _static_model(shapes: dict) -> "onnx.ModelProto":
    import onnx
    from onnx import TensorProto, helper
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)) for k, v in shapes.items()]
    nodes = [helper.make_node("Identity", [k], [f"{k}_out"]) for k in shapes]
    outputs = [helper.make_empty_tensor_value_info(f"{k}_out") for k in shapes]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)])


def test_static_inputs_of_exactly_their_shape_are_fed_whole_when_batches_disagree():
    """ONNX's node tests: a (2, 4) matrix, a (4, 3) matrix and a (1,) scale, all static. Read as
    fixed batches they would hold 2, 4 and 1 samples; they are one whole run instead."""
    from qgraph.data import check_data
    model = _static_model({"a": (2, 4), "b": (4, 3), "s": (1,), "empty": (0,)})
    data = {"a": np.ones((2, 4), np.float32), "b": np.ones((4, 3), np.float32), "s": np.ones(1, np.float32),
            "empty": np.zeros(0, np.float32)}
    plan = check_data(data, model)
    assert [f.mode for f in plan.feeds] == ["whole"] * 4 and plan.samples == 1
    (feeds, count), = list(plan.batches(64))
    assert count == 1 and all(feeds[k] is data[k] for k in data)
    # a real fixed batch with more rows than one batch still batches
    plan = check_data({"a": np.ones((6, 4), np.float32)}, _static_model({"a": (2, 4)}))
    assert plan.feeds[0].mode == "fixed" and plan.samples == 6
    with pytest.raises(DataError, match="different numbers of samples"):
        check_data({"a": np.ones((4, 4), np.float32), "b": np.ones((8, 3), np.float32)},
                   _static_model({"a": (2, 4), "b": (4, 3)}))


def test_a_state_whose_sample_axis_is_not_first_is_explained_and_fed_stacked():
    """A recurrent state [layers, batch, hidden] (Silero VAD's): rows along its first axis are not
    samples; the error says to stack one whole state per sample, and that form feeds."""
    from onnx import TensorProto, helper

    from qgraph.data import check_data
    graph = helper.make_graph([helper.make_node("Identity", ["state"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "N", 4])])
    model = helper.make_model(graph)
    x = np.zeros((5, 8), np.float32)
    with pytest.raises(DataError, match=r"input 'state' has shape \[2, 'N', 4\], its sample axis is not the first: "
                                        r"give it as one whole input per sample stacked on a new first axis, "
                                        r"shape \[S, 2, 1, 4\]"):
        check_data({"x": x, "state": np.zeros((2, 5, 4), np.float32)}, model)
    plan = check_data({"x": x, "state": np.zeros((5, 2, 1, 4), np.float32)}, model)
    batches = list(plan.batches(8))
    assert len(batches) == 5 and batches[0][0]["state"].shape == (2, 1, 4) and batches[0][0]["x"].shape == (1, 8)
