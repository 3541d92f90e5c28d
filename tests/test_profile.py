"""profile: ORT latency and ORT's own per-op profile of a float model and its lowered form,
grouped by op type, with qgraph's roles of the nodes; no file left behind."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qgraph.cli import main
from qgraph.graph import QModel
from qgraph.lowering import lower_model
from qgraph.models.builders import build_model
from qgraph.models.datasets import load_dataset
from qgraph.pipeline import PassContext, run_pass
from qgraph.profile import node_roles, profile_models


@pytest.fixture(scope="module")
def val():
    return {k: v[:16] for k, v in load_dataset("mnist", "val").items()}


@pytest.fixture(scope="module")
def models(val):
    model = QModel.from_onnx(build_model("lenet"))
    run_pass(model, "canonicalize")
    run_pass(model, "fuse_conv_bn", {"mode": "fold"})
    float_model = model.to_onnx()
    ctx = PassContext(data={"input": val["input"]})
    run_pass(model, "insert_qdq", {}, ctx)
    run_pass(model, "calibrate", {"progress": False}, ctx)
    qdq = model.to_onnx()
    return {"float": float_model, "qdq": qdq, "qlinear": lower_model(qdq, "qlinear")[0],
            "integer": lower_model(qdq, "integer")[0]}


def test_float_and_lowered_side_by_side(models, val):
    report = profile_models([(models["float"], "float"), (models["qlinear"], "qlinear")], val, batch_size=4,
                            repeats=3, profile_runs=3)
    assert [m.label for m in report.models] == ["float", "qlinear"]
    for m in report.models:
        assert [x.batch for x in m.latency] == [1, 4] and m.profiled_batch == 4
        assert all(0 < x.p10_ms <= x.median_ms <= x.p90_ms for x in m.latency)
        assert sum(o.share for o in m.ops) == pytest.approx(1.0)
        assert sum(o.ms for o in m.ops) == pytest.approx(sum(n.ms for n in m.top))
        assert [n.ms for n in m.top] == sorted((n.ms for n in m.top), reverse=True)
    lowered = {o.op: o for o in report.models[1].ops}
    assert "QLinearConv" in lowered and set(lowered["QLinearConv"].roles) == {"integer compute"}
    # lenet's qlinear form requantizes its ReLUs through float (DequantizeLinear -> Relu -> QuantizeLinear)
    assert set(lowered["QuantizeLinear"].roles) == {"boundary quantizer", "float island"}
    assert "float island" in lowered["DequantizeLinear"].roles and "lower -v" in lowered["QuantizeLinear"].hint
    float_ops = {o.op: o for o in report.models[0].ops}
    assert "QLinearConv" not in float_ops and any(r == "float compute" for o in float_ops.values() for r in o.roles)
    table = report.format_table(top=2)
    assert table.startswith("latency: ORT") and "what qgraph could change" in table
    assert "top nodes of qlinear:" in table and "QLinearConv" in table
    json.dumps(report.as_dict())


def test_integer_target_costs_are_named_as_generic_requantization(models, val):
    report = profile_models([(models["integer"], "integer")], val, batch_size=2, repeats=2, profile_runs=2)
    roles = {r for o in report.models[0].ops for r in o.roles}
    assert {"integer compute", "integer requantization"} <= roles
    # requantization as int32 (acc·p + r) / q (quant.division_steps; int64 BitShift steps where it does not fit)
    div = next(o for o in report.models[0].ops if o.op == "Div")
    assert set(div.roles) == {"integer requantization"} and "integer requantization" in div.hint


def _graph(nodes, inits, inputs=("x",), dtype=TensorProto.FLOAT):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, dtype, ["N", 4]) for i in inputs],
                              [helper.make_empty_tensor_value_info(nodes[-1].output[0])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_roles_of_islands_tables_and_qdq_weights():
    s, z = np.float32(0.1), np.uint8(128)
    table = np.arange(256, dtype=np.uint8)[::-1].copy()
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_in"),
             helper.make_node("MatMulInteger", ["q", "w", "z", "wz"], ["acc"], name="mm"),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="to_float"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq_mid"),
             helper.make_node("Softmax", ["d"], ["sm"], name="softmax"),
             helper.make_node("QuantizeLinear", ["sm", "s", "z"], ["q2"], name="q_mid"),
             helper.make_node("Cast", ["q2"], ["idx"], to=TensorProto.INT64, name="lut_index"),
             helper.make_node("Gather", ["table", "idx"], ["t"], name="lut"),
             helper.make_node("Transpose", ["wt"], ["wtt"], name="weight_t"),
             helper.make_node("DequantizeLinear", ["t", "s", "z"], ["y"], name="dq_out")]
    model = _graph(nodes, {"s": s, "z": z, "w": np.ones((4, 4), np.uint8), "wz": np.uint8(0), "table": table,
                           "wt": np.ones((4, 4), np.float32)})
    roles = node_roles(model)
    assert roles["q_in"] == "boundary quantizer" and roles["dq_out"] == "boundary quantizer"
    assert roles["mm"] == "integer compute"
    assert roles["dq_mid"] == roles["softmax"] == roles["q_mid"] == "float island"
    assert roles["lut_index"] == roles["lut"] == "lookup table"
    assert roles["weight_t"] == "constant transpose"
    qdq = _graph([helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], name="wq"),
                  helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="wd"),
                  helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")],
                 {"s": s, "z": z, "w": np.ones((4, 4), np.float32)})
    roles = node_roles(qdq)
    assert roles["wq"] == roles["wd"] == "weight Q/DQ" and roles["mm"] == "QDQ float op"


def test_a_unary_float_activation_is_not_a_float_island():
    """DQ -> HardSwish -> Q on one code tensor (the qlinear lowering's HardSwish) is a float
    activation; DQ -> Softmax -> Q too by its shape, but a float op that also reads another tensor
    makes the whole detour a float island."""
    s, z = np.float32(0.1), np.uint8(128)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_in"),
             helper.make_node("MatMulInteger", ["q", "w", "z", "wz"], ["acc"], name="mm"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq_act"),
             helper.make_node("HardSwish", ["d"], ["h"], name="hswish"),
             helper.make_node("QuantizeLinear", ["h", "s", "z"], ["qh"], name="q_act"),
             helper.make_node("DequantizeLinear", ["qh", "s", "z"], ["d2"], name="dq_mix"),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="to_float"),
             helper.make_node("Add", ["d2", "accf"], ["sum"], name="mixed"),
             helper.make_node("QuantizeLinear", ["sum", "s", "z"], ["q2"], name="q_mix"),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"], name="dq_out")]
    model = _graph(nodes, {"s": s, "z": z, "w": np.ones((4, 4), np.uint8), "wz": np.uint8(0)})
    roles = node_roles(model)
    assert roles["dq_act"] == roles["hswish"] == roles["q_act"] == "float activation"
    assert roles["dq_mix"] == roles["mixed"] == roles["q_mix"] == "float island"


def test_ops_moved_onto_codes_are_integer_compute():
    """A lowered MaxPool and Resize (1.5x: no Expand form) run on uint8 codes: integer compute."""
    s, z = np.float32(0.05), np.uint8(10)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_in"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
             helper.make_node("MaxPool", ["d"], ["p"], name="pool", kernel_shape=[2, 2]),
             helper.make_node("Resize", ["p", "", "scales"], ["r"], name="up", mode="nearest"),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q2"], name="q_out"),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"], name="dq_out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in
                               {"s": s, "z": z, "scales": np.array([1, 1, 1.5, 1.5], np.float32)}.items()])
    qdq = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    lowered, _ = lower_model(qdq, "qlinear")
    roles = {n.op_type: node_roles(lowered)[n.name] for n in lowered.graph.node if n.op_type in ("MaxPool", "Resize")}
    assert roles == {"MaxPool": "integer compute", "Resize": "integer compute"}
    assert node_roles(qdq)["pool"] == "QDQ float op"


def test_cli_profile_writes_only_its_json(models, val, tmp_path, monkeypatch):
    onnx.save(models["float"], str(tmp_path / "float.onnx"))
    onnx.save(models["qlinear"], str(tmp_path / "q.onnx"))
    np.savez(tmp_path / "val.npz", **val)
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    temp_before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("qgraph-profile-")}
    result = CliRunner().invoke(main, ["profile", "q.onnx", "--against", "float.onnx", "--data", "val.npz",
                                       "--batch-size", "4", "--repeats", "2", "--json", "p.json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert set(os.listdir(tmp_path)) == before | {"p.json"}
    assert {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("qgraph-profile-")} == temp_before
    report = json.loads((tmp_path / "p.json").read_text())
    assert [m["model"] for m in report["models"]] == ["float.onnx", "q.onnx"]
    assert "batch 4" in result.stdout and "x" in result.stdout.splitlines()[3]   # ratio to the reference


def test_fixed_batch_model_runs_at_its_batch(models, val):
    fixed = onnx.ModelProto()
    fixed.CopyFrom(models["float"])
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    fixed.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    report = profile_models([(fixed, "fixed")], val, batch_size=8, repeats=2, profile_runs=2)
    assert [x.batch for x in report.models[0].latency] == [2] and report.models[0].profiled_batch == 2


def test_integer_tables_fed_by_a_requantization_are_lookup_tables():
    """The integer target's tables read a requantization's int32 codes without a Cast
    (integer.skip_narrowing_casts): still a lookup table, as qlinear's Cast-fed ones."""
    s, z = np.float32(0.05), np.uint8(128)
    w = np.random.default_rng(0).normal(size=(4, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_in"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], name="wq"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="wd"),
             helper.make_node("Conv", ["d", "wd"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="q_conv"),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"], name="dq_conv"),
             helper.make_node("Sigmoid", ["cd"], ["sg"], name="sigmoid"),
             helper.make_node("QuantizeLinear", ["sg", "s2", "z2"], ["q2"], name="q_out"),
             helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["y"], name="dq_out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in
                               {"s": s, "z": z, "w": w, "ws": np.float32(np.abs(w).max() / 127), "wz": np.int8(0),
                                "s2": np.float32(1 / 255), "z2": np.uint8(0)}.items()])
    qdq = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    lowered, _ = lower_model(qdq, "integer")
    roles = node_roles(lowered)
    tables = [n for n in lowered.graph.node if n.op_type in ("Gather", "GatherElements")]
    assert tables and all(roles[n.name] == "lookup table" for n in tables)


@pytest.mark.parametrize("channels, role", [(24, "depthwise off-block"), (32, "integer compute"),
                                            (8, "integer compute")])
def test_depthwise_qlinearconv_off_a_block_of_16_channels_is_named(channels, role):
    """A depthwise QLinearConv the qlinear lowering would pad (a QOperator model from another tool)
    is named for what it costs in ORT; whole blocks, or a single block, are plain integer compute."""
    w = np.ones((channels, 1, 3, 3), np.int8)
    inputs = {"xs": np.float32(0.1), "xz": np.uint8(128), "w": w, "ws": np.full(channels, 0.01, np.float32),
              "wz": np.zeros(channels, np.int8), "ys": np.float32(0.1), "yz": np.uint8(128)}
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="dw",
                            group=channels, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, channels, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(v, k) for k, v in inputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert node_roles(model)["dw"] == role
