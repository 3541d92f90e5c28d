"""Google's Magika (a file's content type from its first and last KB), two releases: 1.0.3's model,
JAX exported through jax2tf and tf2onnx, writes its two LayerNorms as moments (``E[x²] − E[x]²``
from ReduceSums, Reshape/Expand back to the input's rank, Reciprocal ∘ Sqrt); 0.5.1's, Keras through
tf2onnx, writes one as ``x·s + (β − E[x]·s)``. Quantized op by op, those statistics cancelled
8-bit noise into the variance: ptq agreed with the float model on 5% (1.0.3) and 93% (0.5.1) of
files; kept float (normal_form.written_out_layernorms), the quantized and both lowered models label
the files as the float model does. Inputs: the bytes of real files, the members of the zoo's pinned
wheels (benchmarks/zoo_models.py: file_corpus)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import zoo_models as zoo  # benchmarks/zoo_models.py (conftest.py puts benchmarks/ on sys.path)
from conftest import quantized_producers, zoo_or_skip
from qgraph.api import run_passes
from qgraph.diff import diff_models
from qgraph.lowering import lower_model
from qgraph.runner import run_model

STATISTICS = ("ReduceSum", "ReduceMean", "Sqrt", "Reciprocal")


RELEASES = {"1.0.3": (zoo.MAGIKA, f"{zoo.MAGIKA_DIR}/model.onnx"),
            "0.5.1": (zoo.MAGIKA_V1, "magika/models/standard_v1/model.onnx")}


def _features(release: str, contents: list[bytes]) -> np.ndarray:
    if release == "0.5.1":
        return np.stack([zoo.magika_v1_features(c) for c in contents])
    config = zoo.magika_config()
    return np.stack([zoo.magika_features(c, config) for c in contents])


@pytest.fixture(scope="module", params=list(RELEASES))
def prepared(request, tmp_path_factory):
    """(float model path, quantized model, evaluation features, evaluation data path, all features)."""
    _, contents = zoo_or_skip(zoo.file_corpus)
    wheel, member = RELEASES[request.param]
    source = zoo_or_skip(lambda: zoo.wheel_member(wheel, member))
    features = _features(request.param, contents)
    folder = tmp_path_factory.mktemp("magika")
    np.savez(folder / "calib.npz", bytes=features[:32])
    np.savez(folder / "eval.npz", bytes=features[32:])
    run_passes(source, "ptq", folder / "q.onnx", data_path=str(folder / "calib.npz"), echo=lambda *_: None)
    return source, onnx.load(folder / "q.onnx"), features[32:], str(folder / "eval.npz"), features


def _labels(model, features) -> np.ndarray:
    return next(iter(run_model(model, {"bytes": features}).values())).argmax(axis=1)


def test_magika_layernorm_statistics_stay_float(prepared):
    _, quantized, _, _, _ = prepared
    quantized_from = quantized_producers(quantized)
    assert quantized_from and not quantized_from & set(STATISTICS)
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) >= 3   # the Dense layers (and conv)


def test_magika_labels_survive_int8_in_both_targets(prepared):
    """Top-1 content type against the float model's, file by file (55 and 54 of 55; before, 0.051
    and 0.927)."""
    source, quantized, features, data, _ = prepared
    reference = _labels(onnx.load(source), features)
    assert len(reference) >= 40
    assert np.mean(_labels(quantized, features) == reference) >= 0.95
    assert diff_models(quantized, data).passed
    for target in ("qlinear", "integer"):
        lowered, report = lower_model(quantized, target)
        assert "0 left float" in report["summary"]
        assert np.mean(_labels(lowered, features) == reference) >= 0.95
        assert diff_models(lowered, data).passed


def test_magika_trains_by_distillation(prepared, tmp_path):
    """QAT without labels on real JAX and Keras exports: their GlobalMaxPool and ReduceMax have no
    gradient in ORT 1.19 (rewritten as MaxPool and TopK for training, restored in the output), the
    JAX softmax stabilizer's -inf constant is a frozen parameter, not a divergence, and the Keras
    OneHot's [off, on] values are no parameter either (ORT has no gradient for them)."""
    from qgraph.api import apply_pipeline
    from qgraph.train import train_model
    source, _, features, _, corpus = prepared
    teacher = onnx.load(source)
    student = apply_pipeline(teacher, "qat", {"bytes": corpus[:32]})
    trained, history = train_model(student, {"bytes": corpus[:32]}, {"bytes": features}, teacher=teacher, epochs=2,
                                   lr=1e-4, batch_size=8, workdir=tmp_path, progress=False, keep_best=True,
                                   keep_best_by="cosine")
    assert [h["epoch"] for h in history] == [0, 1, 2]
    kept = [h for h in history if h.get("kept")]
    assert len(kept) == 1 and kept[0]["val_cosine"] == max(h["val_cosine"] for h in history)
    ops = {n.op_type for n in trained.graph.node}
    assert "ReduceMax" in ops and not {"TopK", "MaxPool"} & ops
    reference = _labels(teacher, features)
    assert np.mean(_labels(trained, features) == reference) >= 0.95
