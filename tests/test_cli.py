import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qgraph.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def pipeline_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("passes:\n  - canonicalize: {}\n")
    return path


def test_passes_run_writes_model_and_report(tmp_path, small_cnn_file, pipeline_file, small_data_file):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("passes", "run", small_cnn_file, "--pipeline", pipeline_file, "-o", out,
                    "--data", small_data_file, "--verify", "--report", report)
    assert result.exit_code == 0, result.output
    assert "canonicalize" in result.output and "verified" in result.output
    assert [n.op_type for n in onnx.load(out).graph.node].count("Identity") == 0
    rows = json.loads(report.read_text())["passes"]
    assert rows[0]["pass"] == "canonicalize" and rows[0]["removed"] == 2


def _bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("passes:\n\t- canonicalize\n")
    return path


def _unknown_pass(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_text("passes: [fuse_everything]\n")
    return path


def _bad_param(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("passes:\n  - canonicalize: {fold: true}\n")
    return path


def _noise_model(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    return path


def _truncated_model(tmp_path):
    src = (tmp_path / "small.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(src[: len(src) // 3])
    return path


def _checker_failure(tmp_path):
    model = onnx.load(tmp_path / "small.onnx")
    model.graph.node[0].input[0] = "ghost"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    return path


def _wrong_data(tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, pixels=np.zeros((2, 1, 8, 8), np.float32))
    return path


@pytest.mark.parametrize("case, message", [
    ("missing_model", "no such model file"),
    ("noise", "noise.onnx"),
    ("truncated", "cut.onnx"),
    ("checker", "fails the ONNX checker"),
    ("unknown_pass", "unknown pass 'fuse_everything'"),
    ("bad_param", "no parameter 'fold'"),
    ("bad_yaml", "YAML syntax error"),
    ("output_is_input", "would overwrite the model file"),
    ("missing_dir", "does not exist"),
    ("unwritable", "cannot write|not writable"),
    ("wrong_data", "missing input 'input'"),
])
def test_bad_input_is_one_line_exit_2_no_output(tmp_path, small_cnn_file, pipeline_file, case, message):
    model, pipeline, out, extra = small_cnn_file, pipeline_file, tmp_path / "out.onnx", []
    if case == "missing_model":
        model = tmp_path / "absent.onnx"
    elif case == "noise":
        model = _noise_model(tmp_path)
    elif case == "truncated":
        model = _truncated_model(tmp_path)
    elif case == "checker":
        model = _checker_failure(tmp_path)
    elif case == "unknown_pass":
        pipeline = _unknown_pass(tmp_path)
    elif case == "bad_param":
        pipeline = _bad_param(tmp_path)
    elif case == "bad_yaml":
        pipeline = _bad_yaml(tmp_path)
    elif case == "output_is_input":
        out = model
    elif case == "missing_dir":
        out = tmp_path / "no" / "out.onnx"
    elif case == "unwritable":
        out = "/proc/qgraph-out.onnx"
    elif case == "wrong_data":
        extra = ["--data", _wrong_data(tmp_path)]
    before = small_cnn_file.read_bytes()
    result = invoke("passes", "run", model, "--pipeline", pipeline, "-o", out, *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
    assert small_cnn_file.read_bytes() == before
    if case != "output_is_input":
        assert not (tmp_path / "out.onnx").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_inspect_shows_ops_and_qdq(tmp_path, small_cnn_file):
    result = invoke("inspect", small_cnn_file)
    assert result.exit_code == 0
    assert "Conv 2" in result.output and "QDQ pairs: none" in result.output
    info = json.loads(invoke("inspect", small_cnn_file, "--json").output)
    assert info["opset"] == 17 and info["inputs"][0]["shape"] == ["N", 1, 8, 8]
    assert info["parameters"] == 4 * 9 + 4 + 16 + 6 * 4 * 9 + 18 + 3


def test_passes_list_and_help():
    result = invoke("passes", "list")
    assert result.exit_code == 0 and "canonicalize" in result.output and "fold_constants: true" in result.output
    for command in (["passes", "run"], ["inspect"], ["passes", "list"]):
        help_text = invoke(*command, "--help").output
        assert "Example:" in help_text


def test_train_command_writes_model_history_and_checkpoints(tmp_path, small_cnn_file, small_data_file):
    out = tmp_path / "trained.onnx"
    result = invoke("train", small_cnn_file, "--data", small_data_file, "--val", small_data_file,
                    "--epochs", 2, "--batch-size", 8, "--quiet", "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "epoch 2:" in result.output and out.exists()
    history = json.loads((tmp_path / "trained.onnx.work" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    trained = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    original = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(small_cnn_file).graph.initializer}
    assert not np.array_equal(trained["fc.weight"], original["fc.weight"])


def test_train_keep_best_by_cosine_keeps_the_epoch_closest_to_the_teacher(tmp_path, small_cnn_file, small_data_file):
    student = tmp_path / "ptq.onnx"
    assert invoke("passes", "run", small_cnn_file, "--pipeline", "ptq", "--data", small_data_file,
                  "-o", student).exit_code == 0
    out = tmp_path / "distilled.onnx"
    result = invoke("train", student, "--teacher", small_cnn_file, "--data", small_data_file, "--val",
                    small_data_file, "--epochs", 2, "--batch-size", 8, "--quiet", "--keep-best-by", "cosine",
                    "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    history = json.loads((tmp_path / "distilled.onnx.work" / "history.json").read_text())
    best = max(history, key=lambda row: row["val_cosine"])["epoch"]
    assert [row["kept"] for row in history] == [row["epoch"] == best for row in history]
    assert f"kept epoch {best} (highest val cosine)" in result.output and out.exists()


def test_train_without_labels_is_refused(tmp_path, small_cnn_file):
    data = tmp_path / "nolabels.npz"
    np.savez(data, input=np.zeros((4, 1, 8, 8), np.float32))
    result = invoke("train", small_cnn_file, "--data", data, "-o", tmp_path / "t.onnx")
    assert result.exit_code == 2 and "labels" in result.stderr and not (tmp_path / "t.onnx").exists()


def test_inspect_lists_qdq_pairs_and_annotations_of_a_ptq_model(tmp_path, small_cnn_file, small_data_file):
    out = tmp_path / "ptq.onnx"
    result = invoke("passes", "run", small_cnn_file, "--pipeline", "ptq", "--data",
                    small_data_file, "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    info = json.loads(invoke("inspect", out, "--json").output)
    weights = [p for p in info["qdq_pairs"] if p["weight"]]
    assert {p["tensor"] for p in weights} >= {"conv1.weight", "conv2.weight", "fc.weight"}
    assert all(p["storage"] == "int8" and p["per_channel"] for p in weights)
    assert info["annotations"]["calibrated"] is True
    text = invoke("inspect", out).output
    assert f"QDQ pairs: {len(info['qdq_pairs'])} ({len(weights)} weights" in text


def test_inspect_counts_forward_fused_weights_and_lowered_ops(tmp_path, small_cnn_file, small_data_file):
    prepared, lowered = tmp_path / "prepared.onnx", tmp_path / "low.onnx"
    assert invoke("passes", "run", small_cnn_file, "--pipeline", "qat", "--data", small_data_file,
                  "-o", prepared).exit_code == 0
    info = json.loads(invoke("inspect", prepared, "--json").output)
    weights = {p["tensor"] for p in info["qdq_pairs"] if p["weight"]}
    assert "conv1.weight_fused" in weights and "conv2.weight" in weights  # computed in-graph, still a weight
    assert invoke("lower", prepared, "--target", "qlinear", "-o", lowered).exit_code == 0
    text = invoke("inspect", lowered).output
    assert "integer ops (a lowered model)" in text and "float model" not in text


def test_pass_warnings_are_shown_without_verbose(tmp_path, small_cnn_file, small_data_file):
    pipeline = tmp_path / "w.yaml"
    pipeline.write_text("passes:\n  - insert_qdq: {rules: [{name: no_such_node, skip: true}]}\n")
    result = invoke("passes", "run", small_cnn_file, "--pipeline", pipeline, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0 and "warning:" in result.output and "no_such_node" in result.output


def test_lowering_an_uncalibrated_model_warns(tmp_path, small_cnn_file):
    pipeline = tmp_path / "q.yaml"
    pipeline.write_text("passes: [canonicalize, insert_qdq]\n")
    assert invoke("passes", "run", small_cnn_file, "--pipeline", pipeline, "-o", tmp_path / "q.onnx").exit_code == 0
    result = invoke("lower", tmp_path / "q.onnx", "-o", tmp_path / "low.onnx")
    assert result.exit_code == 0 and "never calibrated" in result.stderr


def test_a_bundled_pipeline_name_wins_over_a_folder_of_that_name(tmp_path, small_cnn_file, small_data_file,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ptq").mkdir()
    result = invoke("passes", "run", small_cnn_file, "--pipeline", "ptq", "--data", small_data_file,
                    "-o", tmp_path / "q.onnx")
    assert result.exit_code == 0, result.stderr
    assert "calibrate" in result.output


def test_a_failed_train_leaves_no_work_folder(tmp_path, small_cnn_file, small_data_file):
    """Regression: OUTPUT.work/ (with artifacts/) stayed after every train error past data loading."""
    result = invoke("train", small_cnn_file, "--data", small_data_file, "--quiet", "--lr", "1e6", "--epochs", "5",
                    "--batch-size", "2", "--optimizer", "sgd", "--momentum", "0", "-o", tmp_path / "t.onnx")
    assert result.exit_code == 2 and "training loss is" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "small.onnx"]


def test_a_misspelled_quantizer_key_is_one_error_line_naming_it(tmp_path, small_cnn_file, small_data_file):
    ptq = tmp_path / "ptq.onnx"
    assert invoke("passes", "run", small_cnn_file, "--pipeline", "ptq", "--data", small_data_file,
                  "-o", ptq).exit_code == 0
    model = onnx.load(ptq)
    props = {p.key: p for p in model.metadata_props}
    records = json.loads(props["qgraph.quantizers"].value)
    first = next(iter(records))
    records[first]["zero_piont"] = records[first].pop("zero_point")
    props["qgraph.quantizers"].value = json.dumps(records)
    onnx.save(model, tmp_path / "typo.onnx")
    for command in (["lower", tmp_path / "typo.onnx", "-o", tmp_path / "low.onnx"],
                    ["train", tmp_path / "typo.onnx", "--data", small_data_file, "-o", tmp_path / "t.onnx"],
                    ["inspect", tmp_path / "typo.onnx"]):
        result = invoke(*command)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert f"record of tensor '{first}' has an unknown field 'zero_piont' (did you mean 'zero_point'?)" in lines[0]
