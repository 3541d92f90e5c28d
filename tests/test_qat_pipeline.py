"""models/pipelines/qat.yaml end to end: float model -> prepared QDQ -> QAT -> exported QDQ in ORT.

A small ResNet (Conv-BN stem, two BasicBlocks, width 8) is trained in float on the bundled
8x8 digits, prepared with the bundled qat.yaml (forward-fused BN, calibrated int8, frozen
activation scales) and trained as QAT; W4A8 uses the same pipeline with 4-bit weights.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import paired_margin
from qgraph.annotations import get_annotation, read_quantizers
from qgraph.api import apply_pipeline
from qgraph import fakequant
from qgraph.fakequant import to_training_form
from qgraph.graph import QModel
from qgraph.models.builders import build_model
from qgraph.models.datasets import load_dataset
from qgraph.pipeline import run_pass
from qgraph.quant import quantize
from qgraph.runner import Runner
from qgraph.train import evaluate_training_engine, train_model

STATS = ("running_mean", "running_var")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "val")


@pytest.fixture(scope="module")
def float_resnet(digits, tmp_path_factory):
    train, val = digits
    model = build_model("resnet", input_shape=(1, 8, 8), width=8, blocks=(1, 1), num_classes=10, seed=0)
    trained, history = train_model(model, train, val, epochs=4, lr=1e-2, batch_size=32, progress=False,
                                   workdir=tmp_path_factory.mktemp("float"))
    assert history[-1]["val_top1"] > 0.9
    return trained


def prepare(model: onnx.ModelProto, calib: dict, weight_bits: int = 8) -> onnx.ModelProto:
    """Run the bundled qat.yaml (optionally with other weight bits) on `model`."""
    return apply_pipeline(model, "qat", {"input": calib["input"]}, weight_bits=weight_bits)


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return Runner(model).run({"input": x})["logits"]


def top1(model: onnx.ModelProto, data: dict) -> float:
    return float((logits(model, data["input"]).argmax(1) == data["labels"]).mean())


def params(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def weight_codes(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each weight quantizer's integer codes as its QuantizeLinear computes them (storage range)."""
    records = {name: r for name, r in read_quantizers(model).items() if r.kind == "weight"}
    values = params(model)
    computed = [name for name in records if name not in values]
    if computed:  # forward-fused weights: evaluate the in-graph BN arithmetic
        values.update(Runner(model, computed, optimize=False).run(
            {"input": np.zeros((1, 1, 8, 8), np.float32)}, computed))
    return {name: quantize(values[name], values[r.scale], values[r.zero_point], -128, 127, axis=r.axis)
            for name, r in records.items()}


@pytest.fixture(scope="module")
def prepared(float_resnet, digits):
    return prepare(float_resnet, {"input": digits[0]["input"][:512]})


def test_qat_yaml_quantizes_the_folded_weights_and_stays_close_to_float(float_resnet, prepared, digits):
    _, val = digits
    records = read_quantizers(prepared)
    fused = get_annotation(prepared, "forward_fused_bn")
    assert len(fused) == sum(n.op_type == "BatchNormalization" for n in float_resnet.graph.node) == 6
    weights = {name for name, r in records.items() if r.kind == "weight"}
    assert weights == {e["folded_weight"] for e in fused.values()} | {"head.fc.weight"}
    # BN arithmetic stays float; every weight quantizer is per channel, 8 bit, symmetric narrow
    producers = {o: n for n in prepared.graph.node for o in n.output}
    q_inputs = [n.input[0] for n in prepared.graph.node if n.op_type == "QuantizeLinear"]
    assert not any("/bn_fuse/" in producers[x].name for x in q_inputs if x in producers and x not in weights)
    assert all((records[w].qmin, records[w].qmax, records[w].per_channel) == (-127, 127, True)
               for w in weights)
    assert get_annotation(prepared, "fix_activations") is True and get_annotation(prepared, "calibrated") is True

    expected, got = logits(float_resnet, val["input"]), logits(prepared, val["input"])
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98
    assert abs(top1(prepared, val) - top1(float_resnet, val)) <= paired_margin(got.argmax(1), expected.argmax(1))


def test_qat_keeps_ptq_accuracy_and_exports_standard_qdq_that_ort_runs(prepared, digits, tmp_path):
    train, val = digits
    ptq = top1(prepared, val)
    trained, history = train_model(prepared, train, val, epochs=1, lr=1e-3, batch_size=32, progress=False,
                                   workdir=tmp_path)
    before, after = logits(prepared, val["input"]).argmax(1), logits(trained, val["input"]).argmax(1)
    assert history[0]["val_top1"] >= ptq - paired_margin(after, before), "W4A8 QAT lost accuracy against PTQ"

    # standard QDQ: the prepared model's nodes (forward-fused BN kept), no FakeQuant, trained weights
    assert sorted(n.name for n in trained.graph.node) == sorted(n.name for n in prepared.graph.node)
    assert all(n.domain in ("", "ai.onnx") for n in trained.graph.node)
    onnx.checker.check_model(trained, full_check=True)
    engine = evaluate_training_engine(tmp_path, {"input": val["input"]})
    np.testing.assert_allclose(logits(trained, val["input"]), engine, rtol=1e-5, atol=1e-5)
    assert top1(trained, val) == pytest.approx(history[0]["val_top1"])

    # forward-fused BN: W, gamma, beta trained, running statistics and activation scales frozen
    before, after = params(prepared), params(trained)
    for entry in get_annotation(prepared, "forward_fused_bn").values():
        for key in ("weight", "gamma", "beta"):
            assert not np.array_equal(before[entry[key]], after[entry[key]]), entry[key]
        for key in ("mean", "var"):
            np.testing.assert_array_equal(before[entry[key]], after[entry[key]])
    for r in read_quantizers(prepared).values():
        if r.kind == "activation":
            np.testing.assert_array_equal(before[r.scale], after[r.scale])

    # constant folding (what lowering starts with) turns the BN arithmetic into plain weights
    folded = QModel.from_onnx(trained)
    run_pass(folded, "canonicalize", {})
    folded = folded.to_onnx()
    assert not any(n.op_type in ("Sqrt", "Div") for n in folded.graph.node)
    np.testing.assert_allclose(logits(folded, val["input"]), engine, rtol=1e-4, atol=1e-4)


def test_w4a8_qat_trains_on_the_4_bit_grid_and_exports_weights_inside_it(float_resnet, digits, tmp_path,
                                                                          monkeypatch):
    train, val = digits
    prepared = prepare(float_resnet, {"input": train["input"][:512]}, weight_bits=4)
    _, info = to_training_form(prepared)
    weight_pairs = [r for r in info.pairs if r["weight"]]
    assert weight_pairs and all((r["qmin"], r["qmax"], r["bits"]) == (-7, 7, 4) for r in weight_pairs)
    assert all((r["qmin"], r["qmax"]) == (0, 255) for r in info.pairs if not r["weight"])

    clamped = []  # training pushes edge weights past the grid; export must clamp them back onto it
    clamp = fakequant.clamp_narrow_weights
    monkeypatch.setattr(fakequant, "clamp_narrow_weights", lambda m, i: clamped.extend(clamp(m, i)) or clamped)
    ptq = top1(prepared, val)
    trained, history = train_model(prepared, train, val, epochs=1, lr=3e-3, batch_size=32, progress=False,
                                   workdir=tmp_path)
    before, after = logits(prepared, val["input"]).argmax(1), logits(trained, val["input"]).argmax(1)
    assert history[0]["val_top1"] >= ptq - paired_margin(after, before), "W4A8 QAT lost accuracy against PTQ"
    assert any(name.endswith("weight_fused") for name in clamped)
    codes = weight_codes(trained)
    assert all(c.min() >= -7 and c.max() <= 7 for c in codes.values())
    assert any(np.abs(c).max() == 7 for c in codes.values())
    engine = evaluate_training_engine(tmp_path, {"input": val["input"]})
    np.testing.assert_allclose(logits(trained, val["input"]), engine, rtol=1e-4, atol=1e-4)
