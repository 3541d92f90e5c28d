"""diff: ORT vs the reference interpreter (and vs another model) per tensor, on real models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import qgraph.interp
from qgraph.diff import TensorStats, diff_models, tensor_grids
from qgraph.errors import DataError
from qgraph.graph import QModel
from qgraph.lowering import lower_model
from qgraph.models.builders import build_model
from qgraph.models.datasets import load_dataset
from qgraph.pipeline import PassContext, run_pass
from qgraph.runner import run_model


@pytest.fixture(scope="module")
def val():
    data = load_dataset("mnist", "val")
    return {k: v[:96] for k, v in data.items()}


@pytest.fixture(scope="module")
def qdq(val):
    model = QModel.from_onnx(build_model("lenet"))
    ctx = PassContext(data={"input": val["input"][:64]})
    for step, params in [("canonicalize", {}), ("fuse_conv_bn", {"mode": "fold"}), ("insert_qdq", {}),
                         ("calibrate", {"progress": False})]:
        run_pass(model, step, params, ctx)
    return model.to_onnx()


@pytest.fixture(scope="module")
def lowered(qdq):
    return {target: lower_model(qdq, target)[0] for target in ("qlinear", "integer")}


@pytest.mark.parametrize("target", ["qlinear", "integer"])
def test_lowered_model_is_bit_exact_per_layer(lowered, qdq, val, target):
    report = diff_models(lowered[target], val, against=qdq, per_layer=True, batch_size=32)
    assert report.bit_exact and report.samples == 96
    interp = report.comparisons[0]
    assert interp.reference == "ort" and interp.other == "interp"
    names = {t.name for t in interp.tensors}
    assert "logits" in names and len(names) > 5  # intermediate tensors too
    assert all(t.exact_rate == 1.0 and t.max_diff == 0 and t.snr_db == float("inf") for t in interp.tensors)
    assert interp.top1_agreement == {"logits": 1.0}
    against = report.comparisons[1]
    shared = {t.name for t in against.tensors}
    assert "logits" in shared and len(shared) > 2  # quantized activations share names with the QDQ model
    logits = next(t for t in against.tensors if t.name == "logits")
    # the head computes on integers and writes float (no integer op reads the logits): the
    # difference to the QDQ model is a few steps of an 8-bit grid over the logits' range
    reference = run_model(qdq, {"input": val["input"]})["logits"]
    step = (reference.max() - min(reference.min(), 0.0)) / 255
    assert logits.unit_name == "abs" and logits.max_diff <= 4.01 * step
    assert logits.cosine > 0.999 and logits.snr_db > 30
    assert against.top1_agreement["logits"] >= 0.98
    assert set(report.accuracy) == {"ort:logits", "interp:logits", "against:logits"}
    table = report.format_table()
    assert "bit-exact" in table and "logits" in table and "SNR dB" in table
    json.dumps(report.as_dict())  # the --json report is plain JSON


def test_interpreter_mismatch_clears_bit_exact(lowered, val, monkeypatch):
    real = qgraph.interp.Plan.run

    def off_by_one(plan, feeds, outputs=None):
        result = real(plan, feeds, outputs)
        result["logits"] = result["logits"] + np.float32(result["logits"].std() * 0.5)
        return result

    monkeypatch.setattr(qgraph.interp.Plan, "run", off_by_one)
    report = diff_models(lowered["integer"], val)
    assert not report.bit_exact
    stats = report.comparisons[0].tensors[0]
    assert stats.exact_rate < 1.0 and stats.max_diff > 0 and np.isfinite(stats.snr_db)
    assert "NOT bit-exact" in report.format_table()


def test_data_from_npz_file_is_checked(lowered, val, tmp_path):
    path = tmp_path / "val.npz"
    np.savez(path, **val)
    assert diff_models(lowered["qlinear"], path).samples == 96
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=val["input"])
    with pytest.raises(DataError, match="missing input 'input'"):
        diff_models(lowered["qlinear"], bad)


def test_stats_units_and_int8_vs_uint8_codes():
    s = TensorStats("t", "float32", unit=0.5)
    s.update(np.array([1.0, 2.0], np.float32), np.array([1.0, 3.0], np.float32))
    assert s.exact_rate == 0.5 and s.max_diff == 2.0  # |3-2| / 0.5
    assert s.snr_db == pytest.approx(10 * np.log10(5.0))
    from qgraph.diff import _accumulate
    stats = {}
    _accumulate(stats, {"q": np.array([-128, 0, 127], np.int8)}, {"q": np.array([0, 128, 255], np.uint8)},
                ["q"], {})
    assert stats["q"].exact  # the integer target stores int8 activations as uint8 + 128


def test_tensor_grids_reads_quantizer_scales(qdq):
    grids = tensor_grids(qdq)
    weights = {i.name for i in qdq.graph.initializer}
    quantized = [n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights]
    assert quantized and all(grids[t][0] > 0 for t in quantized)
    assert "logits" not in grids    # the head writes float
    assert isinstance(qdq, onnx.ModelProto)
