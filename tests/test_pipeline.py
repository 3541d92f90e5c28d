import numpy as np
import pytest

from conftest import small_data
from qgraph.errors import ConfigError, PassError
from qgraph.graph import QModel
from qgraph.pipeline import (PassContext, PassSpec, _PASSES, all_passes, get_pass, parse_pipeline,
                             run_pass, run_pipeline, validate_params)


def test_registry_lists_passes_with_params():
    passes = all_passes()
    assert "canonicalize" in passes
    assert passes["canonicalize"].params == {"fold_constants": True, "remove_identity": True, "exporter_idioms": True}
    assert passes["canonicalize"].preserves_outputs


def test_unknown_pass_suggests_nearest():
    with pytest.raises(ConfigError, match="unknown pass 'canonicalise'.*did you mean 'canonicalize'"):
        get_pass("canonicalise")


def test_bad_parameter_lists_valid_ones():
    spec = get_pass("canonicalize")
    with pytest.raises(ConfigError, match="no parameter 'fold_constant'.*did you mean 'fold_constants'.*valid:"):
        validate_params(spec, {"fold_constant": False})
    with pytest.raises(ConfigError, match="'fold_constants' must be true or false"):
        validate_params(spec, {"fold_constants": "yes"})


def test_yaml_forms_and_errors():
    pipe = parse_pipeline("data: calib.npz\nseed: 3\npasses:\n  - canonicalize: {fold_constants: false}\n")
    assert pipe.steps == [("canonicalize", {"fold_constants": False})] and pipe.seed == 3
    assert parse_pipeline("- canonicalize\n").steps == [("canonicalize", {})]
    with pytest.raises(ConfigError, match="line 2: YAML syntax error"):
        parse_pipeline("passes:\n\t- canonicalize\n")
    with pytest.raises(ConfigError, match="unknown top-level key 'pases'"):
        parse_pipeline("pases: []\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_pipeline("passes:\n  - canonicalize: 3\n")


def _scale_output(model, ctx, *, factor: float = 2.0):
    """Test pass that claims to preserve outputs but does not."""
    fc = model.node("fc")
    weight = fc.inputs[1]
    weight.values = weight.values * factor
    return {"changed": 1, "summary": "scaled"}


def test_verify_names_the_pass_that_broke_outputs(monkeypatch, small_cnn):
    monkeypatch.setitem(_PASSES, "scale_output", PassSpec("scale_output", _scale_output, True, 1e-4,
                                                          {"factor": 2.0}))
    pipe = parse_pipeline("passes: [canonicalize, scale_output]")
    model = QModel.from_onnx(small_cnn)
    with pytest.raises(PassError, match="pass 'scale_output' changed output 'logits' by relative"):
        run_pipeline(model, pipe, PassContext(data=small_data()), verify=True)


def test_verify_passes_and_reports(small_cnn):
    seen = []
    model = QModel.from_onnx(small_cnn)
    reports = run_pipeline(model, parse_pipeline("[canonicalize]"), PassContext(), verify=True,
                           on_step=seen.append)
    assert seen == reports and reports[0].verified is not None and reports[0].verified < 1e-5
    assert "canonicalize" in reports[0].line() and reports[0].as_dict()["removed"] == 2


def test_pass_without_data_says_what_to_do():
    with pytest.raises(PassError, match="--data"):
        next(PassContext().batches(["input"]))


def test_canonicalize_removes_identity_dropout_and_folds(small_cnn):
    model = QModel.from_onnx(small_cnn)
    report = run_pass(model, "canonicalize")
    ops = [n.op for n in model.graph.nodes]
    assert "Identity" not in ops and "Dropout" not in ops
    assert report["removed"] == 2
    x = {"input": small_data()["input"]}
    from qgraph.runner import run_model
    np.testing.assert_allclose(run_model(model, x)["logits"], run_model(small_cnn, x)["logits"], rtol=1e-6)


def test_canonicalize_makes_reshape_shapes_static_where_dims_are_known():
    import onnx
    from onnx import TensorProto, helper
    from qgraph.runner import run_model
    nodes = [
        helper.make_node("Shape", ["input"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["channels"], name="gather", axis=0),
        helper.make_node("Concat", ["minus_one", "channels"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["input", "target"], ["logits"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["M", 6])],
        [onnx.numpy_helper.from_array(np.array([1], np.int64), "one"),
         onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus_one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    qmodel = QModel.from_onnx(model)
    run_pass(qmodel, "canonicalize")
    assert [n.op for n in qmodel.graph.nodes] == ["Reshape"]
    assert qmodel.constant_value(qmodel.graph.nodes[0].inputs[1]).tolist() == [-1, 6]
    x = {"input": np.arange(12, dtype=np.float32).reshape(2, 6)}
    np.testing.assert_array_equal(run_model(qmodel, x)["logits"], x["input"])


def test_canonicalize_gives_a_contradicted_output_declaration_the_computed_shape(tmp_path):
    """An exporter declared an output [1, seqlen] that is [T, 1, C] (ddddocr's CRNN does): once
    folding makes the reshape static, ONNX's checker refuses the declaration, so canonicalize
    takes the computed shape and says so."""
    import onnx
    from click.testing import CliRunner
    from onnx import TensorProto, helper
    from qgraph.cli import main
    from qgraph.runner import run_model
    # the batch part of the target is a Slice whose end is computed (2 // 2), so before folding
    # inference cannot tell the target's length, and the checker lets the declaration pass
    nodes = [helper.make_node("Shape", ["input"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "one"], ["two"], name="gather", axis=0),
             helper.make_node("Div", ["two", "two_"], ["end"], name="half"),
             helper.make_node("Slice", ["shape", "zero", "end"], ["batch"], name="batch"),
             helper.make_node("Concat", ["batch", "one", "minus_one"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["input", "target"], ["seq"], name="reshape"),
             helper.make_node("Relu", ["seq"], ["logits"], name="relu")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [5, 2, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seqlen"])],
        [onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
         onnx.numpy_helper.from_array(np.array([1], np.int64), "one"),
         onnx.numpy_helper.from_array(np.array([2], np.int64), "two_"),
         onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus_one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    qmodel = QModel.from_onnx(model)
    report = run_pass(qmodel, "canonicalize")
    assert report["warnings"] == ["declared shape of 'logits' [1, 'seqlen'] contradicts the computed [5, 1, 6]; "
                                  "declared [5, 1, 6] instead"]
    x = {"input": np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(qmodel, x)["logits"], run_model(model, x)["logits"])
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    result = CliRunner().invoke(main, ["passes", "run", str(source), "--pipeline", "float", "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert [d.dim_value for d in written.graph.output[0].type.tensor_type.shape.dim] == [5, 1, 6]


def test_canonicalize_turns_torch_view_reshape_into_flatten():
    """PyTorch's x.view(x.size(0), -1) with a dynamic batch: Shape->Gather->Unsqueeze->Concat->Reshape."""
    from pathlib import Path

    import onnx
    from qgraph.runner import run_model
    model = onnx.load(Path(__file__).parent / "fixtures" / "torch_cnn_view.onnx")
    qmodel = QModel.from_onnx(model)
    report = run_pass(qmodel, "canonicalize")
    ops = [n.op for n in qmodel.graph.nodes]
    assert report["flattened"] == 1 and "Shape" not in ops and "Reshape" not in ops and "Flatten" in ops
    x = {"input": np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)}
    np.testing.assert_allclose(run_model(qmodel, x)["logits"], run_model(model, x)["logits"], rtol=1e-5, atol=1e-5)


def test_canonicalize_unties_batchnorm_parameters_shared_by_torch_export(small_cnn):
    # torch.onnx merges equal initializers: an untrained BN's var equals its gamma (all ones)
    bn = next(n for n in small_cnn.graph.node if n.op_type == "BatchNormalization")
    bn.input[4] = bn.input[1]
    model = QModel.from_onnx(small_cnn)
    report = run_pass(model, "canonicalize")
    node = model.node("bn1")
    assert report["untied"] == 1 and node.inputs[4] is not node.inputs[1]
    np.testing.assert_array_equal(node.inputs[4].values, node.inputs[1].values)
