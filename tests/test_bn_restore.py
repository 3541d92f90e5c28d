"""bn_restore: outputs unchanged, statistics equal a NumPy recomputation, selection and bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import ConfigError, PassError
from qgraph.graph import QModel
from qgraph.models.datasets import load_dataset
from qgraph.pipeline import PassContext, run_pass
from qgraph.runner import Runner, run_model

try:
    from qgraph.models.builders import build_model
except ImportError:  # the builders land separately; until then a RepVGG-deploy-like net stands in
    build_model = None


@pytest.fixture(scope="module")
def data():
    val = load_dataset("mnist", "val")
    return {"input": val["input"][:192]}


def conv_chain(zero_channel: bool = False, weight_as_input: bool = False) -> onnx.ModelProto:
    """Three 3x3 convs with ReLU (BN already folded, as in a re-parameterized deploy model)."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])]
    x, cin = "input", 1
    for i, c in enumerate((8, 16, 16)):
        w = rng.normal(0, 1 / np.sqrt(9 * cin), (c, cin, 3, 3)) * np.exp(rng.normal(0, 1, (c, 1, 1, 1)))
        b = rng.normal(0, 0.2, c)
        if zero_channel and i == 1:
            w[3] = 0.0
            b[3] = 0.7  # a constant channel: variance exactly 0
        if weight_as_input and i == 0:
            inputs.append(helper.make_tensor_value_info(f"w{i}", TensorProto.FLOAT, list(w.shape)))
        else:
            inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x, cin = f"r{i}", c
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (10, cin)).astype(np.float32), "fc_w"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "chain", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def repvgg_deploy() -> onnx.ModelProto:
    return build_model("repvgg_deploy") if build_model is not None else conv_chain()


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def restored_bns(qmodel: QModel) -> dict[str, dict[str, np.ndarray]]:
    """conv name -> its BN's parameters."""
    result = {}
    for node in qmodel.graph.nodes:
        if node.op == "BatchNormalization":
            conv = node.inputs[0].inputs[0]
            gamma, beta, mean, var = (np.asarray(t.values) for t in node.inputs[1:5])
            result[conv.name] = {"gamma": gamma, "beta": beta, "mean": mean, "var": var,
                                 "eps": node.attrs["epsilon"], "conv_out": node.inputs[0].name}
    return result


def test_repvgg_deploy_outputs_unchanged_and_stats_match_numpy(data):
    original = repvgg_deploy()
    qmodel = QModel.from_onnx(original)
    convs = [n for n in qmodel.graph.nodes if n.op == "Conv"]
    conv_outputs = {n.name: n.outputs[0].name for n in convs}
    report = run_pass(qmodel, "bn_restore", {}, PassContext(data=data, batch_size=50))
    assert report["changed"] == len(convs) > 0
    assert len(report["layers"]) == len(convs) and all(r["mean_sigma"] > 0 for r in report["layers"])

    restored = qmodel.to_onnx()
    ref = run_model(original, data)
    new = run_model(restored, data)
    for key in ref:
        assert rel_diff(new[key], ref[key]) <= 1e-5

    # NumPy recomputation over the same samples, conv outputs taken from the original model
    runner = Runner(original, extra_outputs=list(conv_outputs.values()))
    acts = runner.run(data, list(conv_outputs.values()))
    bns = restored_bns(QModel.from_onnx(restored))
    assert set(bns) == set(conv_outputs)
    for conv, out in conv_outputs.items():
        x = acts[out].astype(np.float64)
        axes = (0,) + tuple(range(2, x.ndim))
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        bn = bns[conv]
        np.testing.assert_allclose(bn["mean"], mean, rtol=1e-5, atol=1e-6 * np.abs(mean).max())
        np.testing.assert_allclose(bn["var"], var, rtol=1e-4, atol=1e-6 * var.max())
        np.testing.assert_allclose(bn["beta"], bn["mean"])
        np.testing.assert_allclose(bn["gamma"], np.sqrt(bn["var"] + np.float32(bn["eps"])), rtol=1e-6)


def test_zero_variance_channel_stays_exact(data):
    original = conv_chain(zero_channel=True)
    qmodel = QModel.from_onnx(original)
    run_pass(qmodel, "bn_restore", {"eps": 1e-3}, PassContext(data=data))
    bn = restored_bns(qmodel)["conv1"]
    assert bn["var"][3] == 0.0 and bn["mean"][3] == pytest.approx(0.7)
    assert bn["gamma"][3] == pytest.approx(np.sqrt(1e-3))
    outputs = ["c1"]
    ref = run_model(original, data, outputs)["c1"]
    new = run_model(qmodel.to_onnx(), data, outputs)["c1"]
    np.testing.assert_allclose(new[:, 3], 0.7, rtol=1e-6)
    assert rel_diff(new, ref) <= 1e-6


def test_layers_by_name_and_regex_and_existing_bn_skipped(data):
    qmodel = QModel.from_onnx(conv_chain())
    report = run_pass(qmodel, "bn_restore", {"layers": ["conv0", "conv[2-9]"]}, PassContext(data=data))
    assert sorted(restored_bns(qmodel)) == ["conv0", "conv2"]
    assert report["changed"] == 2
    again = run_pass(qmodel, "bn_restore", {}, PassContext(data=data))
    assert again["changed"] == 1  # only conv1 was left
    reasons = {s["node"]: s["reason"] for s in again["skipped"]}
    assert "already followed by BatchNormalization" in reasons["conv0"]
    nothing = run_pass(qmodel, "bn_restore", {}, PassContext(data=data))
    assert nothing["changed"] == 0 and "no conv" in nothing["summary"]


def test_bad_input(data):
    with pytest.raises(ConfigError, match="no Conv node matches"):
        run_pass(QModel.from_onnx(conv_chain()), "bn_restore", {"layers": ["nope"]}, PassContext(data=data))
    with pytest.raises(PassError, match="calibration data"):
        run_pass(QModel.from_onnx(conv_chain()), "bn_restore", {}, PassContext())
    qmodel = QModel.from_onnx(conv_chain(weight_as_input=True))
    report = run_pass(qmodel, "bn_restore", {"layers": ["conv0"]}, PassContext(data=data))
    assert report["changed"] == 0
    assert "not an initializer" in report["skipped"][0]["reason"]
