"""insert_qdq on the bundled models: valid ORT models, one quantizer per tensor, rules, marks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import quantized_producers
from qgraph.annotations import CALIBRATED, NONNEGATIVE, get_annotation
from qgraph.errors import ConfigError, PassError
from qgraph.graph import QModel
from qgraph.models.builders import build_model
from qgraph.models.datasets import load_dataset
from qgraph.annotations import QUANT_ALIASES as ALIASES, read_quantizers
from qgraph.pipeline import PassContext, run_pass
from qgraph.quant import qrange
from qgraph.runner import run_model

MODELS = ("lenet", "resnet", "mobilenetv2", "mlp")


@pytest.fixture(scope="module")
def images():
    return load_dataset("mnist", "val")["input"][:16]


@pytest.fixture(scope="module")
def prepared():
    """Float models after canonicalize → fuse_conv_bn(fold) → ahead_relu, as ModelProtos."""
    out = {}
    for name in MODELS:
        m = QModel.from_onnx(build_model(name))
        for p, kw in (("canonicalize", {}), ("fuse_conv_bn", {"mode": "fold"}), ("ahead_relu", {})):
            run_pass(m, p, kw)
        out[name] = m.to_onnx()
    return out


def _quantize(proto, **params):
    m = QModel.from_onnx(proto)
    report = run_pass(m, "insert_qdq", params)
    return m, report


def _dq_fed(model: QModel, tensor) -> bool:
    return bool(tensor.inputs) and tensor.inputs[0].op == "DequantizeLinear"


def _through_aliases(model: QModel, tensor):
    """Follow range-preserving ops back to the tensor a DQ produced."""
    while tensor.inputs and tensor.inputs[0].op in ("MaxPool", "Flatten", "Reshape", "Transpose", "Relu", "Clip"):
        tensor = tensor.inputs[0].inputs[0]
    return tensor


@pytest.mark.parametrize("name", MODELS)
def test_every_quantizable_op_reads_quantized_tensors_and_model_runs(name, prepared, images):
    m, report = _quantize(prepared[name])
    records = read_quantizers(m)
    qs = [n for n in m.graph.nodes if n.op == "QuantizeLinear"]
    # one quantizer per tensor: as many Q nodes as records, each on a different tensor
    assert len(qs) == len(records) == report["changed"]
    sources = [q.inputs[0].name for q in qs]
    assert len(set(sources)) == len(sources)
    for node in m.graph.nodes:
        if node.op in ("Conv", "Gemm"):
            assert _dq_fed(m, node.inputs[1]), f"{node.name} weight is not quantized"
            assert _dq_fed(m, _through_aliases(m, node.inputs[0])), f"{node.name} input is not quantized"
            if len(node.inputs) > 2:
                assert not _dq_fed(m, node.inputs[2]), "biases stay float"
        if node.op == "Add":
            assert all(_dq_fed(m, _through_aliases(m, t)) for t in node.inputs)
    for q in qs:
        assert q.inputs[0].name in records
    assert get_annotation(m, CALIBRATED) is False and "uncalibrated" in report["summary"]
    out = run_model(m.to_onnx(), {"input": images})["logits"]
    ref = run_model(prepared[name], {"input": images})["logits"]
    assert out.shape == ref.shape and np.all(np.isfinite(out))


def test_nonnegative_marks_give_zero_point_zero_and_relu_shares_the_quantizer(prepared):
    proto = prepared["lenet"]
    marked = set(get_annotation(proto, NONNEGATIVE))
    m, report = _quantize(proto)
    records = read_quantizers(m)
    aliases = get_annotation(m, ALIASES)
    nodes = {n.name: n for n in m.graph.nodes}
    nonneg = [t for t, r in records.items() if r.nonnegative]
    assert nonneg and set(nonneg) <= marked
    for t in nonneg:
        q = nodes[records[t].quantize]
        assert q.inputs[2].values.dtype == np.uint8 and int(q.inputs[2].values) == 0
        assert (records[t].qmin, records[t].qmax) == (0, 255)
    relus = [n for n in m.graph.nodes if n.op == "Relu"]
    for relu in relus:  # DQ → Relu, and the Relu's output is an alias of the pair's float tensor
        dq = relu.inputs[0].inputs[0]
        assert dq.op == "DequantizeLinear"
        assert aliases[relu.outputs[0].name] == dq.inputs[0].inputs[0].inputs[0].name
    # no quantizer on any Relu output: the Relu sits between the pair and the next op
    assert not any(r.outputs[0].name in records for r in relus)
    # int8 storage of non-negative tensors: zp 0, int8, negative half unused
    m8, _ = _quantize(proto, activations={"nonnegative_storage": "int8"})
    rec8 = read_quantizers(m8)
    assert all(rec8[t].signed and rec8[t].symmetric for t in nonneg)


def test_rule_priority_on_a_real_model(prepared):
    proto = prepared["resnet"]
    rules = [
        {"op_type": "Conv", "weights": {"bits": 4}},
        {"regex": "stage2\\..*", "weights": {"bits": 5}},
        {"name": "stage2.block0.conv1", "weights": {"bits": 6}},
    ]
    m, report = _quantize(proto, weights={"bits": 7}, rules=rules)
    bits = {r.node: r.bits for r in read_quantizers(m).values() if r.kind == "weight"}
    assert bits["stage2.block0.conv1"] == 6
    assert bits["stage2.block0.conv2"] == 5
    assert bits["stage3.block0.conv1"] == 4
    assert bits["head.fc"] == 7
    assert report["warnings"] == []


def test_skip_leaves_the_node_float_and_unmatched_rule_warns(prepared, images):
    proto = prepared["lenet"]
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    m, report = _quantize(proto, rules=[{"name": conv.name, "skip": True}, {"name": "nope", "skip": True}])
    node = next(n for n in m.graph.nodes if n.name == conv.name)
    assert not _dq_fed(m, node.inputs[1]) and not _dq_fed(m, node.inputs[0])
    assert {"node": conv.name, "reason": "a rule says skip: true"} in report["skipped"]
    assert any("'nope'" in w for w in report["warnings"])
    run_model(m.to_onnx(), {"input": images})


def test_the_head_writes_float_and_rules_keep_inputs_float(prepared, images):
    """No integer op reads the logits, so the head computes on integers but writes float
    (what a deployment compiler does); quantize_input: false keeps a node's inputs float."""
    proto = prepared["mlp"]
    head = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
    m, report = _quantize(proto)
    assert m.graph.outputs[0].name == "logits" and m.graph.outputs[0].inputs[0].op == "Gemm"
    assert report["placement"]["logits"] == "not quantized: a graph output no integer op reads"
    node = next(n for n in m.graph.nodes if n.name == head.name)
    source = node.inputs[0].name                      # a Relu output: its quantizer sits on the Relu input
    assert _dq_fed(m, node.inputs[1]) and source in get_annotation(m, ALIASES)
    m2, report2 = _quantize(proto, rules=[{"name": head.name, "quantize_input": False}])
    node = next(n for n in m2.graph.nodes if n.name == head.name)
    assert _dq_fed(m2, node.inputs[1]) and source not in (get_annotation(m2, ALIASES) or {})
    assert len(read_quantizers(m2)) < len(read_quantizers(m))
    run_model(m.to_onnx(), {"input": images})
    run_model(m2.to_onnx(), {"input": images})


def test_four_bit_weights_stay_in_their_range(prepared, images):
    proto = prepared["lenet"]
    m, _ = _quantize(proto, weights={"bits": 4})
    records = read_quantizers(m)
    weights = {t: r for t, r in records.items() if r.kind == "weight"}
    qmin, qmax = qrange(4, True, True)
    outs = [f"{t}_quantized" for t in weights]
    values = run_model(m.to_onnx(), {"input": images}, outs)
    for t, r in weights.items():
        assert (r.qmin, r.qmax) == (qmin, qmax) == (-7, 7)
        q = values[f"{t}_quantized"]
        assert q.dtype == np.int8 and q.min() >= qmin and q.max() <= qmax
        assert q.max() == qmax or q.min() == qmin  # the range is used


def test_sub_8_bit_activations_get_a_clip(prepared, images):
    m, _ = _quantize(prepared["mlp"], activations={"bits": 4})
    records = read_quantizers(m)
    acts = [r for r in records.values() if r.kind == "activation"]
    assert acts and all(r.clip for r in acts)
    nodes = {n.name: n for n in m.graph.nodes}
    outs = [nodes[r.quantize].outputs[0].name for r in acts]
    values = run_model(m.to_onnx(), {"input": images * 5}, outs)  # beyond the default range
    for r, name in zip(acts, outs):
        assert values[name].min() >= r.qmin and values[name].max() <= r.qmax


def test_forward_fused_weight_is_quantized_where_it_is_computed(images):
    m = QModel.from_onnx(build_model("resnet"))
    run_pass(m, "canonicalize")
    run_pass(m, "fuse_conv_bn", {"mode": "forward"})
    fused = get_annotation(m, "forward_fused_bn")
    folded = QModel.from_onnx(build_model("resnet"))
    run_pass(folded, "fuse_conv_bn", {"mode": "fold"})
    run_pass(m, "insert_qdq")
    records = read_quantizers(m)
    nodes = {n.name: n for n in m.graph.nodes}
    conv = next(n for n in m.graph.nodes if n.op == "Conv" and n.name in fused)
    dq = conv.inputs[1].inputs[0]
    assert dq.op == "DequantizeLinear"
    w_tensor = dq.inputs[0].inputs[0].inputs[0]
    assert w_tensor.inputs and w_tensor.inputs[0].op != "QuantizeLinear"  # computed in-graph
    record = records[w_tensor.name]
    assert record.kind == "weight" and record.axis == 0
    # the in-graph weight arithmetic (γ/√(σ²+ε), W·s, bias) is not quantized: one pair per layer
    assert sum(r.kind == "weight" for r in records.values()) == 10
    assert all(r.node in {n.name for n in m.graph.nodes if n.op in ("Conv", "Gemm")} for r in records.values()
               if r.kind == "weight")
    w_fold = next(n for n in folded.graph.nodes if n.name == conv.name).inputs[1].values
    expected = np.abs(w_fold).reshape(len(w_fold), -1).max(1) / 127
    np.testing.assert_allclose(nodes[record.quantize].inputs[1].values, expected, rtol=1e-5)
    run_model(m.to_onnx(), {"input": images})


def test_bad_input(prepared):
    with pytest.raises(ConfigError, match="bits must be an integer >= 2 and <= 8"):
        _quantize(prepared["mlp"], weights={"bits": 9})
    with pytest.raises(ConfigError, match="bits must be an integer >= 2 and <= 8"):
        _quantize(prepared["mlp"], rules=[{"op_type": "Gemm", "activations": {"bits": 1}}])
    with pytest.raises(ConfigError, match="must be a list"):
        _quantize(prepared["mlp"], rules={"op_type": "Gemm"})
    m, _ = _quantize(prepared["mlp"])
    with pytest.raises(PassError, match="already has"):
        run_pass(m, "insert_qdq")


def test_model_without_quantizable_ops_is_reported_not_an_error():
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Softmax", ["input"], ["logits"], name="sm")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m, report = _quantize(proto)
    assert report["changed"] == 0 and not [n for n in m.graph.nodes if n.op == "QuantizeLinear"]
    onnx.checker.check_model(m.to_onnx())


def _conv_silu_conv(seed: int = 0) -> onnx.ModelProto:
    """input → Conv → SiLU as exported (x · Sigmoid(x)) → Conv → logits."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.2, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["sig"], name="sigmoid"),
             helper.make_node("Mul", ["c1", "sig"], ["silu"], name="silu"),
             helper.make_node("Conv", ["silu", "w2"], ["logits"], name="conv2")]
    graph = helper.make_graph(nodes, "conv_silu", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_split_silu_quantizes_the_sigmoid_as_ort_does_and_lowers_to_its_qlinear_pair():
    """split_regions: [silu] gives σ(x) its own quantizer (one more than SiLU as one activation),
    the Mul reads two quantized tensors, and the qlinear target then runs the SiLU as ORT's
    QLinearSigmoid → QLinearMul with no table; the lowered model matches the interpreter bit for bit."""
    from qgraph.lowering import lower_model
    x = np.random.default_rng(1).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    models = {}
    for split in ([], ["silu"]):
        m, report = _quantize(_conv_silu_conv(), split_regions=split)
        run_pass(m, "calibrate", {"progress": False}, PassContext(data={"input": x}))
        models[bool(split)] = (m.to_onnx(), report)
    (whole, whole_report), (split, split_report) = models[False], models[True]
    assert split_report["activations"] == whole_report["activations"] + 1
    assert "sig" in read_quantizers(QModel.from_onnx(split)) and "sig" not in read_quantizers(QModel.from_onnx(whole))
    assert split_report["unary_regions"] == {"sigmoid": 1} and whole_report["unary_regions"] == {"silu": 1}
    lowered, report = lower_model(split, "qlinear")
    ops = [n.op_type for n in lowered.graph.node]
    assert ops.count("QLinearSigmoid") == 1 and ops.count("QLinearMul") == 1
    assert "GatherElements" not in ops and "DequantizeLinear" not in ops[:-1]
    out = run_model(lowered, {"input": x})["logits"]
    np.testing.assert_allclose(out, run_model(split, {"input": x})["logits"], atol=0.05)
    from qgraph.interp import run as interp_run
    np.testing.assert_array_equal(interp_run(lowered, {"input": x})["logits"], out)
    table_ops = [n.op_type for n in lower_model(whole, "qlinear")[0].graph.node]
    assert "GatherElements" in table_ops and "QLinearSigmoid" not in table_ops


def test_split_regions_names_unknown_kinds():
    with pytest.raises(ConfigError, match="split_regions': unknown kind.* swish; choose from: silu"):
        _quantize(_conv_silu_conv(), split_regions=["swish"])


def _two_branch_two_head_model() -> onnx.ModelProto:
    """Two inputs, each through its own Conv, joined and mixed by a Conv whose weight is computed
    in-graph (a forward-fused BN's Mul), then two heads (Gemm, MatMul) and an attention-style
    MatMul of two activations."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in (
        ("wa", (4, 3, 3, 3)), ("wb", (4, 3, 3, 3)), ("wraw", (4, 8, 1, 1)), ("wscale", (4, 1, 1, 1)),
        ("w1", (5, 256)), ("w2", (256, 6)))]
    nodes = [
        helper.make_node("Conv", ["a", "wa"], ["ya"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ya"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["b", "wb"], ["yb"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["ra", "yb"], ["cat"], name="cat", axis=1),
        helper.make_node("Mul", ["wraw", "wscale"], ["wmid"], name="fold_bn"),
        helper.make_node("Conv", ["cat", "wmid"], ["mid"], name="conv_mid"),
        helper.make_node("Flatten", ["mid"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "w1"], ["out1"], name="head1", transB=1),
        helper.make_node("MatMul", ["flat", "w2"], ["out2"], name="head2"),
        helper.make_node("Transpose", ["flat"], ["flat_t"], name="flat_t"),
        helper.make_node("MatMul", ["flat", "flat_t"], ["gram"], name="gram"),
    ]
    x = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in ("a", "b")]
    y = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("out1", [1, 5]), ("out2", [1, 6]),
                                                                             ("gram", [1, 1]))]
    model = helper.make_model(helper.make_graph(nodes, "branches", x, y, init),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_weighted_positions_follow_the_graph_through_branches_joins_and_heads():
    from qgraph.idioms import constant_tensors
    from qgraph.passes.insert_qdq import weighted_positions
    m = QModel.from_onnx(_two_branch_two_head_model())
    m.cleanup()
    places = weighted_positions(m, constant_tensors(m))
    # the gram MatMul has no constant operand, fold_bn only constants: neither is weighted
    assert places == {"conv_a": {"first"}, "conv_b": {"first"}, "conv_mid": set(),
                      "head1": {"last"}, "head2": {"last"}}


def test_position_rules_keep_the_ends_at_8_bits_and_buy_back_held_out_snr(prepared, images):
    """W4A8 with `position: first` / `last` at 8 bits (as LSQ's low-bit networks and NNCF's 4-bit
    weight compression keep them): the stem and the head get 8-bit grids, every
    other weight 4, and on held-out digits the output is closer to float (measured: lenet +2.0 dB,
    resnet +2.0, mobilenetv2 +4.8, mlp +6.1, 256 calibration / 1,000 held-out digits)."""
    ends = [{"position": "first", "weights": {"bits": 8}}, {"position": "last", "weights": {"bits": 8}}]
    m, report = _quantize(prepared["resnet"], weights={"bits": 4}, rules=ends)
    bits = {r.node: r.bits for r in read_quantizers(m).values() if r.kind == "weight"}
    assert bits.pop("stem.conv") == 8 and bits.pop("head.fc") == 8
    assert set(bits.values()) == {4} and len(bits) >= 6
    assert report["warnings"] == [] and report["positions"] == {"first": ["stem.conv"], "last": ["head.fc"]}

    import yaml
    from qgraph.api import apply_pipeline
    from qgraph.models.builders import build_model
    from qgraph.models.datasets import load_dataset
    calib = {"input": load_dataset("mnist", "train")["input"][:256]}
    held = {"input": load_dataset("mnist", "val")["input"][:500]}
    float_model = build_model("mobilenetv2")
    reference = run_model(float_model, held)["logits"].astype(np.float64)

    def snr(rules) -> float:
        with open(__import__("qgraph.models", fromlist=["x"]).__path__[0] + "/pipelines/ptq.yaml") as f:
            doc = yaml.safe_load(f)
        for step in doc["passes"]:
            if isinstance(step, dict) and "insert_qdq" in step:
                step["insert_qdq"]["rules"] = rules
        out = run_model(apply_pipeline(float_model, doc, calib, weight_bits=4), held)["logits"]
        return float(10 * np.log10((reference ** 2).sum() / ((reference - out) ** 2).sum()))

    assert snr(ends) > snr([]) + 2.0


def _float_model(nodes, inits: dict, x_shape: list, y_shape: list) -> onnx.ModelProto:
    """A float32 model of `nodes` from input x to output y (the initializers as float32)."""
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _quantized_snr_db(model, quantized, x) -> float:
    from qgraph.runner import run_model
    ref, got = run_model(model, {"x": x})["y"], run_model(quantized, {"x": x})["y"]
    return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))


def _log_power_front_end():
    """An audio front end as DNSMOS writes it: frames → two Conv1d filterbanks (real, imaginary)
    → r² + i² → Log(Max(p, 1e-12)) / ln 10 → a Conv1d reading the log-power spectrum."""
    from onnx import helper
    rng = np.random.default_rng(7)
    n = helper.make_node
    nodes = [n("Conv", ["x", "wr"], ["r"]), n("Conv", ["x", "wi"], ["i"]),
             n("Mul", ["r", "r"], ["rr"]), n("Mul", ["i", "i"], ["ii"]), n("Add", ["rr", "ii"], ["p"]),
             n("Max", ["p", "floor"], ["pf"]), n("Log", ["pf"], ["lp"]), n("Div", ["lp", "ln10"], ["db"]),
             n("Conv", ["db", "w2", "b2"], ["y"], kernel_shape=[3], pads=[1, 1])]
    inits = {"wr": rng.normal(0, 0.2, (16, 1, 32)), "wi": rng.normal(0, 0.2, (16, 1, 32)),
             "floor": np.array(1e-12), "ln10": np.array(np.log(10.0)), "w2": rng.normal(0, 0.3, (8, 16, 3)),
             "b2": rng.normal(0, 0.1, 8)}
    return _float_model(nodes, inits, ["N", 1, 256], ["N", 8, 225])


def test_a_log_of_a_power_spectrum_stays_float():
    """Quantized, the power p (spanning decades: quiet and loud frames) reaches the Log as 256
    linear levels and the quiet bins collapse into the lowest; kept float (STEEP_AT_ZERO), only
    the log-power the next Conv reads is quantized."""
    from qgraph.api import apply_pipeline
    model = _log_power_front_end()
    rng = np.random.default_rng(8)
    loudness = 10.0 ** rng.uniform(-1, 0, (96, 1, 1))
    frames = (rng.normal(0, 1, (96, 1, 256)) * loudness).astype(np.float32)
    quantized = apply_pipeline(model, "ptq", {"x": frames[:64]})
    assert quantized_producers(quantized) == {"Div"}   # the log-power only; input x is the graph input
    snr = _quantized_snr_db(model, quantized, frames[64:])
    assert snr > 20, snr                             # -6 dB with the Log on 8-bit codes


def test_a_mel_filterbank_on_a_power_spectrum_before_its_log_stays_float():
    """openwakeword's melspectrogram: power → MatMul (mel filterbank) → Clip(1e-10) → Log. The MatMul
    only feeds the Log: quantizing its input would round the quiet bins the Log needs to zero
    (output cosine 0.81); it runs float, and only the log-mel is quantized where a layer reads it."""
    from onnx import helper
    from qgraph.api import apply_pipeline
    rng = np.random.default_rng(9)
    n = helper.make_node
    nodes = [n("Mul", ["x", "x"], ["p"]), n("MatMul", ["p", "mel"], ["m"]),
             n("Clip", ["m", "lo", ""], ["mc"]), n("Log", ["mc"], ["lm"]), n("Mul", ["lm", "k"], ["db"]),
             n("MatMul", ["db", "w"], ["y"])]
    inits = {"mel": np.abs(rng.normal(0, 0.1, (64, 16))), "lo": np.array(1e-10), "k": np.array(10 / np.log(10)),
             "w": rng.normal(0, 0.3, (16, 4))}
    model = _float_model(nodes, inits, ["N", 64], ["N", 4])
    x = (rng.normal(0, 1, (96, 64)) * 10.0 ** rng.uniform(-2, 0, (96, 1))).astype(np.float32)
    quantized = apply_pipeline(model, "ptq", {"x": x[:64]})
    quantized_inputs = {node.input[0] for node in quantized.graph.node if node.op_type == "QuantizeLinear"}
    assert not {"x", "p", "m"} & quantized_inputs and "db" in quantized_inputs
    assert _quantized_snr_db(model, quantized, x[64:]) > 25
