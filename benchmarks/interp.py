"""Interpreter benchmark: qgraph.interp vs onnx.reference.ReferenceEvaluator vs ONNX Runtime on
the lowered bundled ResNet and MobileNetV2, and ORT latency of the lowered models vs the float
model vs ORT's own quantize_static QOperator output.

    python benchmarks/interp.py [--batch 16] [--image-size 28] [--width 8] [--repeats 5]
                                [--models resnet mobilenetv2] [--threads T]
                                [--zoo | --zoo-only] [--zoo-models KEY ...] [--zoo-batches 1 8]
                                [--zoo-forms float qdq qlinear integer]

Each model: canonicalize + fuse_conv_bn (fold), quantize_static QDQ (per-channel int8 weights,
uint8 activations, 128 MNIST val images), then `lower` to both targets. Times are medians of
`--repeats` runs per batch on the same inputs; ORT and the interpreter are timed alternately and
interp/ORT is the median of the per-pair ratios (a shared machine's load hits both). Threads:
`--threads T` gives ORT T intra-op threads and NumPy's BLAS T threads (through OPENBLAS_NUM_THREADS/OMP_NUM_THREADS, set before NumPy loads);
without it both use their defaults (all cores). The interpreter is timed as a compiled plan
(`qgraph.interp.compile_model(model).run`, what `qgraph diff` needs per batch); the "run()" column
is the one-call `qgraph.interp.run`, which also serializes the model to find its cached plan.
onnx.reference runs batch 1 once (it is slow) and is compared with the interpreter on batch 1;
what it cannot run is reported with its error. Every lowered model is also checked bit-exact
between ORT and the interpreter on the benchmark batch.

Measured on 2 shared cores of an Intel Xeon (AVX-512 VNNI, AMX: ORT's int8 kernels are much
faster here than on the AMD EPYC VM of earlier runs), load average 8-10 from other jobs; one
thread each (`--threads 1`), width 8, 28x28, interp/ORT on the qlinear target, all bit-exact:

    --threads 1, --repeats 15   batch 1   batch 16
      resnet qlinear             4.0x      5.5x
      mobilenetv2 qlinear        5.1x      7.5x
      resnet integer             1.8x      1.0x
      mobilenetv2 integer        0.4x      0.8x

Batch 1 is per-node overhead: 15-30 NumPy calls per QLinearConv (padding, im2col, GEMM, bias,
the five passes of requantization, the store), 20-30 us against ORT's ~3 us per node (0.1 ms
for the whole model). At batch 16 the depthwise convolutions dominate (one banded GEMM per
channel over gathered row blocks, three times the input) next to ORT's VNNI/AMX int8 kernels.

`--zoo` (or `--zoo-only`): interp/ORT per zoo model (benchmarks/zoo_models.py, real inputs) in
every form the interpreter runs — float as shipped, qdq after the bundled ``ptq`` (16 calibration
samples), and its qlinear and integer lowerings — one thread each, alternated, medians of 5
per-pair ratios of wall time and of CPU time (ms columns: wall medians). Measured 2026-11-29 on
2 cores of an Intel Xeon shared with other jobs (load average 4-6): after = commit 694df23,
before = commit 8ca5a6d, both run by this same script at the same time (one process each), so a
load change hits both. With several runnable processes per core, a run of a few ms is often
descheduled mid-way, so wall ratios of the small models swing widely (ppocr_cls float: 14.5x
wall, 4.6x CPU); the CPU ratio is the one to read. Rows marked * were re-measured on 2026-11-29
for issue 13 point 4 (after = commit 8f08402, before = commit 3929257, the two run alternately by
this script, three pairs at --repeats 9, the medians of their ratios; ms columns: the middle pair;
load average 3-4, ORT ~2x slower in wall time than in the rows above).

    model            form     nodes   b1 ORT  interp  wall   cpu  before w/c   b8 ORT  interp  wall   cpu  before w/c
    nudenet_320n     float      323     52.3   206.4  3.8x  3.7x   3.9x/3.9x    485.9  1544.7  3.1x  3.2x   3.4x/3.3x
    nudenet_320n     qdq        721    101.3   159.7  1.5x  1.6x   3.1x/3.2x    859.2  1071.5  1.2x  1.2x   2.5x/2.5x
    nudenet_320n     qlinear    642     34.7   139.1  4.0x  4.2x   5.7x/5.3x    158.0   632.9  4.1x  4.0x   4.7x/4.8x
    nudenet_320n     integer   1159     47.1   133.5  3.0x  2.9x   3.0x/3.0x    492.6  1044.2  2.2x  2.2x   2.4x/2.4x
    ddddocr_det      float      279    106.7   401.4  3.4x  3.4x   3.8x/3.6x   1229.4  4442.1  3.6x  3.6x   3.7x/3.7x
    ddddocr_det      qdq        785    288.5   353.1  1.4x  1.3x   2.9x/2.9x   2276.3  2803.4  1.2x  1.2x   2.9x/2.9x
    ddddocr_det      qlinear    689     69.3   319.0  4.6x  4.5x   5.8x/5.6x    576.1  2680.4  4.6x  4.6x   5.6x/5.6x
    ddddocr_det      integer   1250    263.4   551.1  2.1x  2.0x   2.3x/2.2x   2125.7  4292.9  2.0x  2.0x   2.2x/2.2x
    ddddocr_ocr      float      102     93.5   213.1  2.3x  2.3x   2.3x/2.3x    765.2  1748.3  2.3x  2.3x   2.3x/2.3x
    ddddocr_ocr      qdq        205    129.7   178.8  1.4x  1.5x   3.1x/3.1x   1034.6  1449.4  1.4x  1.4x   3.1x/3.2x
    ddddocr_ocr      qlinear    146     60.4   171.9  2.9x  2.9x   3.0x/3.0x    470.0  1382.3  2.9x  2.9x   3.2x/3.1x
    ddddocr_ocr      integer    327     55.5   137.9  2.5x  2.6x   2.7x/2.6x    425.4  1118.2  2.6x  2.6x   2.7x/2.7x
  * ddddocr_ocr_old  float      292     16.7   124.0  7.6x  7.5x   8.1x/8.0x    120.2  1009.6  8.7x  8.7x   9.2x/9.4x
    ddddocr_ocr_old  qdq        191     94.7   113.7  1.2x  1.2x   2.5x/2.5x    749.8   918.8  1.2x  1.2x   2.5x/2.6x
    ddddocr_ocr_old  qlinear    131     40.3   112.8  2.8x  2.8x   3.0x/3.0x    313.6   915.1  2.9x  2.8x   3.1x/3.1x
    ddddocr_ocr_old  integer    312     56.0   140.2  2.5x  2.6x   2.7x/2.6x    440.6  1146.8  2.6x  2.6x   2.6x/2.6x
    pplcnet          float      192      7.8    22.2  2.9x  2.8x   3.1x/3.1x     55.9   151.1  2.7x  2.7x   2.8x/2.6x
    pplcnet          qdq        359     16.7    29.0  1.7x  1.5x   3.8x/3.8x    118.1   153.5  1.3x  1.3x   2.3x/2.4x
    pplcnet          qlinear    256      7.2    23.4  3.3x  3.6x   3.5x/4.4x     44.5   135.2  3.0x  3.2x   4.2x/3.9x
    pplcnet          integer    466     23.0    38.7  1.7x  1.7x   1.6x/1.7x    189.6   281.8  1.5x  1.5x   1.5x/1.5x
    pplcnet_textdir  float      192      0.7     2.3  3.5x  3.4x   3.7x/3.6x      7.2    17.0  2.4x  2.8x   2.5x/3.0x
    pplcnet_textdir  qdq        359      1.5     7.6  2.6x  2.6x  10.3x/5.6x     10.8    20.2  1.8x  1.7x   3.6x/2.9x
    pplcnet_textdir  qlinear    256      0.9     3.2  3.5x  3.5x   8.0x/4.1x      7.3    18.0  2.4x  3.0x   3.0x/3.4x
    pplcnet_textdir  integer    466      2.1     8.8  3.8x  2.3x   2.4x/2.3x     18.3    17.9  1.6x  1.7x   1.7x/1.7x
    vit_encoder      float      320     17.4    55.1  3.2x  3.2x   3.9x/3.8x    132.2   425.6  3.2x  3.2x   4.1x/4.0x
    vit_encoder      qdq        282     12.4    41.1  3.0x  3.0x   7.7x/6.8x    105.4   315.2  3.0x  3.0x   6.3x/6.1x
    vit_encoder      qlinear    202     11.8    41.9  3.5x  4.3x   5.6x/4.5x     73.7   369.1  5.0x  4.8x   4.9x/4.8x
    vit_encoder      integer    358     23.3    61.1  2.6x  2.8x   2.9x/2.7x    233.4   547.8  2.4x  2.4x   2.4x/2.3x
    db_detector      float      212     27.3    71.5  2.6x  2.5x   3.1x/2.7x    279.1   586.3  2.1x  2.0x   2.3x/2.3x
    db_detector      qdq        409     42.1    97.8  2.3x  2.2x   3.3x/3.2x    392.6   732.5  1.9x  1.9x   2.7x/2.7x
    db_detector      qlinear    310     16.3    74.9  4.6x  4.5x   6.7x/5.8x    130.8   575.3  4.3x  4.4x   5.3x/5.3x
    db_detector      integer    592     73.5   139.5  2.0x  1.9x   2.0x/2.0x    838.1  1354.3  1.7x  1.6x   1.8x/1.8x
    svtr_recognizer  float      293      2.0    24.2  8.8x  4.1x   3.9x/4.2x     26.8   100.3  4.1x  3.6x   3.7x/3.6x
    svtr_recognizer  qdq        481      3.6    30.3  7.7x  3.0x   6.2x/4.8x     62.9    89.6  1.7x  1.9x   2.8x/3.0x
    svtr_recognizer  qlinear    349      6.1    16.8  2.2x  4.2x  10.9x/5.0x     22.0   118.0  4.6x  4.0x   4.7x/4.7x
    svtr_recognizer  integer    627     13.2    33.9  2.6x  2.6x   1.9x/2.4x     69.4   127.3  1.9x  1.9x   2.2x/2.0x
    ppocr_det        float      672    113.7   239.8  2.1x  2.1x   3.4x/3.1x   1330.4  2488.7  1.9x  1.9x   2.3x/2.2x
    ppocr_det        qdq        657    242.0   487.1  2.1x  2.1x   3.5x/3.4x   2596.3  4181.0  1.9x  1.7x   2.8x/2.9x
    ppocr_det        qlinear    411     72.9   387.0  5.3x  5.3x   7.7x/6.5x    695.4  3428.7  4.6x  4.6x   6.5x/5.6x
    ppocr_det        integer   1120    493.1   923.8  1.8x  1.8x   1.9x/1.9x   5270.9 11804.7  2.2x  2.2x   2.0x/2.0x
  * ppocr_cls        float      566      1.3     9.3  7.4x  4.1x   8.4x/4.9x     17.2    56.1  3.2x  3.0x   3.6x/3.6x
    ppocr_cls        qdq        510     11.4    29.1  2.5x  3.4x   7.6x/5.3x     59.0   147.7  2.6x  2.6x   3.5x/3.4x
    ppocr_cls        qlinear    300      6.1    24.6  3.6x  4.2x   2.3x/4.6x     25.6   126.3  5.1x  4.3x   4.5x/4.6x
    ppocr_cls        integer    909     17.5    32.9  2.0x  2.5x   2.3x/2.3x    117.8   253.7  2.1x  2.2x   2.1x/2.1x
    ppocr_rec        float      860     60.9   158.1  2.6x  2.7x   3.4x/3.5x    691.1  1269.1  1.8x  1.8x   2.4x/2.4x
    ppocr_rec        qdq        648     95.1   169.4  1.7x  1.8x   3.6x/3.4x    881.2  1158.0  1.3x  1.3x   2.6x/2.6x
    ppocr_rec        qlinear    439     38.4   150.3  4.0x  4.9x   5.5x/6.1x    295.2  1049.1  3.6x  3.5x   5.5x/5.4x
    ppocr_rec        integer    816    143.3   290.2  2.0x  2.0x   2.1x/2.1x   1593.2  2613.0  1.6x  1.6x   1.6x/1.7x

This round, all bit-identical to the kernels they replace (integer results exact, float results
the same operations in the same order, or, for the float convs, another order of the same sums):
- a compiled plan folds the nodes computed from constants only (a QDQ model's weight
  DequantizeLinear) and fuses two kinds of node chains (qgraph/interp/fusion.py): each lowered
  table lookup (Transpose, Flatten, Shape, Cast, GatherElements, Reshape, Transpose) is one
  lookup over pairs of 8-bit codes, and each elementwise region of 8-bit codes (a per-tensor
  DequantizeLinear and the elementwise float ops on it: a QDQ GELU, SiLU, HardSwish) is one
  lookup per tensor it hands on, its ops run once on the 256 codes. Every qdq form is 1.5-2.5x
  faster (vit_encoder's 4 GELU Erfs were a third of its time);
- depthwise convs run as banded GEMMs over tiles of 16 output columns (5x5: 1.7-2.3x, 3x3:
  1.0-2.1x faster than per-tap passes), the flat per-tap passes multiply by per-channel weights
  a block of channels at a time; a stride-1 conv with no more output than input channels is one
  GEMM per tap on strided views, no im2col copy (the DB heads' 96→24 3x3 convs 1.8x faster);
- MLAS Erf runs each element through its own branch only; LayerNormalization scales in place.
Issue 13 point 4 (2026-11-29, commits 74b693c..8f08402), bit-identical in the same sense:
- an elementwise region that starts with a Cast of an integer tensor and holds a costly op (a
  dynamically quantized conv's ``Cast(acc + bias) · scale → Sigmoid → Mul``) and the
  DynamicQuantizeLinear after it run once per distinct value of the integer tensor (20-67K
  distinct values in 20-246K elements on ddddocr_ocr_old), each output a lookup: the 11 SiLU
  epilogues and their quantizations ~18 ms → ~13 ms CPU;
- GlobalAveragePool moves each quadruple of MLAS lanes as one 16-byte item into a (n/4, 4·C)
  copy and sums its rows in order (3-6x faster, the same sequential lane sums);
  BatchNormalization on short planes uses per-element copies of its channel constants (one
  contiguous loop per pass, ~2x); a float depthwise conv gathers its row blocks as byte items
  (a third faster); chains of float Add/Sub/Mul/Div/Clip/Relu (an exported HardSwish, a bias Add
  and its Relu) run as one step writing in place (1.5x on a batch-8 HardSwish, same at batch 1);
- tried and dropped (measured no faster or not exact): Sigmoid and Tanh of the LSTM gates in one
  call with per-position coefficients, FMA steps on mixed float32/float64 operands, im2col for
  ConvInteger with no more output than input channels, and int16/int8 ``einsum`` GEMVs for the
  LSTM (half or a third of the float32 time, but they wrap: not exact).
What is left above 5x:
- ddddocr_ocr_old float (dynamically quantized CRNN, 7.5x at batch 1, 8.7x at batch 8, where ORT
  runs from warm caches 8 times): ORT runs ConvInteger, MatMulInteger and the
  DynamicQuantizeLSTM's GEMMs on AMX/VNNI int8; here they are exact float32 BLAS GEMMs at BLAS
  speed (CPU ms of one batch-1 run: ConvInteger ~14.5, of which ~8.5 GEMM at ~150 GFLOP/s; the
  1024x8210 MatMulInteger ~8.5, BLAS packing 33 MB of float32 B; the LSTM ~25, of which its 40
  step GEMVs ~12, streaming 8 MB of float32 weights from L3 each step), ~4x ORT's whole 7-8 ms
  before anything else: the SiLU regions (~13: MLAS logistic at ~9 ns per distinct value) and
  the LSTM's per-step quantization and gates (~9). NumPy has no int8 or bf16 GEMM, and this
  OpenBLAS build exports no sbgemm, so 5x needs a compiled kernel, not more NumPy.
- ppocr_det qlinear at batch 1 (5.3x here; 4.6x in a run of its own at load 2): its
  QLinearConvs are float32 GEMMs and NumPy passes against ORT's VNNI int8 kernels; the other
  qlinear conv nets (nudenet, ddddocr_det, db, svtr, ppocr_rec) sit at 4.0-4.9x for the same
  reason, so a busier machine can push them over.
"""

from __future__ import annotations

import os
import sys

if "--threads" in sys.argv[:-1]:  # BLAS reads its thread count when NumPy is first imported
    _threads = sys.argv[sys.argv.index("--threads") + 1]
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = _threads

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from qgraph.graph import QModel
from qgraph.interp import compile_model, recycle_large_arrays
from qgraph.interp import run as interp_run
from qgraph.lowering import lower_model
from qgraph.models.builders import build_model
from qgraph.models.datasets import load_dataset
from qgraph.pipeline import run_pass
from qgraph.runner import Runner


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_times(reference, candidate, repeats: int, clock=time.perf_counter) -> tuple[float, float, float]:
    """Median ms of each and the median of their per-pair ratios, the two timed alternately
    (after one warm-up each), so that a load change on a shared machine hits both. ``clock``:
    wall time by default; ``time.process_time`` gives CPU time (one thread each, both in this
    process), which other jobs on the machine disturb much less."""
    return paired_clocks(reference, candidate, repeats, (clock,))[0]


def paired_clocks(reference, candidate, repeats: int, clocks) -> list[tuple[float, float, float]]:
    """:func:`paired_times` on several clocks read around the same runs."""
    reference(), candidate()
    ref_s, cand_s = [[] for _ in clocks], [[] for _ in clocks]
    for _ in range(repeats):
        for fn, out in ((reference, ref_s), (candidate, cand_s)):
            start = [clock() for clock in clocks]
            fn()
            for times, clock, t0 in zip(out, clocks, start):
                times.append(clock() - t0)
    return [(1e3 * statistics.median(r), 1e3 * statistics.median(c), statistics.median(x / y for x, y in zip(c, r)))
            for r, c in zip(ref_s, cand_s)]


def prepare(name: str, image_size: int, width: int, calib: np.ndarray, workdir: Path) -> dict[str, onnx.ModelProto]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = QModel.from_onnx(build_model(name, input_shape=(1, image_size, image_size), width=width))
    run_pass(model, "canonicalize")
    run_pass(model, "fuse_conv_bn", {"mode": "fold"})
    float_path = workdir / f"{name}.onnx"
    onnx.save(model.to_onnx(), float_path)
    models = {"float": onnx.load(float_path)}
    for fmt, label in ((QuantFormat.QDQ, "qdq"), (QuantFormat.QOperator, "qoperator")):
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{"input": calib[i:i + 32]} for i in range(0, len(calib), 32)])

            def get_next(self):
                return next(self.batches, None)

        out = workdir / f"{name}_{label}.onnx"
        quantize_static(str(float_path), str(out), Reader(), quant_format=fmt, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        models[label] = onnx.load(out)
    for target in ("qlinear", "integer"):
        models[target], report = lower_model(models["qdq"], target)
        if report["skipped"]:
            print(f"  {name} {target}: left float: {report['skipped']}")
    return models


def at_opset_19(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model labelled ai.onnx 19: onnx.reference implements QuantizeLinear/DequantizeLinear
    only from opset 19, whose integer semantics are those of opset 13 (the ops used here
    — Cast, Clip, ConvInteger, MatMulInteger, elementwise — have no semantic change 17 → 19)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for imp in copy.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 19
    copy.ir_version = max(copy.ir_version, 9)
    return copy


def reference_time(model: onnx.ModelProto, x1: np.ndarray) -> tuple[float | None, str]:
    from onnx.reference import ReferenceEvaluator
    try:
        evaluator = ReferenceEvaluator(at_opset_19(model))
        start = time.perf_counter()
        evaluator.run(None, {"input": x1})
        return time.perf_counter() - start, ""
    except Exception as exc:  # noqa: BLE001 - what it cannot run is a result of the benchmark
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:110]}"


def bench_model(name: str, args, data: np.ndarray, workdir: Path) -> list[str]:
    models = prepare(name, args.image_size, args.width, data[:128], workdir)
    xb, x1 = data[:args.batch], data[:1]
    rows = [f"\n{name} (width {args.width}, {args.image_size}x{args.image_size}, batch {args.batch}; "
            "median time per batch; onnx.reference on the opset-19 relabelled copy, batch 1, once)"]
    rows.append(f"  {'model':<10} {'ORT ms':>9} {'interp ms':>10} {'interp/ORT':>10} {'run() ms':>9} {'bit-exact':>9} "
                f"{'ORT b1 ms':>9} {'interp b1 ms':>12} {'b1 ratio':>8} {'onnx.ref b1 ms':>14} {'ref/interp':>10}")
    for label in ("qlinear", "integer"):
        model = models[label]
        ort = Runner(model, threads=args.threads)
        plan = compile_model(model)
        ort_ms, interp_ms, ratio = paired_times(lambda: ort.run({"input": xb}), lambda: plan.run({"input": xb}),
                                                args.repeats)
        run_ms = 1e3 * median_time(lambda: interp_run(model, {"input": xb}), args.repeats)
        exact = np.array_equal(ort.run({"input": xb})["logits"], plan.run({"input": xb})["logits"])
        ort1, interp1, ratio1 = paired_times(lambda: ort.run({"input": x1}), lambda: plan.run({"input": x1}),
                                             args.repeats)
        ref_s, why = reference_time(model, x1)
        ref = f"{1e3 * ref_s:14.1f} {1e3 * ref_s / interp1:9.0f}x" if ref_s is not None else f"{'—':>14} {'—':>10}"
        rows.append(f"  {label:<10} {ort_ms:9.2f} {interp_ms:10.2f} {ratio:9.1f}x {run_ms:9.2f} "
                    f"{str(exact):>9} {ort1:9.2f} {interp1:12.2f} {ratio1:7.1f}x {ref}")
        if why:
            rows.append(f"  {'':<10} onnx.reference could not run it: {why}")
    rows.append(f"  ORT latency (batch {args.batch} / batch 1, ms):")
    for label in ("float", "qdq", "qoperator", "qlinear", "integer"):
        ort = Runner(models[label], threads=args.threads)
        tb = 1e3 * median_time(lambda: ort.run({"input": xb}), args.repeats)
        t1 = 1e3 * median_time(lambda: ort.run({"input": x1}), args.repeats)
        rows.append(f"    {label:<28} {tb:8.2f} / {t1:6.2f}")
    return rows


def zoo_forms(key: str, forms) -> dict[str, onnx.ModelProto]:
    """The zoo model in each of ``forms``: "float" (as shipped), "qdq" (the bundled ``ptq``
    pipeline, calibrated on 16 samples of the zoo's calibration split, as
    tests/test_zoo_quantization.py does) and its "qlinear" and "integer" lowerings."""
    import zoo_models as zoo
    from qgraph.api import apply_pipeline

    model = zoo.zoo_model(key)
    out = {"float": model}
    if set(forms) - {"float"}:
        out["qdq"] = apply_pipeline(model, "ptq", zoo.zoo_inputs(key, 16, "calib"))
        for target in ("qlinear", "integer"):
            if target in forms:
                out[target] = lower_model(out["qdq"], target)[0]
    return {form: out[form] for form in forms}


def zoo_ratio_rows(args) -> list[str]:
    """Prints and returns: interpreter vs ORT per zoo model (benchmarks/zoo_models.py) and form (`--zoo-forms`) at
    each of `--zoo-batches`: medians of `--repeats` alternated runs on real preprocessed inputs
    and the medians of the per-pair ratios of wall time and of CPU time, one thread each (ORT
    intra-op 1, BLAS 1). A fixed-batch model runs a batch of B as B runs of one sample, in both."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import zoo_models as zoo
    from qgraph.interp import set_blas_threads

    previous = set_blas_threads(1)
    rows = [f"zoo: interpreter vs ORT, one thread each; median ms per batch of {args.repeats} alternated runs, "
            "ratios of wall and CPU time",
            f"  {'model':<18} {'form':<8} {'nodes':>5} " + " ".join(
                f"{'b' + str(b) + ' ORT':>8} {'interp':>8} {'wall':>5} {'cpu':>5}" for b in args.zoo_batches)]
    print("\n".join(rows), flush=True)
    try:
        for key in args.zoo_models:
            entry = zoo.zoo_entry(key)
            try:
                models = zoo_forms(key, args.zoo_forms)
                data = zoo.zoo_inputs(key, max(args.zoo_batches), "eval")[entry.input_name]
            except (zoo.ZooUnavailable, OSError) as exc:
                rows.append(f"  {key:<18} unavailable: {exc}")
                print(rows[-1], flush=True)
                continue
            for form, model in models.items():
                ort = Runner(model, threads=1)
                plan = compile_model(model)
                cells = []
                for b in args.zoo_batches:
                    step = 1 if entry.fixed_batch else b
                    feeds = [{entry.input_name: data[i:i + step]} for i in range(0, b, step)]
                    (ort_ms, interp_ms, wall), (_, _, cpu) = paired_clocks(
                        lambda: [ort.run(f) for f in feeds], lambda: [plan.run(f) for f in feeds], args.repeats,
                        (time.perf_counter, time.process_time))
                    cells.append(f"{ort_ms:8.1f} {interp_ms:8.1f} {wall:4.1f}x {cpu:4.1f}x")
                rows.append(f"  {key:<18} {form:<8} {len(model.graph.node):5d} " + " ".join(cells))
                print(rows[-1], flush=True)
    finally:
        if previous is not None:
            set_blas_threads(previous)
    return rows


def main() -> None:
    recycle_large_arrays()  # as `qgraph diff` does
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--width", type=int, default=8, help="base channel width of the bundled builders")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["resnet", "mobilenetv2"])
    parser.add_argument("--threads", type=int, default=0,
                        help="ORT intra-op threads and BLAS threads (0: each library's default)")
    parser.add_argument("--zoo", action="store_true", help="also time every zoo model (benchmarks/zoo_models.py)")
    parser.add_argument("--zoo-only", action="store_true", help="only the zoo section")
    parser.add_argument("--zoo-models", nargs="+", default=ZOO_KEYS)
    parser.add_argument("--zoo-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--zoo-forms", nargs="+", default=ZOO_FORMS, choices=ZOO_FORMS,
                        help="float: the model as shipped; qdq: after the bundled ptq pipeline; qlinear, integer: "
                             "its lowerings")
    args = parser.parse_args()
    if args.zoo_only:
        zoo_ratio_rows(args)  # prints each row as it is measured
        return
    data = load_dataset("mnist", "val", image_size=None if args.image_size == 28 else args.image_size)["input"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args, data, Path(tmp))
    print("\n".join(rows))
    if args.zoo:
        zoo_ratio_rows(args)


ZOO_FORMS = ["float", "qdq", "qlinear", "integer"]
ZOO_KEYS = ["nudenet_320n", "ddddocr_det", "ddddocr_ocr", "ddddocr_ocr_old", "pplcnet", "pplcnet_textdir",
            "vit_encoder", "db_detector", "svtr_recognizer", "ppocr_det", "ppocr_cls", "ppocr_rec"]


if __name__ == "__main__":
    main()
