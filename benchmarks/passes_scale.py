"""Scale benchmark: time and peak memory of the float passes on ResNet-50-size models.

    python benchmarks/passes_scale.py [--sizes 64,128] [--skip-memory]

For each width (64 = ResNet-50: bottlenecks (3, 4, 6, 3), 224x224, 1000 classes, ~25 M
parameters; 128 ≈ 4x the parameters) a fresh subprocess loads the saved model and runs
load → canonicalize → fuse_conv_bn forward (on its own copy) → equalize → fuse_conv_bn fold →
ahead_relu → save, timing each stage; a second subprocess repeats it under tracemalloc for
each stage's peak Python/NumPy allocation. Peak RSS is the process's ru_maxrss above its
post-import baseline. Goals: pipeline < 5 s on 2 cores for ResNet-50, peak < 3x model size,
time linear in model size. Passes not registered yet are skipped with a note. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

STAGES = ("load", "canonicalize", "fuse_conv_bn forward", "equalize", "fuse_conv_bn fold", "ahead_relu", "save")


def build(width: int, path: Path) -> int:
    import onnx

    from qgraph.models.builders import build_model
    model = build_model("resnet", input_shape=(3, 224, 224), width=width, blocks=(3, 4, 6, 3), bottleneck=True,
                        num_classes=1000)
    onnx.save(model, str(path))
    return sum(int(t.raw_data.__len__() or 0) for t in model.graph.initializer) // 4


def run_stages(path: str, memory: bool) -> dict:
    """Run every stage once; times in seconds, tracemalloc peaks in bytes (with `memory`)."""
    from qgraph.graph import QModel
    from qgraph.model_io import load_model, save_model
    from qgraph.pipeline import PassContext, all_passes, run_pass
    passes = all_passes()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, peaks, notes = {}, {}, []
    state: dict = {}

    def stage(name, fn):
        if memory:
            tracemalloc.start()
        start = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - start
        if memory:
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    def maybe(name, pass_name, params, target="model"):
        if pass_name not in passes:
            notes.append(f"{pass_name} not registered: skipped")
            return
        stage(name, lambda: state.__setitem__(name, run_pass(state[target], pass_name, params, PassContext())))

    stage("load", lambda: state.update(proto=load_model(path), model=None))
    stage("canonicalize", lambda: (state.__setitem__("model", QModel.from_onnx(state["proto"])),
                                   run_pass(state["model"], "canonicalize", {}, PassContext())))
    if "fuse_conv_bn" in passes:
        def forward():
            state["copy"] = QModel.from_onnx(state["proto"])
            run_pass(state["copy"], "fuse_conv_bn", {"mode": "forward"}, PassContext())
            state.pop("copy")
        stage("fuse_conv_bn forward", forward)
    state.pop("proto")
    maybe("equalize", "equalize", {})
    maybe("fuse_conv_bn fold", "fuse_conv_bn", {"mode": "fold"})
    maybe("ahead_relu", "ahead_relu", {})
    out = path + ".out.onnx"
    stage("save", lambda: save_model(state["model"].to_onnx(), out))
    os.unlink(out)
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) * 1024
    sets = len(state.get("equalize", {}).get("sets", []))
    return {"times": times, "peaks": peaks, "rss": rss, "notes": notes, "cle_sets": sets}


def child(args) -> None:
    print(json.dumps(run_stages(args.child, args.memory)))


def measure(path: Path, memory: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path)] + (["--memory"] if memory else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed for {path}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128", help="comma-separated resnet widths")
    parser.add_argument("--skip-memory", action="store_true", help="skip the tracemalloc run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    widths = [int(w) for w in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in widths:
            path = Path(tmp) / f"resnet_w{width}.onnx"
            params = build(width, path)
            timing = measure(path, memory=False)
            mem = None if args.skip_memory else measure(path, memory=True)
            results.append((width, params, path.stat().st_size, timing, mem))
            print(f"width {width}: {params / 1e6:.1f} M params measured", file=sys.stderr)

    base_w, base_params, base_size, base_t, _ = results[0]
    print(f"\n{'stage':<22}" + "".join(f"{f'w{w} ({p / 1e6:.0f}M) s':>17}{'peak MB':>9}"
                                         for w, p, *_ in results) + f"{'time ratio':>12}")
    for name in STAGES:
        if name not in base_t["times"]:
            continue
        row = f"{name:<22}"
        for _, _, _, t, mem in results:
            peak = f"{mem['peaks'][name] / 2**20:9.0f}" if mem and name in mem["peaks"] else f"{'-':>9}"
            row += f"{t['times'].get(name, float('nan')):17.2f}{peak}"
        ratio = results[-1][3]["times"].get(name, float("nan")) / max(base_t["times"][name], 1e-9)
        print(row + f"{ratio:12.2f}")
    totals = [sum(t["times"].values()) for *_, t, _ in results]
    print(f"{'total':<22}" + "".join(f"{tot:17.2f}{'':9}" for tot in totals)
          + f"{totals[-1] / totals[0]:12.2f}")
    print()
    for width, params, size, t, mem in results:
        peak = max(mem["peaks"].values()) if mem else 0
        print(f"w{width}: {params / 1e6:.1f} M params, file {size / 2**20:.0f} MB, peak RSS over baseline "
              f"{t['rss'] / 2**20:.0f} MB ({t['rss'] / size:.2f}x), worst stage tracemalloc peak "
              f"{peak / 2**20:.0f} MB ({peak / size:.2f}x), {t['cle_sets']} CLE sets")
    print(f"parameter ratio {results[-1][1] / base_params:.2f}; total time ratio {totals[-1] / totals[0]:.2f}")
    for note in sorted({n for *_, t, _ in results for n in t["notes"]}):
        print("note:", note)


if __name__ == "__main__":
    main()
