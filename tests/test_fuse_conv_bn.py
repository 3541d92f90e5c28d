import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_small_cnn, small_data
from qgraph.annotations import get_annotation
from qgraph.errors import ConfigError, PassError
from qgraph.graph import QModel
from qgraph.pipeline import run_pass
from qgraph.runner import run_model

RNG = np.random.default_rng(7)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-12))


def bn_params(prefix: str, channels: int, rng=RNG) -> list:
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}") for k, v in (
        ("scale", rng.uniform(0.3, 2.0, channels) * rng.choice([-1, 1], channels)),
        ("bias", rng.normal(0, 0.5, channels)),
        ("mean", rng.normal(0, 0.5, channels)),
        ("var", rng.uniform(0.05, 3.0, channels)))]


def bn_node(x: str, y: str, prefix: str = "bn", eps: float = 1e-3):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")],
                            [y], name=prefix, epsilon=eps)


def make_model(nodes, inits, in_shape, out_name="logits", extra_inputs=()) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])] + list(extra_inputs)
    graph = helper.make_graph(nodes, "t", inputs, [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8

    return model


def w(name, shape, rng=RNG):
    return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)


def run_both_modes(proto: onnx.ModelProto, feeds: dict, tol: float = 1e-5) -> dict:
    """Fold and forward-fuse `proto`; check outputs and that no BN is left. Returns the QModels."""
    ref = run_model(proto, feeds)["logits"]
    out = {}
    for mode in ("fold", "forward"):
        model = QModel.from_onnx(proto)
        report = run_pass(model, "fuse_conv_bn", {"mode": mode})
        assert report["changed"] >= 1, report
        left = sorted(n.name for n in model.graph.nodes if n.op == "BatchNormalization")
        assert left == sorted(s["node"] for s in report["skipped"])
        got = run_model(model.to_onnx(), feeds)["logits"]
        assert rel_err(got, ref) <= tol, (mode, rel_err(got, ref))
        out[mode] = (model, report)
    return out


def feeds_for(shape, count=8, seed=0):
    return {"input": np.random.default_rng(seed).random((count, *shape)).astype(np.float32)}


# -- fold and forward on small models ---------------------------------------------------------

def test_small_cnn_both_modes_and_bias_created():
    proto = make_small_cnn(seed=3)
    feeds = {"input": small_data(16)["input"]}
    models = run_both_modes(proto, feeds)
    model, report = models["fold"]
    conv = next(n for n in model.graph.nodes if n.name == "conv1")
    assert len(conv.inputs) == 3 and isinstance(conv.inputs[2], gs.Constant)
    assert report["fused"] == [{"bn": "bn1", "layer": "conv1", "op": "Conv"}]


def test_fold_math_matches_formula():
    proto = make_small_cnn(seed=4)
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    model = QModel.from_onnx(proto)
    run_pass(model, "fuse_conv_bn")
    conv = next(n for n in model.graph.nodes if n.name == "conv1")
    s = inits["bn1.scale"] / np.sqrt(inits["bn1.var"] + 1e-5)
    np.testing.assert_allclose(conv.inputs[1].values, inits["conv1.weight"] * s[:, None, None, None], rtol=1e-6)
    expect_b = (inits["conv1.bias"] - inits["bn1.mean"]) * s + inits["bn1.bias"]
    np.testing.assert_allclose(conv.inputs[2].values, expect_b, rtol=1e-6, atol=1e-7)
    assert conv.inputs[1].values.dtype == np.float32


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_transpose_groups_dilation_output_padding(with_bias):
    c_in, c_out, group = 6, 8, 2
    inits = [w("ct.weight", (c_in, c_out // group, 3, 3))] + bn_params("bn", c_out)
    ins = ["input", "ct.weight"]
    if with_bias:
        inits.append(w("ct.bias", (c_out,)))
        ins.append("ct.bias")
    nodes = [helper.make_node("ConvTranspose", ins, ["x"], name="ct", group=group, dilations=[2, 2],
                              strides=[2, 2], output_padding=[1, 1], pads=[1, 0, 1, 0]),
             bn_node("x", "logits")]
    proto = make_model(nodes, inits, (c_in, 5, 5))
    models = run_both_modes(proto, feeds_for((c_in, 5, 5)))
    ct = next(n for n in models["fold"][0].graph.nodes if n.op == "ConvTranspose")
    assert ct.attrs["group"] == group and ct.attrs["output_padding"] == [1, 1]


def test_depthwise_conv_without_bias():
    inits = [w("dw.weight", (4, 1, 3, 3))] + bn_params("bn", 4)
    nodes = [helper.make_node("Conv", ["input", "dw.weight"], ["x"], name="dw", group=4, pads=[1, 1, 1, 1]),
             bn_node("x", "y"), helper.make_node("Relu", ["y"], ["logits"], name="relu")]
    proto = make_model(nodes, inits, (4, 6, 6))
    models = run_both_modes(proto, feeds_for((4, 6, 6)))
    entry = get_annotation(models["forward"][0], "forward_fused_bn")["dw"]
    assert entry["bias"] == "dw.bias"  # a new trainable zero bias


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_gemm_transb(trans_b, alpha, beta):
    k, n = 12, 5
    inits = [w("fc.weight", (n, k) if trans_b else (k, n)), w("fc.bias", (n,))] + bn_params("bn", n)
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["x"], name="fc", transB=trans_b,
                              alpha=alpha, beta=beta),
             bn_node("x", "logits")]
    proto = make_model(nodes, inits, (3, 2, 2))
    models = run_both_modes(proto, feeds_for((3, 2, 2)))
    gemm = next(n for n in models["fold"][0].graph.nodes if n.op == "Gemm")
    assert gemm.attrs["transB"] == trans_b and gemm.attrs["alpha"] == 1.0


def test_matmul_with_constant_weight_becomes_gemm():
    inits = [w("fc.weight", (12, 5))] + bn_params("bn", 5)
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc.weight"], ["x"], name="fc"),
             bn_node("x", "logits")]
    proto = make_model(nodes, inits, (3, 2, 2))
    models = run_both_modes(proto, feeds_for((3, 2, 2)))
    for model, _ in models.values():
        assert [n.op for n in model.graph.nodes if n.name == "fc"] == ["Gemm"]


# -- forward mode ----------------------------------------------------------------------------

def test_forward_keeps_trainable_tensors_and_annotates():
    proto = make_small_cnn(seed=5)
    model = QModel.from_onnx(proto)
    run_pass(model, "fuse_conv_bn", {"mode": "forward"})
    entry = get_annotation(model, "forward_fused_bn")["conv1"]
    assert entry == {"bn": "bn1", "weight": "conv1.weight", "bias": "conv1.bias", "gamma": "bn1.scale",
                     "beta": "bn1.bias", "mean": "bn1.mean", "var": "bn1.var", "epsilon": pytest.approx(1e-5),
                     "folded_weight": "conv1.weight_fused", "folded_bias": "conv1.bias_fused"}
    tensors = model.tensors()
    for key in ("weight", "bias", "gamma", "beta", "mean", "var"):
        assert isinstance(tensors[entry[key]], gs.Constant), key
    conv = next(n for n in model.graph.nodes if n.name == "conv1")
    assert [t.name for t in conv.inputs[1:]] == ["conv1.weight_fused", "conv1.bias_fused"]
    ops = {n.op for n in model.graph.nodes if n.name.startswith("conv1/bn_fuse/")}
    assert ops == {"Add", "Sqrt", "Div", "Reshape", "Mul", "Sub"}


def test_trainer_sees_w_gamma_beta_trainable_and_statistics_frozen():
    from qgraph.train import classify_parameters
    model = QModel.from_onnx(make_small_cnn(seed=5))
    run_pass(model, "fuse_conv_bn", {"mode": "forward"})
    proto = model.to_onnx()
    trainable, frozen = classify_parameters(proto)
    entry = get_annotation(proto, "forward_fused_bn")["conv1"]
    assert {entry[k] for k in ("weight", "bias", "gamma", "beta")} <= set(trainable)
    assert {entry[k] for k in ("mean", "var")} <= set(frozen)


def test_canonicalize_folds_forward_into_fold_result():
    proto = make_small_cnn(seed=6)
    feeds = {"input": small_data(16)["input"]}
    folded = QModel.from_onnx(proto)
    run_pass(folded, "fuse_conv_bn", {"mode": "fold"})
    run_pass(folded, "canonicalize")
    forward = QModel.from_onnx(proto)
    run_pass(forward, "fuse_conv_bn", {"mode": "forward"})
    run_pass(forward, "canonicalize")
    assert [n.op for n in forward.graph.nodes] == [n.op for n in folded.graph.nodes]
    conv_f = next(n for n in forward.graph.nodes if n.name == "conv1")
    conv_d = next(n for n in folded.graph.nodes if n.name == "conv1")
    for a, b in zip(conv_f.inputs[1:], conv_d.inputs[1:]):
        np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-7)
    a = run_model(forward.to_onnx(), feeds)["logits"]
    b = run_model(folded.to_onnx(), feeds)["logits"]
    assert rel_err(a, b) <= 1e-6


def test_forward_mode_twice_is_idempotent_on_fused_layers():
    model = QModel.from_onnx(make_small_cnn(seed=1))
    run_pass(model, "fuse_conv_bn", {"mode": "forward"})
    report = run_pass(model, "fuse_conv_bn", {"mode": "forward"})
    assert report["changed"] == 0 and "no BatchNormalization" in report["summary"]


# -- what is left alone ------------------------------------------------------------------------

def _conv_bn_nodes(extra_reader: bool):
    inits = [w("conv.weight", (4, 3, 3, 3))] + bn_params("bn", 4)
    nodes = [helper.make_node("Conv", ["input", "conv.weight"], ["x"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("x", "y")]
    if extra_reader:
        nodes += [helper.make_node("Relu", ["x"], ["r"], name="side"),
                  helper.make_node("Add", ["y", "r"], ["logits"], name="add")]
    else:
        nodes += [helper.make_node("Relu", ["y"], ["logits"], name="relu")]
    return nodes, inits


def test_bn_shared_by_two_paths_becomes_its_own_depthwise_conv():
    """Folding into the Conv would change its output for the other reader: the BN becomes a
    depthwise 1x1 conv of its own instead (the Conv keeps its weights)."""
    nodes, inits = _conv_bn_nodes(extra_reader=True)
    proto = make_model(nodes, inits, (3, 5, 5))
    feeds = feeds_for((3, 5, 5))
    for mode in ("fold", "forward"):
        model = QModel.from_onnx(proto)
        report = run_pass(model, "fuse_conv_bn", {"mode": mode})
        assert report["fused"] == [] and report["skipped"] == []
        assert report["standalone_as_conv"] == [{"bn": "bn", "conv": "bn/depthwise", "channels": 4}]
        assert "1 with no layer before them as depthwise 1x1 convs" in report["summary"]
        convs = {n.name: n for n in model.graph.nodes if n.op == "Conv"}
        depthwise = convs["bn/depthwise"]
        assert depthwise.attrs["group"] == 4 and depthwise.inputs[1].values.shape == (4, 1, 1, 1)
        assert convs["conv"].inputs[1].name == "conv.weight"
        got = run_model(model.to_onnx(), feeds)["logits"]
        assert rel_err(got, run_model(proto, feeds)["logits"]) <= 1e-5


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_bn_fed_by_non_conv_becomes_a_depthwise_conv(rank):
    """DenseNet's BN after a Concat, a pre-activation BN after a Relu: x·s + (β − μ·s) per channel,
    as a depthwise conv with a 1-wide kernel on every spatial axis."""
    inits = bn_params("bn", 3)
    nodes = [helper.make_node("Relu", ["input"], ["x"], name="relu"), bn_node("x", "logits")]
    shape = (3,) + (4, 5, 6)[:rank - 2]
    proto = make_model(nodes, inits, shape)
    model = QModel.from_onnx(proto)
    report = run_pass(model, "fuse_conv_bn", {"mode": "forward"})
    assert report["changed"] == 1 and [n.op for n in model.graph.nodes] == ["Relu", "Conv"]
    conv = model.graph.nodes[1]
    assert conv.attrs == {"group": 3, "kernel_shape": [1] * (rank - 2)}
    feeds = feeds_for(shape)
    assert rel_err(run_model(model.to_onnx(), feeds)["logits"], run_model(proto, feeds)["logits"]) <= 1e-5


def test_bn_of_unknown_rank_is_left_with_both_reasons():
    inits = bn_params("bn", 3)
    nodes = [helper.make_node("Relu", ["input"], ["x"], name="relu"), bn_node("x", "logits")]
    proto = make_model(nodes, inits, (3, 4, 4))
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    model = QModel.from_onnx(proto)
    report = run_pass(model, "fuse_conv_bn")
    assert report["changed"] == 0 and report["skipped"] == [{"node": "bn", "reason": (
        "its input 'x' is produced by Relu 'relu', not Conv/ConvTranspose/Gemm/MatMul; not a depthwise conv "
        "of its own either: its input 'x' has rank unknown, not 3-5 (N, C, spatial)")}]


def test_weight_given_as_graph_input_leaves_the_conv_and_converts_the_bn():
    nodes, inits = _conv_bn_nodes(extra_reader=False)
    inits = [i for i in inits if i.name != "conv.weight"]
    extra = [helper.make_tensor_value_info("conv.weight", TensorProto.FLOAT, [4, 3, 3, 3])]
    model = QModel.from_onnx(make_model(nodes, inits, (3, 5, 5), extra_inputs=extra))
    report = run_pass(model, "fuse_conv_bn")
    assert report["fused"] == [] and len(report["standalone_as_conv"]) == 1


def test_nothing_to_do_is_a_report():
    inits = [w("conv.weight", (4, 3, 3, 3))]
    nodes = [helper.make_node("Conv", ["input", "conv.weight"], ["logits"], name="conv")]
    model = QModel.from_onnx(make_model(nodes, inits, (3, 5, 5)))
    report = run_pass(model, "fuse_conv_bn")
    assert report["changed"] == 0 and report["skipped"] == []
    assert report["summary"] == "nothing to do: the model has no BatchNormalization"


@pytest.mark.parametrize("bad", ["bn.var", "conv.weight"])
def test_nan_is_an_error_naming_the_tensor(bad):
    nodes, inits = _conv_bn_nodes(extra_reader=False)
    for init in inits:
        if init.name == bad:
            values = numpy_helper.to_array(init).copy()
            values.flat[1] = np.nan
            init.CopyFrom(numpy_helper.from_array(values, bad))
    model = QModel.from_onnx(make_model(nodes, inits, (3, 5, 5)))
    with pytest.raises(PassError, match=f"'{bad}'.*NaN"):
        run_pass(model, "fuse_conv_bn")


def test_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="'mode' must be one of 'fold', 'forward'"):
        run_pass(QModel.from_onnx(make_small_cnn()), "fuse_conv_bn", {"mode": "fused"})


# -- bundled models ----------------------------------------------------------------------------

def randomize_bn(model: QModel, seed: int) -> int:
    """Random non-trivial γ, β, μ, σ² on every BN, so that folding is actually tested."""
    rng = np.random.default_rng(seed)
    count = 0
    for node in model.graph.nodes:
        if node.op != "BatchNormalization":
            continue
        c = node.inputs[1].values.size
        values = [rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c), rng.normal(0, 0.3, c),
                  rng.normal(0, 0.3, c), rng.uniform(0.2, 2.0, c)]
        for tensor, value in zip(node.inputs[1:5], values):
            tensor.values = value.astype(np.float32)
        count += 1
    return count


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "repvgg"])
def test_bundled_models_both_modes(name):
    builders = pytest.importorskip("qgraph.models.builders")
    proto = builders.build_model(name)
    try:
        from qgraph.models.datasets import load_dataset
        feeds = {"input": load_dataset("mnist", "val")["input"][:32]}
    except ImportError:
        pytest.skip("qgraph.models.datasets not available yet")
    model = QModel.from_onnx(proto if isinstance(proto, onnx.ModelProto) else proto.to_onnx())
    run_pass(model, "canonicalize")
    if randomize_bn(model, seed=len(name)) == 0:
        pytest.skip(f"{name} has no BatchNormalization")
    randomized = model.to_onnx()
    models = run_both_modes(randomized, feeds)
    forward = models["forward"][0]
    run_pass(forward, "canonicalize")
    assert not any("/bn_fuse/" in n.name for n in forward.graph.nodes)
    fold_out = run_model(models["fold"][0].to_onnx(), feeds)["logits"]
    assert rel_err(run_model(forward.to_onnx(), feeds)["logits"], fold_out) <= 1e-6
    for _, report in models.values():
        # RepVGG's identity-branch BNs (fed by the previous block's Relu) become depthwise convs
        assert report["skipped"] == []
        assert bool(report["standalone_as_conv"]) == (name == "repvgg")


def test_fold_keeps_names_of_unshared_weights_and_copies_shared_ones():
    inits = [w("conv.weight", (3, 3, 1, 1)), w("conv.bias", (3,))] + bn_params("bn", 3)
    nodes = [helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["x"], name="conv"),
             bn_node("x", "y"),
             helper.make_node("Conv", ["y", "conv.weight"], ["logits"], name="other")]
    proto = make_model(nodes, inits, (3, 4, 4))
    model = QModel.from_onnx(proto)
    ref = run_model(proto, feeds_for((3, 4, 4)))["logits"]
    run_pass(model, "fuse_conv_bn")
    conv, other = (next(n for n in model.graph.nodes if n.name == k) for k in ("conv", "other"))
    assert [t.name for t in conv.inputs[1:]] == ["conv.weight_folded", "conv.bias"]
    assert other.inputs[1].name == "conv.weight"  # the shared weight is untouched
    assert rel_err(run_model(model.to_onnx(), feeds_for((3, 4, 4)))["logits"], ref) <= 1e-5
