"""Two audio models as their PyPI wheels ship them (benchmarks/zoo_models.py):

- Spotify's basic-pitch (Keras through tf2onnx): raw 22 kHz audio through a constant-Q transform
  written as Conv1d, Pad and Sqrt, then note/onset/contour heads. Quantized by ptq, lowered to
  both targets, checked by `diff` (ORT's Sqrt is Eigen's rsqrt-based one: 4 ulp on its CQT
  magnitudes, the "rsqrt" tolerance family), its note decisions compared with the float
  model's; `analyze` puts the loss in the CQT front end and `mixed_precision` repairs it.
- pipecat's smart-turn v3.2: a Whisper-style encoder shipped already quantized (QDQ, by ONNX
  Runtime's quantizer). `diff` on the model as shipped and on both lowerings (the interpreter's
  LayerNormalization transcribes ORT's one-pass kernel: an encoder LayerNorm whose variance
  cancels was beyond the accumulation bound before).

- Microsoft's DNSMOS (speechmos, keras2onnx): MOS scores from 9 s of raw audio through an STFT
  written as convolutions and a log-power spectrum. Its Sqrt → Pow → Max → Log region quantized
  on 8-bit codes made the scores noise (mean error 0.93 MOS, correlation with float ≈ 0); kept
  float (insert_qdq's STEEP_AT_ZERO), 0.13.

Inputs are synthesized (no wheel ships recordings): music-like clips of decaying harmonic notes,
and Whisper log-mel features of speech-like audio."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import zoo_models as zoo  # benchmarks/zoo_models.py (conftest.py puts benchmarks/ on sys.path)
from conftest import zoo_or_skip
from qgraph.api import apply_pipeline
from qgraph.diff import diff_models
from qgraph.lowering import lower_model
from qgraph.runner import run_model

PITCH_INPUT = "serving_default_input_2:0"
NOTE, ONSET = "StatefulPartitionedCall:1", "StatefulPartitionedCall:2"    # [N, 172, 88] each


@pytest.fixture(scope="module")
def pitch(tmp_path_factory):
    """(float model, ptq model, evaluation feeds, evaluation data path, calibration feeds)."""
    model = onnx.load(zoo_or_skip(lambda: zoo.wheel_member(zoo.BASIC_PITCH, "basic_pitch/saved_models/icassp_2022/nmp.onnx")))
    clips = zoo.music_like_clips(48)
    calib, evaluation = {PITCH_INPUT: clips[:16]}, {PITCH_INPUT: clips[16:]}
    path = tmp_path_factory.mktemp("pitch") / "eval.npz"
    np.savez(path, **evaluation)
    return model, apply_pipeline(model, "ptq", calib), evaluation, str(path), calib


def _f1(reference: np.ndarray, other: np.ndarray) -> float:
    """F1 of `other`'s decisions (> 0.5) against `reference`'s."""
    a, b = reference > 0.5, other > 0.5
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def test_basic_pitch_quantizes_lowers_and_diffs_clean(pitch):
    """Measured: note F1 0.974, onset F1 0.862 against the float model on 32 clips."""
    model, quantized, evaluation, data, _ = pitch
    reference = run_model(model, evaluation)
    assert diff_models(quantized, data).passed
    for target in ("qlinear", "integer"):
        lowered, report = lower_model(quantized, target)
        assert "0 left float" in report["summary"]
        assert diff_models(lowered, data).passed
        outputs = run_model(lowered, evaluation)
        assert _f1(reference[NOTE], outputs[NOTE]) >= 0.95
        assert _f1(reference[ONSET], outputs[ONSET]) >= 0.8


def test_basic_pitch_mixed_precision_repairs_its_front_end(pitch):
    """The CQT's cascaded anti-alias convolutions lose most at 8 bits; mixed_precision to output
    cosine 0.999 moves them to 16 bits: onset F1 0.862 -> 0.967, note F1 0.974 -> 0.995."""
    model, quantized, evaluation, _, calib = pitch
    repaired = apply_pipeline(quantized, [{"mixed_precision": {"target": "cosine", "value": 0.999, "workers": 2}}],
                              calib)
    reference, before, after = (run_model(m, evaluation) for m in (model, quantized, repaired))
    assert _f1(reference[ONSET], after[ONSET]) >= max(0.95, _f1(reference[ONSET], before[ONSET]))
    assert _f1(reference[NOTE], after[NOTE]) >= 0.99


@pytest.fixture(scope="module")
def smart_turn(tmp_path_factory):
    """(the shipped QDQ model, feeds, data path): 16 clips of speech-like audio, some with
    trailing silence, as Whisper log-mel features."""
    model = onnx.load(zoo_or_skip(lambda: zoo.wheel_member(zoo.PIPECAT,
                                                           "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx")))
    clips = [np.concatenate([zoo.speech_like_audio(6.0 + k % 3, seed=k), np.zeros(8000 * (k % 4), np.float32)])
             for k in range(16)]
    feeds = {"input_features": np.stack([zoo.whisper_log_mel(c) for c in clips])}
    path = tmp_path_factory.mktemp("turn") / "eval.npz"
    np.savez(path, **feeds)
    return model, feeds, str(path)


def test_smart_turn_as_shipped_and_lowered_diffs_clean(smart_turn):
    """A model another tool quantized: the interpreter agrees with ORT on it op by op, and both
    lowerings keep its end-of-turn decisions (qlinear: probabilities within 0.005 of the shipped
    model's; integer, whose fixed-point requantization rounds ties up: up to 0.05 here)."""
    model, feeds, data = smart_turn
    assert diff_models(model, data).passed
    shipped = next(iter(run_model(model, feeds).values())).ravel()
    for target, bound in (("qlinear", 0.005), ("integer", 0.1)):
        lowered, report = lower_model(model, target)
        assert sum(report["lowered"].values()) >= 40
        # what the shipped placement leaves float (a GELU whose input is not quantized, Softmax) says why
        assert report["skipped"] and all(entry["reason"] for entry in report["skipped"])
        assert diff_models(lowered, data).passed
        probability = next(iter(run_model(lowered, feeds).values())).ravel()
        assert np.abs(probability - shipped).max() <= bound
        assert np.array_equal(probability > 0.5, shipped > 0.5)


def test_dnsmos_log_power_front_end_stays_float_and_scores_survive(tmp_path):
    model = onnx.load(zoo_or_skip(lambda: zoo.wheel_member(zoo.SPEECHMOS, "speechmos/dnsmos_models/sig_bak_ovr.onnx")))
    audio = np.stack([np.resize(zoo.speech_like_audio(9.5, seed=k), 144160) for k in range(16)]).astype(np.float32)
    calib, evaluation = {"input_1": audio[:8]}, {"input_1": audio[8:]}
    np.savez(tmp_path / "eval.npz", **evaluation)
    quantized = apply_pipeline(model, "ptq", calib)
    power = next(node.input[0] for node in model.graph.node if node.op_type == "Sqrt")    # re² + im²
    log_path = {power} | {o for node in model.graph.node if node.op_type in ("Sqrt", "Pow", "Max", "Log")
                          for o in node.output}
    assert not log_path & {node.input[0] for node in quantized.graph.node if node.op_type == "QuantizeLinear"}
    reference = next(iter(run_model(model, evaluation).values()))
    for candidate in (quantized, *(lower_model(quantized, t)[0] for t in ("qlinear", "integer"))):
        scores = next(iter(run_model(candidate, evaluation).values()))
        assert np.abs(scores - reference).mean() < 0.25                         # MOS points; was 0.93
    lowered, report = lower_model(quantized, "integer")
    assert "0 left float" in report["summary"]
    assert diff_models(lowered, str(tmp_path / "eval.npz")).passed
