"""The classic ImageNet architectures of ONNX's own model zoo, as the onnx wheel ships them
(onnx/backend/test/data/light: Caffe2-era exports, IR version 3 with every initializer listed
among the graph's inputs, opset 9, weights computed by ConstantOfShape). Their weights are
replaced here by seeded random ones of the same shapes (He-scaled convolutions, BatchNorm
statistics near identity), so that every number is non-degenerate, and each model goes through
ptq, both lowerings and the interpreter: what these graphs hold that our builders do not write —
ResNet's residual ``Sum``, DenseNet's BatchNormalization after a Concat (no layer to fold into),
Inception-v2's padded 3x3 AveragePools in its branches, ShuffleNet's strided, padded ones and its
channel-shuffle Transposes — must lower whole and agree bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qgraph.api import apply_pipeline
from qgraph.diff import diff_models
from qgraph.graph import QModel
from qgraph.lowering import lower_model
from qgraph.pipeline import run_pass
from qgraph.runner import run_model

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _role(model: onnx.ModelProto, name: str) -> tuple[str, int]:
    for node in model.graph.node:
        for slot, tensor in enumerate(node.input):
            if tensor == name:
                return node.op_type, slot
    return "", -1


def light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """`light_<name>.onnx` with each ConstantOfShape weight replaced by a seeded random initializer
    (listed among the inputs too: the file stays a valid IR 3 model)."""
    path = LIGHT / f"light_{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not in this onnx wheel")
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            kept.append(node)
            continue
        shape = tuple(int(d) for d in inits[node.input[0]])
        out = node.output[0]
        op, slot = _role(model, out)
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if op == "BatchNormalization":
            value = {1: 1 + 0.1 * rng.standard_normal(shape), 2: 0.1 * rng.standard_normal(shape),
                     3: 0.1 * rng.standard_normal(shape), 4: rng.uniform(0.5, 1.5, shape)}[slot]
        elif op in ("Conv", "Gemm") and slot == 1:
            value = rng.standard_normal(shape) * np.sqrt(2.0 / (shape[0] if op == "Gemm" and fan_in == 1 else fan_in))
        else:
            value = 0.05 * rng.standard_normal(shape)
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), out))
        model.graph.input.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, shape))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.checker.check_model(model)
    return model


def image_input(model: onnx.ModelProto, n: int, seed: int = 1) -> dict[str, np.ndarray]:
    inits = {i.name for i in model.graph.initializer}
    (x,) = [i for i in model.graph.input if i.name not in inits]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    return {x.name: np.random.default_rng(seed).uniform(0, 1, [n] + shape[1:]).astype(np.float32)}


@pytest.mark.parametrize("name, idiom", [("resnet50", "Sum"), ("densenet121", "BatchNormalization"),
                                         ("inception_v2", "AveragePool"), ("shufflenet", "AveragePool")])
def test_classic_model_quantizes_and_lowers_whole(name, idiom):
    float_model = light_model(name)
    assert float_model.ir_version == 3 and idiom in {n.op_type for n in float_model.graph.node}
    data = image_input(float_model, 1)
    qdq = apply_pipeline(float_model, "ptq", data)
    onnx.checker.check_model(qdq)               # IR 3 initializer rules no longer apply
    ref = next(iter(run_model(float_model, data).values()))
    quantized = next(iter(run_model(qdq, data).values()))
    cosine = float(np.dot(ref.ravel(), quantized.ravel()) / np.linalg.norm(ref) / np.linalg.norm(quantized))
    assert cosine > 0.9, cosine
    for target in ("qlinear", "integer"):
        lowered, report = lower_model(qdq, target)
        assert report["skipped"] == [] and report["float_nodes"] == [] and report["float_by_placement"] == [], \
            (target, report["summary"])
        if target == "integer":   # integer tensors bit-exact, the float Softmax after them within its ulp
            diff = diff_models(lowered, data)
            assert diff.passed, diff.summary()


def test_densenet_batchnorm_after_concat_becomes_a_depthwise_conv_with_the_same_outputs():
    """fuse_conv_bn's standalone form on DenseNet's 58 BatchNormalizations that follow a Concat."""
    model = QModel.from_onnx(light_model("densenet121"))
    run_pass(model, "canonicalize", {})
    data = image_input(light_model("densenet121"), 1)
    before = next(iter(run_model(model.to_onnx(), data).values()))
    report = run_pass(model, "fuse_conv_bn", {"mode": "fold"})
    assert len(report["standalone_as_conv"]) > 50 and report["skipped"] == []
    assert not [n for n in model.graph.nodes if n.op == "BatchNormalization"]
    after = next(iter(run_model(model.to_onnx(), data).values()))
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-6)
