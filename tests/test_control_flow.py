"""Models with control flow (If), as TorchScript and the dynamo exporter write them: a branch on a
static shape (folded and inlined by canonicalize, graphsurgeon's own flattening lost every branch
output but the first), a branch on an input (`--fix-input`), bodies reading the enclosing graph's
constants (opset 18 downgrade), and the message when every layer sits inside a body."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qgraph.api import run_passes
from qgraph.cli import main
from qgraph.diff import diff_models
from qgraph.errors import ModelError
from qgraph.graph import QModel
from qgraph.lowering import lower_model
from qgraph.model_io import fix_inputs, load_model
from qgraph.opset_downgrade import downgrade
from qgraph.pipeline import run_pass

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _init(name, shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _branch(name, nodes, outputs, shape):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, F, shape) for o in outputs])


def _ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def shape_dispatch_model() -> onnx.ModelProto:
    """conv → If(dim0(h) == 1): (Squeeze(h)+Relu, h·2 via a nested If on dim1(h) == 6) else
    (Identity, Identity) → conv on each output. Both conditions fold for a batch of 1."""
    shape = [1, 6, 16]
    inner = [_branch("inner_then", [helper.make_node("Mul", ["h", "two"], ["h2"])], ["h2"], shape),
             _branch("inner_else", [helper.make_node("Identity", ["h"], ["h2e"])], ["h2e"], shape)]
    then_branch = _branch("then", [
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Shape", ["h"], ["hs"]),
        helper.make_node("Gather", ["hs", "one_i"], ["c1"], axis=0),
        helper.make_node("Equal", ["c1", "six"], ["is6"]),
        helper.make_node("If", ["is6"], ["hn"], then_branch=inner[0], else_branch=inner[1]),
    ], ["hr", "hn"], shape)
    else_branch = _branch("else", [helper.make_node("Identity", ["h"], ["ha"]),
                                   helper.make_node("Identity", ["h"], ["hb"])], ["ha", "hb"], shape)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1]),
        helper.make_node("Shape", ["h"], ["s"]),
        helper.make_node("Gather", ["s", "zero_i"], ["n"], axis=0),
        helper.make_node("Equal", ["n", "one_i"], ["single"]),
        helper.make_node("If", ["single"], ["p", "q"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Conv", ["p", "w2"], ["y1"]),
        helper.make_node("Conv", ["q", "w3"], ["y2"]),
    ]
    inits = [_init("w1", (6, 4, 3)), _init("b1", (6,)), _init("w2", (3, 6, 1)), _init("w3", (2, 6, 1)),
             numpy_helper.from_array(np.array(0, np.int64), "zero_i"), numpy_helper.from_array(np.array(1, np.int64), "one_i"),
             numpy_helper.from_array(np.array(6, np.int64), "six"), numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    graph = helper.make_graph(nodes, "shape_dispatch", [helper.make_tensor_value_info("x", F, [1, 4, 16])],
                              [helper.make_tensor_value_info("y1", F, [1, 3, 16]), helper.make_tensor_value_info("y2", F, [1, 2, 16])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_canonicalize_inlines_ifs_whose_condition_folds_keeping_every_output():
    model = shape_dispatch_model()
    x = RNG.standard_normal((1, 4, 16)).astype(np.float32)
    expected = _ort(model, {"x": x})
    q = QModel.from_onnx(model)
    report = run_pass(q, "canonicalize", {})
    assert report["ifs_inlined"] == 2            # the outer If and the one nested in its branch
    assert report["folded"] >= 0                 # the branches' nodes joining are not counted as folding
    assert not [n for n in q.graph.nodes if n.op == "If"]
    out = q.to_onnx()
    onnx.checker.check_model(out)
    for a, b in zip(expected, _ort(out, {"x": x})):
        np.testing.assert_array_equal(a, b)


def test_inlining_keeps_identities_when_asked_to():
    model = shape_dispatch_model()
    x = RNG.standard_normal((1, 4, 16)).astype(np.float32)
    q = QModel.from_onnx(model)
    report = run_pass(q, "canonicalize", {"remove_identity": False})
    assert report["ifs_inlined"] == 2 and report["removed"] == 0
    assert [n.op for n in q.graph.nodes].count("Identity") == 3     # one per inlined If output
    for a, b in zip(_ort(model, {"x": x}), _ort(q.to_onnx(), {"x": x})):
        np.testing.assert_array_equal(a, b)


def test_a_shape_dispatch_model_quantizes_lowers_and_diffs_clean(tmp_path):
    model = shape_dispatch_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "d.npz"
    np.savez(data, x=RNG.standard_normal((8, 4, 16)).astype(np.float32))
    run_passes(path, "ptq", tmp_path / "q.onnx", data_path=str(data), echo=lambda *_: None)
    quantized = onnx.load(tmp_path / "q.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) >= 3
    for target in ("qlinear", "integer"):
        lowered, report = lower_model(quantized, target)
        assert report["float_nodes"] == [] and "0 left float" in report["summary"]
        assert diff_models(lowered, str(data)).passed


def input_dispatch_model() -> onnx.ModelProto:
    """Every layer inside If(sr == 16000), as in Silero VAD's main file: conv+relu with one set of
    weights or another."""
    branches = [_branch(name, [helper.make_node("Conv", ["x", w], [f"c_{name}"], pads=[1, 1]),
                               helper.make_node("Relu", [f"c_{name}"], [f"y_{name}"])], [f"y_{name}"], ["N", 5, 12])
                for name, w in (("then", "w16"), ("else", "w8"))]
    nodes = [helper.make_node("Equal", ["sr", "k16"], ["is16"]),
             helper.make_node("If", ["is16"], ["y"], then_branch=branches[0], else_branch=branches[1])]
    inits = [_init("w16", (5, 3, 3)), _init("w8", (5, 3, 3)), numpy_helper.from_array(np.array(16000, np.int64), "k16")]
    graph = helper.make_graph(nodes, "input_dispatch", [helper.make_tensor_value_info("x", F, ["N", 3, 12]),
                                                         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", F, ["N", 5, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fix_input_folds_a_branch_on_it_and_the_model_quantizes(tmp_path):
    path, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "q.onnx"
    model = input_dispatch_model()
    onnx.save(model, path)
    x = RNG.standard_normal((6, 3, 12)).astype(np.float32)
    np.savez(data, x=x, sr=np.array(16000, np.int64))
    runner = CliRunner()
    refused = runner.invoke(main, ["passes", "run", str(path), "--pipeline", "ptq", "--data", str(data), "-o", str(out)])
    assert refused.exit_code == 2 and not out.exists()
    assert "inside the bodies of control-flow node" in refused.output
    done = runner.invoke(main, ["passes", "run", str(path), "--pipeline", "ptq", "--data", str(data), "-o", str(out),
                                "--fix-input", "sr=16000"])
    assert done.exit_code == 0, done.output
    quantized = onnx.load(out)
    assert [i.name for i in quantized.graph.input] == ["x"]
    assert not [n for n in quantized.graph.node if n.op_type == "If"]
    float_y = _ort(model, {"x": x, "sr": np.array(16000, np.int64)})[0]
    quant_y = _ort(quantized, {"x": x})[0]
    assert np.corrcoef(float_y.ravel(), quant_y.ravel())[0, 1] > 0.99


def test_a_model_whose_layers_are_all_inside_a_body_says_so(tmp_path):
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(input_dispatch_model(), path)
    np.savez(data, x=RNG.standard_normal((4, 3, 12)).astype(np.float32), sr=np.array(8000, np.int64))
    result = CliRunner().invoke(main, ["passes", "run", str(path), "--pipeline", "ptq", "--data", str(data),
                                       "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 2
    assert "inside the bodies of control-flow node '" in result.output
    assert "--fix-input sr=VALUE" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("values, message", [
    ({"rate": "16000"}, "has no input 'rate'; its inputs are ['sr', 'x']"),
    ({"x": "1"}, "is not static"),
    ({"sr": "fast"}, "not a number"),
    ({"sr": "1.5"}, "int64, which cannot hold 1.5"),
])
def test_fix_input_refuses_what_it_cannot_fix(values, message):
    with pytest.raises(ModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fix_inputs(input_dispatch_model(), values)


def test_fix_input_needs_name_equals_value(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(input_dispatch_model(), path)
    result = CliRunner().invoke(main, ["passes", "run", str(path), "--pipeline", "float", "-o", str(tmp_path / "o.onnx"),
                                       "--fix-input", "sr"])
    assert result.exit_code == 2 and "give NAME=VALUE" in result.output


def test_opset_18_bodies_read_the_enclosing_graphs_constants():
    """ReduceMean 18 takes its axes as an input; inside a branch they may be an initializer of the
    main graph (the dynamo exporter writes Silero VAD so)."""
    branch = _branch("then", [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0)], ["m"], [2, 4])
    other = _branch("else", [helper.make_node("ReduceMax", ["x", "axes"], ["mx"], keepdims=0)], ["mx"], [2, 4])
    graph = helper.make_graph(
        [helper.make_node("Greater", ["t", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", F, [2, 3, 4]), helper.make_tensor_value_info("t", F, [])],
        [helper.make_tensor_value_info("y", F, [2, 4])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes"), numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    down = downgrade(model)
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    for t in (1.0, -1.0):
        feeds = {"x": x, "t": np.array(t, np.float32)}
        np.testing.assert_array_equal(_ort(model, feeds)[0], _ort(down, feeds)[0])


def test_load_model_reads_an_opset_18_model_with_bodies(tmp_path):
    model = shape_dispatch_model()
    model.opset_import[0].version = 18
    path = tmp_path / "m18.onnx"
    onnx.save(model, path)
    loaded = load_model(path)
    assert loaded.opset_import[0].version == 17


def test_inspect_counts_the_ops_inside_bodies(tmp_path):
    path = tmp_path / "m.onnx"
    model = input_dispatch_model()
    model.graph.node[1].name = "by_rate"
    onnx.save(model, path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0
    assert "inside by_rate's bodies: Conv 2, Relu 2" in result.output


def test_verify_without_data_on_guessed_sizes_the_model_cannot_take_asks_for_data(tmp_path):
    """--verify without --data runs random inputs, symbolic sizes read as 1; a model that needs
    other sizes (audio chunks of 512 samples, here rows of 3) fails there: one line asking for data."""
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "rows"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", F, ["N", "L"])],
                              [helper.make_tensor_value_info("y", F, [None, 3])],
                              [numpy_helper.from_array(np.array([-1, 3], np.int64), "rows")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(main, ["passes", "run", str(path), "--pipeline", "float", "--verify", "-o", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert "random inputs of sizes guessed from the model: give --data with real inputs to verify on" in result.output
