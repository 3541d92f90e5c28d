"""Accuracy tools benchmark: analyze, mixed precision, bias correction and AdaRound.

    .venv/bin/python benchmarks/accuracy_tools.py [--parts repair,zoo,scale] [--models ...]
                                                  [--zoo-model svtr_recognizer] [--calib-images 16] [--images 8]
                                                  [--cost bytes|model_bytes|bitops] [--weight-rounding gptq]
                                                  [--no-float] [--no-analyze] [--scale-images 64]

Three parts, each against its goal from issue 14:

- `repair`: every bundled model trained in float on MNIST (benchmarks/ptq.py's cache, 5 epochs),
  calibrated on the first 512 train digits, scored on the 1,000 val digits: float; int8 PTQ;
  W4A8 PTQ; W4A8 with CLE + AdaRound + bias correction; int8 with the same repairs.
  Goal: W4A8 + repairs within 1 point of float everywhere; int8 unchanged or better.
- `zoo`: the zoo model with the worst int8 fidelity (`--zoo-model`; since ptq.yaml's activations
  use percentile 99.999 that is the untrained SVTR-like recognizer, svtr_recognizer, worst-sample
  cosine 0.624 in tests/test_zoo_quantization.py): `qgraph analyze` names the quantizers that
  cost most, and `mixed_precision` targets output cosine 0.999. Goal: cosine >= 0.999 on
  held-out images with >= 90% of the weight bytes in 8 bits or fewer. Beside each cosine, the task
  agreement with float (zoo_models.task_agreement: boxes matched, identical strings).
- `scale`: analyze on ResNet-50 (untrained, 224x224, real photos from the zoo's scikit-image
  pictures) with `--scale-images` images: local per-quantizer sensitivity of every quantizer,
  1 worker vs 2 local workers. Goal: under 10 minutes on 2 cores; report the 1/2 ratio.

Measured (2 shared cores; see the bottom of this docstring for what was not met and why):

    repair (top-1 % on 1,000 val digits; AdaRound 500 steps per layer; seconds of the W4A8 repairs;
    measured 2026-11-29 on 2 cores shared with other jobs, load average ~5)
    model        float  int8   W4A8  W4A8+CLE+AdaRound+BC  int8+same  W4A8+CLE+GPTQ+BC  s (AdaRound, GPTQ)
    lenet        95.9   95.9   95.4  95.7                  95.9       95.5              76, 12
    resnet       94.4   94.9   87.4  93.6                  93.9       94.1              30, 23
    mobilenetv2  92.6   92.9   80.0  92.1                  92.7       92.9              66, 59
    mlp          92.3   92.3   91.8  91.9                  92.3       92.3              66, 3

    GPTQ in AdaRound's place (`--parts repair`, the last column): every model within 0.4 points
    of float (AdaRound: within 0.8), in less time.

    W4A8 + repairs is within 1 point of float on every model (worst: resnet, -0.8). The int8
    PTQ pipeline (ptq.yaml) is unchanged (same numbers as benchmarks/ptq.py); the repairs add
    nothing to int8 here and cost resnet a point (93.9 vs 94.9, inside the ~1-point paired
    noise of 1,000 digits), so they are for low-bit weights, not a default for int8. The W4A8
    baseline with minmax weights measured 87.4 / 80.0 (resnet / mobilenetv2) on this machine;
    the issue's 88.7 / 90.4 were the best of minmax and mse weight observers.

    zoo: svtr_recognizer (3x48x320 text strips, output [N, 40, 97]), 16 calibration / 8 held-out
    strips, batch 1, 2 local workers; 2 cores shared with other jobs (load average 2.5-5)
    int8 PTQ (ptq.yaml): held-out output cosine 0.59796 (all outputs as one vector)
    analyze, 132 quantizers: 21-35 s. First tensor under 20 dB: 'batch_norm_3.tmp_2'. Costliest
    alone (output SNR / cosine): 'conv2d_0.w_0' (the stem Conv's weight) 2.5 dB / 0.727,
    'batch_norm_0.tmp_2' 2.6 / 0.738, 'p2o.Div.26' 4.3 / 0.796, 'p2o.AveragePool.0' 4.4 / 0.800,
    'p2o.Div.0' 5.2 / 0.854. Every 8-bit weight alone: 20.8-26.9 dB for the big Convs
    (conv2d_14/16/18/20/31: 16,384 weights each; conv2d_30: 65,536, 18.5% of the weight bytes,
    26.5 dB), 38-47 dB for the Linear layers.
    mixed_precision (target cosine 0.999, measure own):
      before 16-bit ranges were widened (commit 49b281b): 6 rounds, 23 s, 87 a16 + 41 weights float,
      cosine 0.9585 on the calibration strips, target not met — the 16-bit grids kept the
      percentile ranges, whose clipping does not shrink with the step (all activations 16-bit
      and all weights float: held-out cosine 0.953).
      after: 1 round, 40 s, 109 quantizers changed (82 a16, 5 a8, 18 w8, 27 weights float);
      cosine 0.99944 on the calibration strips, 0.99615 on the held-out ones; 11.3% of the
      weight bytes in <= 8 bits.
    Goal not met, and not reachable with 8-bit weights on this model: the budget of cosine
    0.999 is a summed noise of 1/0.999² − 1 = 0.0020 (27.0 dB); conv2d_30.w_0 alone at 8 bits
    costs 26.5 dB (0.0022), and keeping the weights with the least measured noise per byte
    under the budget (activations free) keeps at most 37% of the weight bytes at 8 bits. The
    builder's weights are untrained (models/exported.py's "Known limit"): its 1x1 Conv weights
    are one ~1.0 entry per output channel over noise of std 0.07-0.1 (kurtosis 57-138), so a
    per-channel 8-bit grid leaves 88% of its levels unused (local SNR 30.6-33.6 dB), and CLE
    (equalize) does not change that (held-out int8 cosine 0.5960 with it).
    pplcnet_textdir (3x48x192 strips, same sizes): int8 0.81863 held-out; mixed_precision 14 s,
    60 a16, 8 a8, 16 w8, 17 weights float, 2 rounds, cosine 0.99912 calibration / 0.99960
    held-out, 71.6% of weight bytes in <= 8 bits (goal not met). Here the additive model would
    keep 94.8% at 8 bits, but the first assignment measured 0.99806 where it predicted 0.999
    (0.99634 with `measure: all`, so not the s² scaling): the noise of many quantizers compounds
    in these untrained nets, and each halved budget floats more weights. `cost: bitops`: 68.0%.
    pplcnet (3x224x224 photos, 1 worker, load ~10): int8 0.94107 held-out; mixed_precision 31 s,
    53 a16, 27 weights float; cosine 0.99986 calibration but 0.98068 held-out (16 calibration
    photos do not predict held-out ones on this untrained classifier); 37.6% at <= 8 bits.
    with GPTQ-rounded weights (`--weight-rounding gptq --no-float --cost model_bytes`, 2026-11-29):
      svtr_recognizer (16 / 8 strips): 1 round, 72 s, 87 a16, 22 w16, 2 w4, 21 w8; cosine 0.99901
      calibration, 0.98591 held-out; 54.4% of the weight bytes in <= 8 bits (11.3% before). The
      untrained builder's outlier-and-noise weights stay the limit, and 16 strips overfit.
      ppocr_rec, the real model with the worst int8 fidelity (PP-OCRv4's recognizer from the
      rapidocr wheel; `--zoo-model ppocr_rec --calib-images 32 --images 32 --workers 2`): int8
      held-out 0.96705; analyze 154 quantizers in 626 s (first tensor under 20 dB: p2o.Mul.9;
      costliest alone: p2o.Add.31 12.2 dB, p2o.Add.11, p2o.Add.3, conv2d_157.w_0 15.4 dB);
      mixed_precision 531 s, 3 rounds, 101 a16, 20 w16, 1 w4, 32 w8: cosine 0.99972 calibration,
      **0.99993 held-out, 94.7% of the weight bytes in <= 8 bits — goal met on this model**.
      Without GPTQ (round-to-nearest, same menu) it had stopped at 33%: one 8-bit 1x1 conv of the
      SVTR neck alone cost 0.002-0.003 of cosine; compensated, 0.0006 (local SNR 43 -> 60 dB).
    task metrics (issue 12's goal: detection >= 95% of float's boxes matched, OCR >= 90% identical
    strings), 2026-11-29: 32 calibration / 32 held-out real inputs from the zoo's "calib" / "eval"
    splits, 1 worker, 2 cores shared with other jobs (load average 4-6), each model run alone:
      .venv/bin/python benchmarks/accuracy_tools.py --parts zoo --zoo-model KEY --no-analyze
          --weight-rounding gptq --no-float --cost model_bytes --calib-images 32 --images 32 --workers 1
    model            int8 cos  int8 task            MP cos   MP task              <=8-bit  MP s   task goal
    ddddocr_det      0.99774   83/88 boxes   94.3%  -        -                    -        >1500  not measured (stopped)
    ppocr_det        0.87062   46/53 boxes   86.8%  0.99824  49/53 boxes   92.5%  94.0%    1192   missed by 2.5 points
    db_detector      0.99007   72/82 boxes   87.8%  0.99928  78/82 boxes   95.1%  99.6%    322    met
    ddddocr_ocr_old  0.99758   28/32 strings 87.5%  0.99847  26/32 strings 81.2%  100.0%   368    missed by 8.8 points
    ppocr_rec        0.96705   19/32 strings 59.4%  0.99993  32/32 strings 100%   94.7%    514    met
    (cos: held-out cosine of the first output, all 32 inputs as one vector; MP: mixed_precision,
    target cosine 0.999 on the calibration inputs; <=8-bit: share of the weight bytes, >= 90% wanted;
    ddddocr_ocr_old's one w16 weight is at most 0.05% of its bytes.) Mixed precision finishes the job
    on db_detector and ppocr_rec. On ppocr_det it lifts the boxes from 86.8% to 92.5%, 2 boxes short
    of 95%: it met the target on the calibration inputs (0.99948), not on the held-out ones (0.99824).
    On ddddocr_ocr_old it does not help the strings: calibration cosine 0.99904 (held-out 0.99847,
    above int8's 0.99758) bought with 7 4-bit weights, yet 2 strings fewer than int8, 3 short of 90%:
    the output cosine, one number over every step and class, does not bound each step's argmax, so
    strings need a tighter target or a task-level one. ddddocr_det's search (one switchboard run of
    32 416x416 inputs per quantizer, GPTQ per weight grid) did not end in 25 minutes and was stopped;
    with 32 calibration inputs its int8 model is already at 94.3% (zoo.py, 16 inputs: 75/88).
    A tighter target and 8/16-bit weights only (`--target-value T --weight-bits 8,16`, same data and
    options, 2026-11-29 stop 23):
    model            target  MP cos   MP task               <=8-bit  MP s   task goal
    ppocr_det        0.9995  0.99919  51/53 boxes    96.2%  99.7%    906    met (113 a16, 4 w16)
    ppocr_det        0.9999  0.99989  53/53 boxes   100.0%  48.3%    632    met (half the bytes 16-bit)
    ddddocr_ocr_old  0.9999  0.99930  26/32 strings  81.2%  100.0%   178    not reachable: see below
    ddddocr_ocr_old's reference is the shipped model, which ORT's quantize_dynamic wrote: it
    quantizes every activation on the fly. Its own float weights (dequantize_dynamic, the model
    qgraph quantizes) agree with it on 27 of the 32 strings at output cosine 0.99937, and int8 ptq
    on 28 (27-28 against the float weights): at this cosine these CTC argmaxes flip under any
    perturbation, so no faithful requantization of the float weights reaches 90% against the
    shipped model. Builders, `--target-value 0.9999` (float allowed, GPTQ, 32 / 32): svtr_recognizer
    held-out 0.99879 (int8 0.65782), 25/32 strings, 17.8% of weight bytes <= 8-bit;
    pplcnet_textdir 0.99959 (int8 0.92557), 32/32 top-1, 88.1%; pplcnet at 0.999: 0.99007 (int8
    0.75687), 24/32 top-1, 98.2%.
    scale: ResNet-50 (125 quantizers, 64 real 224x224 photos, batch 8); 2 cores shared with other
    jobs (load average 8-11 throughout, so wall times are 2-4x what 2 free cores would give;
    CPU seconds are this process and its workers)
    before: one local run on the Where switchboard 33-50 s at load ~7 (estimated 70 min on 1
    worker, 35 min on 2), and still 32 s at load ~3 with 4a9d4c6's weights swapped as constants.
    now, one local run alone (load ~3): 5.3-6.0 s, about one float run (the float model: 6.1 s
    for the 64 images). Each variant runs as the switchboard with its switches set
    (analyze.materialize); the serial part's comparisons sum finite tensors as dot products (it
    spent 2/3 of its time in NaN-aware sums: 659 s wall at load ~11 before).
    whole analyze (`--parts scale`), 2 local workers: 1386 s wall, 616 s CPU (load 10.8)
                                    1 local worker:   837 s wall, 651 s CPU (load 5.2)
    same sensitivity ranking from both. Ratio 1/2 workers (wall): 0.60x — the other jobs' load
    halved between the two runs, so this says nothing about scaling; the CPU time does: the
    same work (616 vs 651 s) split over processes, the local runs independent tasks.
    again when the other jobs had stopped (load average 1.0-1.9; the same models and photos,
    analyze_models called as this script does):
                                    2 local workers:  400 s wall, 687 s CPU
                                    1 local worker:   750 s wall, 758 s CPU
    1/2 workers: 1.88x. Goal met on the free machine: 6.7 minutes for all 125 quantizers on 2 cores.
    1 vs 2 workers before, measured on MNIST MobileNetV2 (45 quantizers, 1,000 val digits):
    233 s vs 119 s = 1.96x.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qgraph.analyze import analyze_models, public  # noqa: E402
from qgraph.api import apply_pipeline  # noqa: E402
from qgraph.graph import QModel  # noqa: E402
from qgraph.models.builders import build_model  # noqa: E402
from qgraph.models.datasets import load_dataset  # noqa: E402
from qgraph.parallel import Evaluator  # noqa: E402
from qgraph.pipeline import PassContext, run_pass  # noqa: E402
from qgraph.runner import run_model, top1_accuracy  # noqa: E402

MODELS = ("lenet", "resnet", "mobilenetv2", "mlp")


def ptq(float_model: onnx.ModelProto, calib: dict, weight_bits: int, repair: bool,
        adaround_iterations: int = 500, rounding: str = "adaround") -> onnx.ModelProto:
    model = QModel.from_onnx(float_model)
    ctx = PassContext(data=calib, batch_size=64)
    run_pass(model, "canonicalize", {}, ctx)
    run_pass(model, "fuse_conv_bn", {"mode": "fold"}, ctx)
    run_pass(model, "ahead_relu", {}, ctx)
    if repair:
        run_pass(model, "equalize", {}, ctx)
    run_pass(model, "insert_qdq", {"weights": {"bits": weight_bits}}, ctx)
    run_pass(model, "calibrate", {"progress": False}, ctx)
    if repair:
        run_pass(model, rounding, {"iterations": adaround_iterations} if rounding == "adaround" else {}, ctx)
        run_pass(model, "bias_correction", {}, ctx)
    return model.to_onnx()


def part_repair(models, workdir: Path) -> None:
    from ptq import trained_float
    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
    calib = {"input": train["input"][:512]}
    print(f"{'model':<12} {'float':>6} {'int8':>6} {'W4A8':>6} {'W4A8+rep':>9} {'int8+rep':>9} {'W4A8+GPTQ':>10}"
          "  seconds(W4A8+rep, W4A8+GPTQ)")
    for name in models:
        float_model = trained_float(name, workdir, train, val, 5)
        row = [100 * top1_accuracy(float_model, val)]
        row.append(100 * top1_accuracy(ptq(float_model, calib, 8, False), val))
        row.append(100 * top1_accuracy(ptq(float_model, calib, 4, False), val))
        start = time.perf_counter()
        row.append(100 * top1_accuracy(ptq(float_model, calib, 4, True), val))
        seconds = time.perf_counter() - start
        row.append(100 * top1_accuracy(ptq(float_model, calib, 8, True), val))
        start = time.perf_counter()
        row.append(100 * top1_accuracy(ptq(float_model, calib, 4, True, rounding="gptq"), val))
        gptq_seconds = time.perf_counter() - start
        print(f"{name:<12} " + " ".join(f"{v:6.1f}" if i < 3 else f"{v:9.1f}" if i < 5 else f"{v:10.1f}"
                                        for i, v in enumerate(row))
              + f"  {seconds:.1f}, {gptq_seconds:.1f}", flush=True)


def _cosine(a, b) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def part_zoo(key: str, calib_images: int, images: int, workers: int, cost: str = "bytes",
             weight_rounding: str = "nearest", allow_float: bool = True, analyze: bool = True,
             target_value: float = 0.999, weight_bits: tuple = (4, 8, 16)) -> None:
    import zoo_models as zoo
    from qgraph.model_io import load_model
    # a wheel model at opset 17, as qgraph users load it; a builder's model as the zoo tests build it
    float_model = load_model(zoo.zoo_model_path(key)) if zoo.zoo_entry(key).wheel else zoo.zoo_model(key)
    calib = zoo.zoo_inputs(key, calib_images, "calib")
    held = zoo.zoo_inputs(key, images, "eval")
    start = time.perf_counter()
    int8 = apply_pipeline(float_model, "ptq", calib, batch_size=1)
    print(f"{key}: int8 ptq {time.perf_counter() - start:.1f}s", flush=True)
    out = float_model.graph.output[0].name
    reference = run_model(float_model, held)[out] if _batch_free(float_model) else _run_each(float_model, held, out)
    int8_out = _run_each(int8, held, out)
    print(f"  int8 held-out output cosine {_cosine(reference, int8_out):.5f}", flush=True)
    task = _task_agreement(key, float_model, held)
    print(f"  int8 held-out task: {task(int8)}", flush=True)
    if analyze:
        start = time.perf_counter()
        report = analyze_models(float_model, int8, calib, batch_size=1, evaluator=Evaluator(workers))
        print(f"  analyze: {len(report['quantizers'])} quantizers, {time.perf_counter() - start:.0f}s; "
              f"first tensor under 20 dB: {(report['first_below_threshold'] or {}).get('tensor')}")
        for row in report["sensitivity"][:8]:
            print(f"    {row['output_snr_db']:6.1f} dB  cosine {row['output_cosine']:.5f}  {row['group']}")
    model = QModel.from_onnx(int8)
    start = time.perf_counter()
    mp = run_pass(model, "mixed_precision", {"target": "cosine", "value": target_value, "workers": workers,
                                             "cost": cost, "weight_rounding": weight_rounding,
                                             "allow_float": allow_float, "weight_bits": list(weight_bits)},
                  PassContext(data=calib, batch_size=1))
    mixed = model.to_onnx()
    share = mp["weight_bytes_8bit_or_less"] / mp["weight_bytes"]
    print(f"  mixed_precision {time.perf_counter() - start:.0f}s: {mp['summary']}")
    for step in mp.get("history", []):
        print(f"    budget {step['budget']:.3g}: measured {step['measured']:.6f}, cost {step['cost']:.0f}")
    print(f"  weight bytes in <= 8 bits: {100 * share:.1f}%; held-out output cosine "
          f"{_cosine(reference, _run_each(mixed, held, out)):.5f}", flush=True)
    print(f"  mixed precision held-out task: {task(mixed)}", flush=True)


def _task_agreement(key: str, float_model: onnx.ModelProto, held: dict):
    """A scorer of a model's task outputs (boxes matched, identical strings) against the float model's,
    run as benchmarks/zoo.py runs them."""
    import zoo_models as zoo
    entry = zoo.zoo_entry(key)
    inputs = held[entry.input_name]
    reference = zoo.run_entry(entry, zoo.ort_session(float_model), inputs)

    def score(model: onnx.ModelProto) -> str:
        share, text = zoo.task_agreement(entry, reference, zoo.run_entry(entry, zoo.ort_session(model), inputs))
        return f"{text} ({100 * share:.1f}%)"
    return score


def _batch_free(model: onnx.ModelProto) -> bool:
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return not dim.HasField("dim_value")


def _run_each(model: onnx.ModelProto, data: dict, output: str) -> np.ndarray:
    from qgraph.runner import Runner
    runner = Runner(model)
    name = next(iter(data))
    return np.concatenate([runner.run({name: data[name][i:i + 1]}, [output])[output] for i in range(len(data[name]))])


def part_scale(images: int) -> None:
    import zoo_models as zoo
    float_model = build_model("resnet", input_shape=(3, 224, 224), width=64, blocks=(3, 4, 6, 3), bottleneck=True,
                              num_classes=1000)
    pictures = zoo.zoo_inputs("pplcnet", images, "eval")["x"]
    data = {"input": pictures.astype(np.float32)}
    quantized = apply_pipeline(float_model, "ptq", {"input": pictures[:16]}, batch_size=8)
    times = {}
    reports = {}
    for workers in (2, 1):
        start, cpu = time.perf_counter(), _cpu_seconds()
        reports[workers] = public(analyze_models(float_model, quantized, data, batch_size=8,
                                                 evaluator=Evaluator(workers)))
        times[workers] = time.perf_counter() - start
        print(f"  ResNet-50, {images} images, {len(reports[workers]['quantizers'])} quantizers, "
              f"{workers} worker(s): {times[workers]:.0f}s wall, {_cpu_seconds() - cpu:.0f}s CPU "
              f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"  1 worker / 2 workers: {times[1] / times[2]:.2f}x; same ranking: "
          f"{[r['group'] for r in reports[1]['sensitivity']] == [r['group'] for r in reports[2]['sensitivity']]}")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers: what a run costs whatever the load."""
    import resource
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="repair,zoo,scale")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--zoo-model", default="svtr_recognizer", help="zoo model key(s), comma-separated")
    parser.add_argument("--no-analyze", action="store_true", help="zoo part: skip analyze, run mixed precision")
    parser.add_argument("--images", type=int, default=8, help="zoo held-out images")
    parser.add_argument("--calib-images", type=int, default=16, help="zoo calibration images")
    parser.add_argument("--scale-images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cost", default="bytes", help="mixed_precision's cost in the zoo part")
    parser.add_argument("--weight-rounding", default="nearest", help="mixed_precision's weight_rounding (zoo part)")
    parser.add_argument("--no-float", action="store_true", help="mixed_precision without float layers (zoo part)")
    parser.add_argument("--target-value", type=float, default=0.999, help="mixed_precision's cosine target (zoo part)")
    parser.add_argument("--weight-bits", default="4,8,16", help="mixed_precision's weight widths (zoo part)")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/qgraph-bench"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    if "repair" in parts:
        part_repair(args.models.split(","), workdir)
    if "zoo" in parts:
        for key in args.zoo_model.split(","):
            part_zoo(key, args.calib_images, args.images, args.workers, args.cost, args.weight_rounding,
                     not args.no_float, not args.no_analyze, args.target_value,
                     tuple(int(b) for b in args.weight_bits.split(",")))
    if "scale" in parts:
        part_scale(args.scale_images)


if __name__ == "__main__":
    main()
