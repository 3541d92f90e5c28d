import logging

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import make_small_cnn
from qgraph.errors import ModelError, QGraphError
from qgraph.model_io import OPSET, default_opset, load_model, save_model
from qgraph.runner import run_model


def test_load_checks_and_keeps_working_opset(small_cnn_file):
    model = load_model(small_cnn_file)
    assert default_opset(model) == OPSET
    assert len(model.graph.node) == 9


def test_dimensions_declared_minus_one_are_read_as_dynamic(tmp_path, small_cnn, caplog):
    """Paddle2ONNX writes a dynamic batch as dim_value -1 (PaddleOCR's direction classifier):
    qgraph names it, so data of any batch feeds it."""
    from qgraph.data import check_data
    for info in (small_cnn.graph.input[0], small_cnn.graph.output[0]):
        info.type.tensor_type.shape.dim[0].dim_value = -1
    path = tmp_path / "paddle.onnx"
    onnx.save(small_cnn, path)
    with caplog.at_level(logging.WARNING, logger="qgraph"):
        model = load_model(path)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.HasField("dim_value")
    assert "declared as -1" in caplog.text
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    data = {model.graph.input[0].name: np.zeros((16, *shape), np.float32)}
    assert check_data(data, model).samples == 16


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_model(tmp_path / "absent.onnx")


def test_random_bytes_are_not_a_model(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ModelError, match="noise.onnx"):
        load_model(path)


def test_truncated_protobuf(tmp_path, small_cnn):
    path = tmp_path / "cut.onnx"
    data = small_cnn.SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.onnx"):
        load_model(path)


def test_checker_failure_names_the_problem(tmp_path, small_cnn):
    small_cnn.graph.node[1].input[0] = "nowhere"
    path = tmp_path / "bad.onnx"
    onnx.save(small_cnn, path)
    with pytest.raises(ModelError, match="fails the ONNX checker.*nowhere"):
        load_model(path)


def test_older_opset_is_converted_and_said(tmp_path, caplog):
    old = make_small_cnn(opset=13)
    path = tmp_path / "old.onnx"
    onnx.save(old, path)
    with caplog.at_level(logging.WARNING, logger="qgraph"):
        model = load_model(path)
    assert default_opset(model) == OPSET
    assert "converted opset 13 to 17" in caplog.text
    x = {"input": np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)}
    np.testing.assert_allclose(run_model(model, x)["logits"], run_model(old, x)["logits"], rtol=1e-6)


def test_external_data_model_loads(tmp_path, small_cnn):
    path = tmp_path / "ext.onnx"
    onnx.save_model(small_cnn, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").exists()
    model = load_model(path)
    weight = {i.name: i for i in model.graph.initializer}["conv2.weight"]
    assert onnx.numpy_helper.to_array(weight).shape == (6, 4, 3, 3)


def test_save_is_atomic_and_refuses_the_input(tmp_path, small_cnn_file, small_cnn):
    out = save_model(small_cnn, tmp_path / "copy.onnx", reads={"model": small_cnn_file})
    assert onnx.load(out).graph.node[0].name == "conv1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "small.onnx"]
    before = small_cnn_file.read_bytes()
    with pytest.raises(QGraphError, match="would overwrite the model file"):
        save_model(helper.make_model(small_cnn.graph), small_cnn_file, reads={"model": small_cnn_file})
    assert small_cnn_file.read_bytes() == before


def test_save_into_missing_or_unwritable_directory(tmp_path, small_cnn):
    with pytest.raises(QGraphError, match="does not exist"):
        save_model(small_cnn, tmp_path / "nope" / "m.onnx")
    with pytest.raises(QGraphError, match="cannot write|not writable"):
        save_model(small_cnn, "/proc/qgraph-test.onnx")


def test_float16_model_is_read_as_float32_and_quantizes_with_float16_data(tmp_path, caplog):
    """A float16 export (weights, input, output, a Cast and a Constant in half precision) is read
    as float32: the same values widened exactly; ptq runs on float16 data, and the lowered model
    takes float32 and diffs clean."""
    from onnx import TensorProto, numpy_helper
    from qgraph.api import apply_pipeline
    from qgraph.diff import diff_models
    from qgraph.lowering import lower_model
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float16), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float16(0.5), "k")),
             helper.make_node("Mul", ["c", "k"], ["m"]),
             helper.make_node("Cast", ["m"], ["m16"], to=TensorProto.FLOAT16),
             helper.make_node("Relu", ["m16"], ["y"])]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 8, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "half.onnx")
    with caplog.at_level(logging.WARNING, logger="qgraph"):
        loaded = load_model(tmp_path / "half.onnx")
    assert "float16 tensors read as float32 (5; inputs x)" in caplog.text
    assert loaded.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x16 = rng.uniform(-1, 1, (4, 3, 8, 8)).astype(np.float16)
    want = run_model(model, {"x": x16})["y"].astype(np.float32)
    got = run_model(loaded, {"x": x16.astype(np.float32)})["y"]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)      # float16 arithmetic vs float32
    qdq = apply_pipeline(model, "ptq", {"x": x16})
    lowered, report = lower_model(qdq, "integer")
    assert report["skipped"] == [] and diff_models(lowered, {"x": x16}).passed
    np.testing.assert_allclose(run_model(lowered, {"x": x16.astype(np.float32)})["y"], want, atol=0.05)
    from qgraph.train import train_model                 # QAT by distillation on the float16 data
    trained, history = train_model(apply_pipeline(model, "qat", {"x": x16}), {"x": x16}, teacher=loaded,
                                   workdir=tmp_path / "wd", epochs=1, batch_size=2, progress=False)
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceL2"])
def test_opset_18_reduction_axes_from_an_initializer_survive_the_conversion(tmp_path, op):
    """torch.onnx's opset-18 exports give a reduction's axes as an initializer input; onnx's
    converter turned them into ``axes=[]`` (reduce over everything) unless they came from a
    Constant node."""
    from onnx import TensorProto, numpy_helper
    graph = helper.make_graph([helper.make_node(op, ["x", "axes"], ["y"], keepdims=0)], "reduce",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "reduce.onnx")
    loaded = load_model(tmp_path / "reduce.onnx")
    assert default_opset(loaded) == OPSET
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_model(loaded, {"x": x})["y"], run_model(model, {"x": x})["y"])
    assert run_model(loaded, {"x": x})["y"].shape == (2, 4)


def test_ir3_file_whose_initializers_are_not_inputs_is_read_as_ir4(tmp_path, caplog, small_cnn):
    """onnxruntime.quantization writes Caffe2-era (IR 3) models back as IR 3 without listing the
    new initializers among the inputs, which IR 3 requires: read as the IR of its opsets."""
    model = onnx.ModelProto()
    model.CopyFrom(small_cnn)
    model.ir_version = 3
    onnx.save(model, tmp_path / "ir3.onnx")
    with caplog.at_level(logging.WARNING, logger="qgraph"):
        loaded = load_model(tmp_path / "ir3.onnx")
    assert loaded.ir_version >= 4 and "IR 3 with" in caplog.text and "not among the graph inputs" in caplog.text
