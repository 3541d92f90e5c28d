"""End to end: `qgraph demo --quick` runs the whole chain and its table tells the truth."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from conftest import paired_margin
from qgraph.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    return out, result.output, json.loads((out / "results.json").read_text())


def test_every_stage_file_loads_in_ort(demo_run):
    out, _, result = demo_run
    for name in ("model", "float", "ptq", "prepared", "trained", "ptq.qlinear", "ptq.integer",
                 "trained.qlinear", "trained.integer"):
        ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    assert {row["file"] for row in result["rows"]} <= {p.name for p in out.iterdir()}


def _predictions(out, name: str, val) -> np.ndarray:
    session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": val["input"]})[0].argmax(1)


def test_quantized_accuracy_within_thresholds_of_float(demo_run):
    """Accuracies are compared on the same val images with the sign-test margin (conftest.
    paired_margin), so a difference the images cannot resolve never fails, and a real loss does."""
    out, _, result = demo_run
    top1 = {row["stage"]: row["top1"] for row in result["rows"]}
    files = {row["stage"]: row["file"] for row in result["rows"]}
    assert top1["float"] > 0.7, "float training did not learn"
    with np.load(out / "val.npz") as stored:
        val = {k: stored[k] for k in stored.files}
    pred = {stage: _predictions(out, files[stage], val) for stage in files}
    for stage in files:   # the table's numbers are these predictions' accuracies
        assert np.mean(pred[stage] == val["labels"]) == pytest.approx(top1[stage], abs=1e-4)
    qat, ptq, flt = "qat int8 (QDQ)", "ptq int8 (QDQ)", "float"
    assert top1[qat] >= top1[flt] - paired_margin(pred[qat], pred[flt]), "QAT lost accuracy against float"
    assert top1[ptq] >= top1[flt] - 0.02, "int8 PTQ lost more than 2 points"
    for target in ("qlinear", "integer"):
        # lowering reproduces the QDQ model up to requantization rounding
        lowered = f"qat int8 lowered {target}"
        assert abs(top1[lowered] - top1[qat]) <= paired_margin(pred[lowered], pred[qat])


def test_lowered_models_are_bit_exact_with_the_interpreter(demo_run):
    _, _, result = demo_run
    lowered = [row for row in result["rows"] if "lowered" in row["stage"]]
    assert len(lowered) == 4 and all(row["bit_exact"] is True for row in lowered)


def test_printed_table_equals_json(demo_run):
    out, printed, result = demo_run
    for row in result["rows"]:
        line = next(line for line in printed.splitlines() if line.startswith(row["stage"] + " "))
        cells = line[len(row["stage"]):].split()
        assert float(cells[0]) == pytest.approx(row["top1"], abs=5e-5)
        assert int(cells[2]) == row["bytes"]
        assert float(cells[3]) == pytest.approx(row["latency_ms"], abs=5e-4)
    assert (out / "report.md").read_text().count("lowered") >= 4
