"""Zoo benchmark: qgraph `ptq` against ONNX Runtime's quantize_static on real models and real inputs.

    .venv/bin/python benchmarks/zoo.py [--models nudenet_320n,ddddocr_ocr,...] [--images N]
                                       [--calib N] [--eval N] [--json out.json]

Goal: qgraph must quantize what exporters write, as faithfully as the peer tool. For every zoo
model (benchmarks/zoo_models.py: four models from PyPI wheels and five exporter-style builders)
it prints the float op count, and for qgraph `ptq` (qgraph.api.apply_pipeline, W8A8, per-channel
weights) and for ORT quantize_static (QDQ, per-channel int8 weights, uint8 activations; MinMax,
Entropy and Percentile, after quant_pre_process where that works) the Q/DQ node count, the
quantization wall time, cosine and SNR of every output against float, and task agreement with
float: detectors the share of float boxes matched at IoU >= 0.5 with the same class, OCR the
share of identical CTC greedy strings (plus, for ddddocr, the share of MNIST strips read
exactly), classifiers the same top-1, the DB detector the pixel IoU of maps > 0.3. Failures are
caught and reported per setting. Fixed-batch models are fed one sample at a time to ORT's
calibration reader; qgraph gets the calibration set as one data dict, as its users do.

Inputs: `--calib` calibration and `--eval` evaluation samples (`--images` sets both), real
pictures from the scikit-image 0.26.0 wheel (the evaluation split is the 14 pictures whole,
then seeded crops; calibration uses other crops) and text strips (MNIST digits from qgraph's
bundled data, windows on the scanned page.png and the handwritten text.png).

Measured (2 shared cores, `--images 32`: 32 calibration and 32 evaluation samples per model;
the 14 scikit-image pictures whole then crops, or 16 MNIST strips + 16 scan windows; worst
output's cosine / SNR; ORT = its best of MinMax/Entropy/Percentile by task agreement; time =
the tool's quantization wall time; Q/DQ counts nodes, act.Q the activation quantizers (ORT
stores weights as int8 initializers + DQ, qgraph as float + Q + DQ); (*) = qgraph `ptq` with
`batch_size=1`, see below):

    model            ops  Q/DQ qg/ort  act.Q qg/ort  cos qg/ort       SNR dB qg/ort  task qg / ORT (ORT best)        s qg/ort
    nudenet_320n     323  668/697      261/283       0.99913/0.99908  27.6/27.3      0.25 / 0.25 of 8 boxes (MinMax)  1.8/3.2
    ddddocr_det      279  702*/716     268/275       0.98739/0.99462  16.0/19.7      0.74 / 0.81 of 88 boxes (Perc.)  7.1*/34.1
    ddddocr_ocr      102  152*/158      54/57        0.99756/0.99802  23.1/24.0      0.94 / 0.91 strings (Perc.)      3.8*/12.3
    ddddocr_ocr_old  292  326*/fail    140/fail      0.99434/fail     19.5/fail      0.78 / fail strings              2.7*/fail
    pplcnet          192  440/319      142/126       0.085/0.147      -1.3/-0.5      0.44 / 0.53 top-1 (Perc.)        2.0/4.9
    pplcnet_textdir  192  440/319      142/126       0.841/0.810       4.9/4.1       0.56 / 0.47 top-1 (MinMax)       0.3/0.5
    vit_encoder      320  420/375      136/158       0.957/0.925      10.6/8.2       0.44 / 0.44 top-1 (Perc.)        1.2/3.9
    db_detector      212  496/363      159/142       0.990/0.991      16.6/17.4      0.89 / 0.91 map IoU (MinMax)     2.9/3.2
    svtr_recognizer  293  640/513      207/209       0.048/0.066      -3.6/-3.4      0.00 / 0.00 strings (Perc.)      0.7/1.8

What the numbers say:
- qgraph `ptq` fails on every fixed-batch model (ddddocr): calibrate runs batches of 64 through
  a batch-1 graph ("Got invalid dimensions for input: images ... index: 0 Got: 32 Expected: 1",
  qgraph/runner.py). With `batch_size=1` it works, and on the dynamically-quantized
  common_old.onnx it is the only tool that works (ORT's quantize_static: "Graph is not a DAG").
- nudenet: cosine 0.999 but 2 of 8 float boxes survive in both tools: the final Concat joins
  boxes (0..320) and class scores (0..1) and its output gets one uint8 scale of 1.25, so every
  class score rounds to 0 or 1.25. The task metric catches what cosine cannot.
- The untrained exporter-style nets lose much more than trained ones in both tools (see
  models/exported.py, "Known limit"): read them as qgraph against ORT, not as accuracy.
- Percentile helps ORT on the ddddocr detector (0.73 -> 0.81 of boxes); qgraph's `ptq` uses
  minmax only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_models as zoo  # noqa: E402

ORT_METHODS = ("MinMax", "Entropy", "Percentile")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

@dataclass
class Result:
    """One quantization of one model (or the float reference) and how close it stays to float."""
    model: str
    tool: str
    config: str
    ops: int = 0
    qdq: int = 0
    act_quantizers: int = 0
    weight_quantizers: int = 0
    seconds: float = 0.0
    outputs: list[dict] = field(default_factory=list)   # name, cosine, snr_db
    agreement: float | None = None
    agreement_text: str = ""
    digits_exact: float | None = None                     # ddddocr: MNIST strips read exactly
    note: str = ""
    error: str = ""

    @property
    def min_cosine(self) -> float:
        return min((o["cosine"] for o in self.outputs), default=float("nan"))

    @property
    def min_snr(self) -> float:
        return min((o["snr_db"] for o in self.outputs), default=float("nan"))


def error_line(exc: BaseException) -> str:
    """The exception in one line (ORT puts the useful part on its second and third lines)."""
    text = " ".join(part.strip() for part in str(exc).strip().splitlines()[:3])
    return f"{type(exc).__name__}: {text[:300]}"


def count_ops(model: onnx.ModelProto) -> tuple[int, int]:
    """(all nodes, QuantizeLinear + DequantizeLinear nodes) of the main graph."""
    nodes = model.graph.node
    return len(nodes), sum(n.op_type in QDQ_OPS for n in nodes)


def count_quantizers(model: onnx.ModelProto) -> tuple[int, int]:
    """(activation quantizers, weight quantizers): node counts alone do not compare, since ORT stores
    weights as int8 initializers + DequantizeLinear and qgraph keeps float weights + Q + DQ."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    quantized_constants = {n.output[0] for n in model.graph.node
                           if n.op_type == "QuantizeLinear" and n.input[0] in constants}
    weights = sum(n.op_type == "DequantizeLinear" and (n.input[0] in constants or n.input[0] in quantized_constants)
                  for n in model.graph.node)
    activations = sum(n.op_type == "QuantizeLinear" and n.input[0] not in constants for n in model.graph.node)
    return activations, weights


def score(result: Result, entry: zoo.ZooEntry, model: onnx.ModelProto, x_eval: np.ndarray,
          reference: list[np.ndarray], samples: list[zoo.Sample], names: list[str]) -> Result:
    """Run `model` on the evaluation inputs and fill in fidelity and task agreement."""
    outputs = zoo.run_entry(entry, zoo.ort_session(model), x_eval)
    result.outputs = [{"name": name, "cosine": zoo.cosine(ref, got), "snr_db": zoo.snr_db(ref, got)}
                      for name, ref, got in zip(names, reference, outputs)]
    result.agreement, result.agreement_text = zoo.task_agreement(entry, reference, outputs)
    result.digits_exact = digits_exact(entry, outputs, samples)
    return result


def digits_exact(entry: zoo.ZooEntry, outputs: list[np.ndarray], samples: list[zoo.Sample]) -> float | None:
    """Share of MNIST strips a ddddocr model reads exactly (labels are known only for those)."""
    if not entry.charset:
        return None
    decoded = zoo.decode(entry, outputs)
    pairs = [(s.text, zoo.decoded_text(entry, seq)) for s, seq in zip(samples, decoded) if s.text]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def qgraph_ptq(float_path: Path, calib: dict, batch_size: int = 64) -> tuple[onnx.ModelProto, float]:
    from qgraph.api import apply_pipeline
    from qgraph.model_io import load_model
    start = time.perf_counter()
    model = apply_pipeline(load_model(float_path), "ptq", calib, batch_size=batch_size)
    return model, time.perf_counter() - start


class _Reader:
    """ORT CalibrationDataReader over the calibration set (one sample per batch for fixed-batch models)."""

    def __init__(self, entry: zoo.ZooEntry, data: np.ndarray, batch_size: int = 8):
        step = 1 if entry.fixed_batch else batch_size
        self._batches = iter([{entry.input_name: data[i:i + step]} for i in range(0, len(data), step)])

    def get_next(self):
        return next(self._batches, None)


@contextlib.contextmanager
def working_directory(path: Path):
    """Run ORT's quantization tools inside the temp dir: when symbolic shape inference fails,
    quant_pre_process leaves a weights file named by a UUID in the current directory."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


ORT_MIN_OPSET = 13  # quantize_static refuses per-channel QDQ below opset 13


def ort_source(float_model: onnx.ModelProto, float_path: Path, tmp: Path) -> tuple[Path, str]:
    """The file ORT starts from: the float model, its opset raised with onnx's version converter when
    quantize_static would refuse it (as an ORT user does; qgraph's load_model does the same)."""
    opset = next(o.version for o in float_model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= ORT_MIN_OPSET:
        return float_path, ""
    from onnx import version_converter
    path = tmp / "float_opset17.onnx"
    onnx.save(version_converter.convert_version(float_model, 17), str(path))
    return path, f"opset {opset} -> 17 (onnx.version_converter)"


def ort_preprocess(float_path: Path, tmp: Path) -> tuple[Path, str]:
    """quant_pre_process with symbolic shape inference, else without it, else the raw model."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    notes = []
    for skip_symbolic in (False, True):
        out = tmp / f"pre_{int(skip_symbolic)}.onnx"
        try:
            with working_directory(tmp):
                quant_pre_process(str(float_path), str(out), skip_symbolic_shape=skip_symbolic)
            label = "quant_pre_process" + (" (skip_symbolic_shape)" if skip_symbolic else "")
            return out, "; ".join([*notes, label])
        except Exception as exc:  # report why, then try the next, weaker form
            notes.append(f"quant_pre_process{' (skip_symbolic_shape)' if skip_symbolic else ''} failed: "
                         f"{error_line(exc)}")
    return float_path, "; ".join([*notes, "raw model"])


def ort_quantize(entry: zoo.ZooEntry, source: Path, method: str, calib: np.ndarray,
                 tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(entry, calib)
    out = tmp / f"ort_{method}.onnx"
    with contextlib.redirect_stdout(io.StringIO()), working_directory(tmp):  # calibrators print progress
        quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    return onnx.load(str(out))


def benchmark_model(key: str, n_calib: int, n_eval: int, methods: list[str], echo) -> list[Result]:
    entry = zoo.zoo_entry(key)
    float_model = zoo.zoo_model(key)
    calib = zoo.zoo_inputs(key, n_calib, "calib")
    samples = zoo.zoo_samples(key, n_eval, "eval")
    x_eval = np.stack([s.array for s in samples])
    names = [o.name for o in float_model.graph.output]
    reference = zoo.run_entry(entry, zoo.ort_session(float_model), x_eval)
    ops, qdq = count_ops(float_model)
    base = Result(key, "float", "fp32", ops, qdq, note=entry.source)
    results = [score(base, entry, float_model, x_eval, reference, samples, names)]
    echo(line(results[-1]))
    with tempfile.TemporaryDirectory(prefix=f"zoo-{key}-") as tmp_name:
        tmp = Path(tmp_name)
        float_path = tmp / "float.onnx"
        onnx.save(float_model, str(float_path))
        results.append(run_setting(key, "qgraph", "ptq (W8A8 minmax)", lambda: qgraph_ptq(float_path, calib),
                                   entry, x_eval, reference, samples, names))
        echo(line(results[-1]))
        if entry.fixed_batch:  # the harness's workaround for the batch-1 gap: qgraph's own batch_size knob
            results.append(run_setting(key, "qgraph", "ptq batch_size=1", lambda: qgraph_ptq(float_path, calib, 1),
                                       entry, x_eval, reference, samples, names))
            echo(line(results[-1]))
        start = time.perf_counter()
        source, opset_note = ort_source(float_model, float_path, tmp)
        prepared, pre_note = ort_preprocess(source, tmp)
        pre_note = "; ".join(n for n in (opset_note, pre_note) if n)
        pre_seconds = time.perf_counter() - start
        for method in methods:
            def quantize(method=method):
                begin = time.perf_counter()
                model = ort_quantize(entry, prepared, method, calib[entry.input_name], tmp)
                return model, pre_seconds + time.perf_counter() - begin
            result = run_setting(key, "ort", f"QDQ per-channel {method}", quantize, entry, x_eval, reference,
                                 samples, names)
            result.note = pre_note
            results.append(result)
            echo(line(results[-1]))
    return results


def run_setting(key, tool, config, quantize, entry, x_eval, reference, samples, names) -> Result:
    """Quantize and score one setting; any failure becomes the result's error line."""
    result = Result(key, tool, config)
    try:
        model, result.seconds = quantize()
    except Exception as exc:
        result.error = f"quantization failed: {error_line(exc)}"
        result.note = _where(exc)
        return result
    result.ops, result.qdq = count_ops(model)
    result.act_quantizers, result.weight_quantizers = count_quantizers(model)
    try:
        return score(result, entry, model, x_eval, reference, samples, names)
    except Exception as exc:
        result.error = f"quantized model does not run: {error_line(exc)}"
        return result


def _where(exc: BaseException) -> str:
    """file:line of the innermost qgraph (else innermost) frame, so a failure names the code that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/qgraph/" in f.filename.replace("\\", "/")] or frames
    if not ours:
        return ""
    frame = ours[-1]
    path = frame.filename.split("/qgraph/", 1)[-1] if "/qgraph/" in frame.filename else Path(frame.filename).name
    return f"{'qgraph/' + path if '/qgraph/' in frame.filename else path}:{frame.lineno} in {frame.name}"


def line(r: Result) -> str:
    if r.error:
        return f"{r.model:<17} {r.tool:<7} {r.config:<27} ERROR {r.error}" + (f" [{r.note}]" if r.note else "")
    agreement = "-" if r.agreement is None or r.tool == "float" else f"{r.agreement:6.3f} ({r.agreement_text})"
    digits = "" if r.digits_exact is None else f"  digits exact {r.digits_exact:.2f}"
    fidelity = "" if r.tool == "float" else f"cos {r.min_cosine:8.5f}  SNR {r.min_snr:6.1f} dB  "
    quantizers = f"(a {r.act_quantizers:3d}, w {r.weight_quantizers:3d})" if r.tool != "float" else " " * 16
    return (f"{r.model:<17} {r.tool:<7} {r.config:<27} ops {r.ops:4d}  Q/DQ {r.qdq:4d} {quantizers} "
            f"{r.seconds:6.1f}s  {fidelity}{agreement}{digits}")


def best_ort(results: list[Result]) -> Result | None:
    """The ORT setting with the best task agreement, then the best worst-output SNR."""
    done = [r for r in results if r.tool == "ort" and not r.error]
    return max(done, key=lambda r: (np.nan_to_num(r.agreement, nan=-1.0), r.min_snr)) if done else None


def summary(results: list[Result]) -> list[str]:
    rows = [f"{'model':<17} {'ops':>4} {'Q/DQ qg':>7} {'Q/DQ ort':>8} {'aQ qg':>5} {'aQ ort':>6} {'cos qg':>8} {'cos ort':>8} "
            f"{'SNR qg':>6} {'SNR ort':>7} {'task qg':>7} {'task ort':>8} {'t qg':>6} {'t ort':>6}  ort best"]
    for model in dict.fromkeys(r.model for r in results):
        mine = [r for r in results if r.model == model]
        base = next(r for r in mine if r.tool == "float")
        qg_rows = [r for r in mine if r.tool == "qgraph"]
        qg = next((r for r in qg_rows if not r.error), qg_rows[0] if qg_rows else None)
        ort = best_ort(mine)

        def cell(r, attr, fmt):
            if r is None or r.error:
                return "fail"
            value = getattr(r, attr)
            return "-" if value is None else format(value, fmt)
        rows.append(f"{model:<17} {base.ops:4d} {cell(qg, 'qdq', 'd'):>7} {cell(ort, 'qdq', 'd'):>8} "
                    f"{cell(qg, 'act_quantizers', 'd'):>5} {cell(ort, 'act_quantizers', 'd'):>6} "
                    f"{cell(qg, 'min_cosine', '.5f'):>8} {cell(ort, 'min_cosine', '.5f'):>8} "
                    f"{cell(qg, 'min_snr', '.1f'):>6} {cell(ort, 'min_snr', '.1f'):>7} "
                    f"{cell(qg, 'agreement', '.3f'):>7} {cell(ort, 'agreement', '.3f'):>8} "
                    f"{cell(qg, 'seconds', '.1f'):>6} {cell(ort, 'seconds', '.1f'):>6}  "
                    f"{ort.config.split()[-1] if ort else '-'}"
                    f"{'   qgraph: ' + qg.config if qg and qg.config != 'ptq (W8A8 minmax)' else ''}")
    return rows


def finite(value):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return [finite(v) for v in value] if isinstance(value, list) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.ZOO), help="comma-separated zoo keys")
    parser.add_argument("--images", type=int, default=24, help="calibration and evaluation samples each")
    parser.add_argument("--calib", type=int, help="calibration samples (default: --images)")
    parser.add_argument("--eval", type=int, help="evaluation samples (default: --images)")
    parser.add_argument("--methods", default=",".join(ORT_METHODS), help="ORT calibration methods")
    parser.add_argument("--json", default="zoo_results.json", help="where to write all numbers")
    args = parser.parse_args()
    n_calib, n_eval = args.calib or args.images, args.eval or args.images
    keys = args.models.split(",")
    unknown = [key for key in keys if key not in zoo.ZOO]
    if unknown:  # before any work
        parser.error(f"unknown zoo model {unknown[0]!r}; choose from: {', '.join(zoo.ZOO)}")

    def echo(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results: list[Result] = []
    for key in keys:
        try:
            results += benchmark_model(key, n_calib, n_eval, args.methods.split(","), echo)
        except zoo.ZooUnavailable as exc:
            results.append(Result(key, "float", "fp32", error=str(exc)))
            echo(line(results[-1]))
    print("\nall settings:")
    print("\n".join(line(r) for r in results))
    print(f"\nsummary ({n_calib} calibration / {n_eval} evaluation samples; worst output's cosine and SNR; "
          "ORT: best setting by task agreement):")
    print("\n".join(summary(results)))
    Path(args.json).write_text(json.dumps(finite({"calib": n_calib, "eval": n_eval, "results": [
        {**asdict(r), "min_cosine": r.min_cosine, "min_snr": r.min_snr} for r in results]}), indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
