"""Silero VAD (the silero-vad wheel's ONNX exports): a real model with control flow — the main file
puts every layer inside If(sr == 16000), the opset-15 TorchScript export branches on shapes around
its LSTM, the opset-18 dynamo export reads the main graph's constants inside its branches. Each
goes through ptq (``--fix-input sr=16000`` where the layers sit in the If), both lowerings with
no op left float in the quantized region, and `diff` on the QDQ and both lowered models; the
speech decisions stay the float model's on speech-like audio (benchmarks/zoo_models.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import zoo_models as zoo  # benchmarks/zoo_models.py (conftest.py puts benchmarks/ on sys.path)
from conftest import zoo_or_skip
from qgraph.api import run_passes
from qgraph.diff import diff_models
from qgraph.lowering import lower_model

VARIANTS = [("silero_vad.onnx", {"sr": "16000"}), ("silero_vad_16k_op15.onnx", {}),
            ("silero_vad_op18_ifless.onnx", {"sr": "16000"})]


@pytest.fixture(scope="module")
def frames():
    data = zoo_or_skip(lambda: zoo.vad_frames(zoo.speech_like_audio(6.0)))
    order = np.random.default_rng(0).permutation(len(data["input"]))

    def split(rows):
        return {"input": data["input"][rows], "state": data["state"][rows], "sr": data["sr"]}
    return split(order[:32]), split(order[32:64]), data["speech"][order[32:64]]


@pytest.mark.parametrize("member, fixed", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_silero_vad_quantizes_lowers_and_diffs_clean(member, fixed, frames, tmp_path):
    calib, evaluation, _ = frames
    source = zoo_or_skip(lambda: zoo.wheel_member(zoo.SILERO_VAD, f"silero_vad/data/{member}"))
    np.savez(tmp_path / "calib.npz", **calib)
    np.savez(tmp_path / "eval.npz", **evaluation)
    run_passes(source, "ptq", tmp_path / "q.onnx", data_path=str(tmp_path / "calib.npz"), fixed_inputs=fixed,
               echo=lambda *_: None)
    quantized = onnx.load(tmp_path / "q.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) >= 8
    assert diff_models(quantized, str(tmp_path / "eval.npz")).passed
    for target in ("qlinear", "integer"):
        lowered, report = lower_model(quantized, target)
        assert "0 left float" in report["summary"] and report["float_nodes"] == []
        assert diff_models(lowered, str(tmp_path / "eval.npz")).passed


@pytest.mark.parametrize("member, fixed", VARIANTS[:1], ids=[VARIANTS[0][0]])
def test_silero_vad_decisions_survive_int8(member, fixed, frames, tmp_path):
    """The integer model's speech/non-speech decisions against the float model's, chunk by chunk
    on the float model's own recurrent states."""
    calib, evaluation, speech = frames
    source = zoo_or_skip(lambda: zoo.wheel_member(zoo.SILERO_VAD, f"silero_vad/data/{member}"))
    np.savez(tmp_path / "calib.npz", **calib)
    run_passes(source, "ptq", tmp_path / "q.onnx", data_path=str(tmp_path / "calib.npz"), fixed_inputs=fixed,
               echo=lambda *_: None)
    lowered, _ = lower_model(onnx.load(tmp_path / "q.onnx"), "integer")
    session = zoo.ort_session(lowered)
    probability = np.array([session.run(None, {"input": evaluation["input"][k:k + 1], "state": evaluation["state"][k]})[0]
                            .reshape(-1)[0] for k in range(len(speech))])
    assert 0 < np.count_nonzero(speech > 0.5) < len(speech)          # both kinds of chunk are there
    assert np.mean((probability > 0.5) == (speech > 0.5)) >= 0.9
