import numpy as np
import networkx as nx

from conftest import small_data
from qgraph.annotations import all_annotations, get_annotation, set_annotation
from qgraph.graph import QModel
from qgraph.runner import Runner, run_model


def test_round_trip_preserves_outputs_and_metadata(small_cnn):
    set_annotation(small_cnn, "nonnegative", ["r1"])
    model = QModel.from_onnx(small_cnn)
    assert get_annotation(model, "nonnegative") == ["r1"]
    out = model.to_onnx()
    assert get_annotation(out, "nonnegative") == ["r1"]
    x = {"input": small_data()["input"]}
    np.testing.assert_array_equal(run_model(out, x)["logits"], run_model(small_cnn, x)["logits"])


def test_producer_consumers_and_constants(small_cnn):
    model = QModel.from_onnx(small_cnn)
    tensors = model.tensors()
    assert model.producer(tensors["c1"]).name == "conv1"
    assert [n.name for n in model.consumers(tensors["c1"])] == ["bn1"]
    assert model.only_consumer(tensors["c1"]).name == "bn1"
    assert model.only_consumer(tensors["logits"]) is None  # graph output
    assert model.constant_value(tensors["conv2.weight"]).shape == (6, 4, 3, 3)
    assert model.constant_value(tensors["c1"]) is None


def test_nx_view_is_the_dataflow(small_cnn):
    view = QModel.from_onnx(small_cnn).nx_view()
    assert nx.is_directed_acyclic_graph(view)
    assert nx.shortest_path(view, "conv1", "fc") == ["conv1", "bn1", "relu1", "identity", "conv2", "dropout",
                                                      "gap", "flatten", "fc"]
    assert view.edges["conv1", "bn1"]["tensor"] == "c1"


def test_bypass_and_unique_names(small_cnn):
    model = QModel.from_onnx(small_cnn)
    model.bypass(model.node("identity"))
    assert model.unique_name("conv1") == "conv1_1"
    assert model.unique_name("fresh") == "fresh"
    out = model.to_onnx()
    assert "Identity" not in [n.op_type for n in out.graph.node]
    x = {"input": small_data()["input"]}
    np.testing.assert_array_equal(run_model(out, x)["logits"], run_model(small_cnn, x)["logits"])


def test_annotations_remove_and_list(small_cnn):
    set_annotation(small_cnn, "calibrated", True)
    set_annotation(small_cnn, "user_note", {"a": 1})
    assert all_annotations(small_cnn) == {"calibrated": True, "user_note": {"a": 1}}
    set_annotation(small_cnn, "calibrated", None)
    assert all_annotations(small_cnn) == {"user_note": {"a": 1}}


def test_runner_returns_intermediates_streamed(small_cnn):
    data = small_data(10)
    runner = Runner(small_cnn, ["c1", "r1"])
    parts = list(runner.run_batches(data, batch_size=4, outputs=["logits", "r1"]))
    assert [p["r1"].shape[0] for p in parts] == [4, 4, 2]
    assert all((p["r1"] >= 0).all() for p in parts)
    whole = runner.run({"input": data["input"]})
    np.testing.assert_allclose(np.concatenate([p["logits"] for p in parts]), whole["logits"], rtol=1e-6)
    assert set(whole) == {"logits", "c1", "r1"}


def test_top1_accuracy_counts_argmax_hits_across_batches(small_cnn):
    from qgraph.runner import top1_accuracy
    data = small_data(23)
    predicted = run_model(small_cnn, {"input": data["input"]})["logits"].argmax(1)
    labels = predicted.copy()
    labels[:5] = (labels[:5] + 1) % 3
    assert top1_accuracy(small_cnn, {"input": data["input"], "labels": labels}, batch_size=4) == 18 / 23


def test_toposort_keeps_gs_order_and_needs_no_recursion(small_cnn):
    """The same order as gs.Graph.toposort (levels, ties in search order) on a shuffled graph, and a
    chain far deeper than Python's recursion limit listed backwards (lowered models append every
    new node at the end) sorts without RecursionError."""
    import random
    import sys

    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper

    ours, theirs = gs.import_onnx(small_cnn), gs.import_onnx(small_cnn)
    order = list(range(len(ours.nodes)))
    random.Random(0).shuffle(order)
    ours.nodes = [ours.nodes[i] for i in order]
    theirs.nodes = [theirs.nodes[i] for i in order]
    theirs.toposort()
    model = QModel(ours)
    model.toposort()
    assert [n.name for n in model.graph.nodes] == [n.name for n in theirs.nodes]

    depth = 3 * sys.getrecursionlimit()
    nodes = [helper.make_node("Neg", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(depth)]
    graph = helper.make_graph(nodes[::-1], "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(f"t{depth}", TensorProto.FLOAT, [1])])
    chain = QModel(gs.import_onnx(helper.make_model(graph)))
    chain.cleanup()
    assert [n.name for n in chain.graph.nodes] == [f"n{i}" for i in range(depth)]
