"""Accuracy tools benchmark: analyze, mixed precision, bias correction and AdaRound.

    .venv/bin/python benchmarks/accuracy_tools.py [--parts repair,zoo,scale] [--models ...]
                                                  [--zoo-model ddddocr_det] [--images 8] [--scale-images 64]

Three parts, each against its goal from issue 14:

- `repair`: every bundled model trained in float on MNIST (benchmarks/ptq.py's cache, 5 epochs),
  calibrated on the first 512 train digits, scored on the 1,000 val digits: float; int8 PTQ;
  W4A8 PTQ; W4A8 with CLE + AdaRound + bias correction; int8 with the same repairs.
  Goal: W4A8 + repairs within 1 point of float everywhere; int8 unchanged or better.
- `zoo`: the zoo model with the worst int8 fidelity (ddddocr's YOLOX detector, output cosine
  0.987 in benchmarks/zoo.py): `qgraph analyze` names the quantizers that cost most, and
  `mixed_precision` targets output cosine 0.999. Goal: cosine >= 0.999 on held-out images with
  >= 90% of the weight bytes in 8 bits or fewer.
- `scale`: analyze on ResNet-50 (untrained, 224x224, real photos from the zoo's scikit-image
  pictures) with `--scale-images` images: local per-quantizer sensitivity of every quantizer,
  1 worker vs 2 local workers. Goal: under 10 minutes on 2 cores; report the 1/2 ratio.

Measured (2 shared cores; see the bottom of this docstring for what was not met and why):

    repair (top-1 % on 1,000 val digits; AdaRound 500 steps per layer; seconds of the W4A8 repair)
    model        float   int8   W4A8   W4A8+CLE+AdaRound+BC   int8+CLE+AdaRound+BC   s
    lenet        95.9    96.0   95.4   95.6                   95.9                   40
    resnet       94.4    94.9   87.7   93.7                   93.9                   26
    mobilenetv2  92.6    92.8   80.4   92.2                   92.5                   64
    mlp          92.3    92.3   92.0   92.0                   92.3                   44

    W4A8 + repairs is within 1 point of float on every model (worst: resnet, -0.7). The int8
    PTQ pipeline (ptq.yaml) is unchanged (same numbers as benchmarks/ptq.py); the repairs add
    nothing to int8 here and cost resnet a point (93.9 vs 94.9, inside the ~1-point paired
    noise of 1,000 digits), so they are for low-bit weights, not a default for int8. The W4A8
    baseline with minmax weights measured 87.7 / 80.4 (resnet / mobilenetv2) on this machine;
    the issue's 88.7 / 90.4 were the best of minmax and mse weight observers.

    zoo: ddddocr_det (fixed batch 1, 3x416x416), 8 calibration / 8 held-out images
    int8 PTQ (ptq.yaml): held-out output cosine 0.98367
    analyze, 349 quantizers, 2 local workers: 600 s (load average ~10 from other jobs on the
    2 cores; 986 s in a second run at load ~7). First tensor under 20 dB: '886'. Costliest alone
    (output SNR / cosine): '880' 21.2 dB / 0.99627, '886' 22.0 / 0.99688, '895' 23.9 / 0.99795,
    '511' 25.4 / 0.99857, '519' 26.0 / 0.99875: the activation quantizers on the outputs of
    backbone Convs that feed SiLU (x·sigmoid(x), exported as Sigmoid + Mul) and on the SiLU
    products ('511', '519') — wide, signed ranges of which SiLU keeps mostly the small part.
    mixed_precision (target cosine 0.999): not measured to the end — the first run was cut by
    my own 50-minute timeout during its 698 single-quantizer runs at load ~7-10; the pass now
    measures each quantizer once (349 runs) and scales the noise to the other grids.

    scale: ResNet-50 (126 quantizers, 64 real 224x224 photos, batch 8), load average ~7 on 2 cores
    float model, 1 ORT thread:                 15 s for the 64 images
    ORT running the QDQ model itself:          32 s
    one local run on the switchboard:          33-50 s  (its 72 activation Q/DQ/Where cost ~20 s)
    estimated all 126 local runs: 70 min on 1 worker, 35 min on 2 (goal 10 min: not met)
    1 vs 2 workers, measured on MNIST MobileNetV2 (45 quantizers, 1,000 val digits):
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
        adaround_iterations: int = 500) -> onnx.ModelProto:
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
        run_pass(model, "adaround", {"iterations": adaround_iterations}, ctx)
        run_pass(model, "bias_correction", {}, ctx)
    return model.to_onnx()


def part_repair(models, workdir: Path) -> None:
    from ptq import trained_float
    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
    calib = {"input": train["input"][:512]}
    print(f"{'model':<12} {'float':>6} {'int8':>6} {'W4A8':>6} {'W4A8+rep':>9} {'int8+rep':>9}  seconds(W4A8+rep)")
    for name in models:
        float_model = trained_float(name, workdir, train, val, 5)
        row = [100 * top1_accuracy(float_model, val)]
        row.append(100 * top1_accuracy(ptq(float_model, calib, 8, False), val))
        row.append(100 * top1_accuracy(ptq(float_model, calib, 4, False), val))
        start = time.perf_counter()
        row.append(100 * top1_accuracy(ptq(float_model, calib, 4, True), val))
        seconds = time.perf_counter() - start
        row.append(100 * top1_accuracy(ptq(float_model, calib, 8, True), val))
        print(f"{name:<12} " + " ".join(f"{v:6.1f}" if i < 3 else f"{v:9.1f}" for i, v in enumerate(row))
              + f"  {seconds:.1f}", flush=True)


def _cosine(a, b) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def part_zoo(key: str, images: int, workers: int) -> None:
    import zoo_models as zoo
    from qgraph.model_io import load_model
    float_model = load_model(zoo.zoo_model_path(key))   # opset 17, as qgraph users load it
    calib = zoo.zoo_inputs(key, images, "calib")
    held = zoo.zoo_inputs(key, images, "eval")
    start = time.perf_counter()
    int8 = apply_pipeline(float_model, "ptq", calib, batch_size=1)
    print(f"{key}: int8 ptq {time.perf_counter() - start:.1f}s", flush=True)
    out = float_model.graph.output[0].name
    reference = run_model(float_model, held)[out] if _batch_free(float_model) else _run_each(float_model, held, out)
    int8_out = _run_each(int8, held, out)
    print(f"  int8 held-out output cosine {_cosine(reference, int8_out):.5f}", flush=True)
    start = time.perf_counter()
    report = analyze_models(float_model, int8, calib, batch_size=1, evaluator=Evaluator(workers))
    print(f"  analyze: {len(report['quantizers'])} quantizers, {time.perf_counter() - start:.0f}s; "
          f"first tensor under 20 dB: {(report['first_below_threshold'] or {}).get('tensor')}")
    for row in report["sensitivity"][:8]:
        print(f"    {row['output_snr_db']:6.1f} dB  cosine {row['output_cosine']:.5f}  {row['group']}")
    model = QModel.from_onnx(int8)
    start = time.perf_counter()
    mp = run_pass(model, "mixed_precision", {"target": "cosine", "value": 0.999, "workers": workers},
                  PassContext(data=calib, batch_size=1))
    mixed = model.to_onnx()
    share = mp["weight_bytes_8bit_or_less"] / mp["weight_bytes"]
    print(f"  mixed_precision {time.perf_counter() - start:.0f}s: {mp['summary']}")
    print(f"  weight bytes in <= 8 bits: {100 * share:.1f}%; held-out output cosine "
          f"{_cosine(reference, _run_each(mixed, held, out)):.5f}", flush=True)


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
        start = time.perf_counter()
        reports[workers] = public(analyze_models(float_model, quantized, data, batch_size=8,
                                                 evaluator=Evaluator(workers)))
        times[workers] = time.perf_counter() - start
        print(f"  ResNet-50, {images} images, {len(reports[workers]['quantizers'])} quantizers, "
              f"{workers} worker(s): {times[workers]:.0f}s", flush=True)
    print(f"  1 worker / 2 workers: {times[1] / times[2]:.2f}x; same ranking: "
          f"{[r['group'] for r in reports[1]['sensitivity']] == [r['group'] for r in reports[2]['sensitivity']]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="repair,zoo,scale")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--zoo-model", default="ddddocr_det")
    parser.add_argument("--images", type=int, default=8, help="zoo calibration and held-out images each")
    parser.add_argument("--scale-images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/qgraph-bench"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    if "repair" in parts:
        part_repair(args.models.split(","), workdir)
    if "zoo" in parts:
        part_zoo(args.zoo_model, args.images, args.workers)
    if "scale" in parts:
        part_scale(args.scale_images)


if __name__ == "__main__":
    main()
