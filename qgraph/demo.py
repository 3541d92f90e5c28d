"""`qgraph demo`: the whole chain on the bundled MNIST data, one table at the end.

build → float training (ORT) → ptq.yaml → qat.yaml + QAT training → lower to `qlinear` and
`integer` → diff against the reference interpreter. Every file it writes is a model or data
file a user can open and resume from with the CLI.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import onnx

from qgraph.api import bundled_pipeline, lower_file, run_passes, train_file
from qgraph.errors import ConfigError
from qgraph.schema import Range, check_value
from qgraph.files import atomic_write_bytes, write_json
from qgraph.model_io import load_model, save_model
from qgraph.runner import Runner, top1_accuracy

TARGETS = ("qlinear", "integer")


@dataclass(frozen=True)
class DemoPlan:
    """How big a demo run is. `quick` is for CI: smaller images, less data, fewer epochs."""
    image_size: int
    train_samples: int
    val_samples: int
    calib_samples: int
    float_epochs: int
    qat_epochs: int
    float_lr: float
    qat_lr: float
    batch_size: int

    @classmethod
    def for_mode(cls, quick: bool) -> "DemoPlan":
        if quick:
            return cls(14, 2000, 500, 256, 5, 2, 1e-2, 1e-4, 64)
        return cls(28, 4000, 1000, 512, 5, 2, 1e-2, 1e-4, 64)


def latency_ms(model, feeds: dict[str, np.ndarray], repeats: int = 20) -> float:
    """Median ORT latency of one batch, in milliseconds (one warm-up run)."""
    runner = Runner(model)
    runner.run(feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(feeds)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def run_demo(model_name: str = "mobilenetv2", out_dir: str | Path = "qgraph-demo", *, quick: bool = False,
             seed: int = 0, echo: Callable[[str], None] = print) -> dict:
    """Run the chain into `out_dir`; returns the result table (also written as JSON and Markdown)."""
    from qgraph.diff import diff_models
    from qgraph.models.builders import build_model
    from qgraph.models.datasets import load_dataset, save_npz

    plan = DemoPlan.for_mode(quick)
    out = _demo_folder(model_name, out_dir, seed)
    started = time.perf_counter()

    def step(text: str) -> None:
        echo(f"[{time.perf_counter() - started:6.1f}s] {text}")

    step(f"data: bundled MNIST at {plan.image_size}x{plan.image_size}, "
         f"{plan.train_samples} train / {plan.val_samples} val")
    train = _head(load_dataset("mnist", "train", image_size=plan.image_size), plan.train_samples)
    val = _head(load_dataset("mnist", "val", image_size=plan.image_size), plan.val_samples)
    paths = {name: out / f"{name}.npz" for name in ("train", "val", "calib")}
    save_npz(train, paths["train"])
    save_npz(val, paths["val"])
    save_npz(_head(train, plan.calib_samples), paths["calib"])

    step(f"build {model_name} and train it in float ({plan.float_epochs} epochs, ORT training)")
    model = build_model(model_name, input_shape=(1, plan.image_size, plan.image_size), seed=seed)
    save_model(model, out / "model.onnx")
    train_opts = dict(batch_size=plan.batch_size, seed=seed, progress=True)
    train_file(out / "model.onnx", paths["train"], out / "float.onnx", val_path=str(paths["val"]),
               epochs=plan.float_epochs, lr=plan.float_lr, **train_opts)

    step("PTQ: ptq.yaml (canonicalize, fold BN, ahead_relu, insert_qdq, calibrate)")
    run_passes(out / "float.onnx", bundled_pipeline("ptq"), out / "ptq.onnx", data_path=str(paths["calib"]),
               echo=lambda line: None)
    step("QAT: qat.yaml (forward-fused BN, insert_qdq, calibrate with fixed activations)")
    run_passes(out / "float.onnx", bundled_pipeline("qat"), out / "prepared.onnx",
               data_path=str(paths["calib"]), echo=lambda line: None)
    step(f"QAT training ({plan.qat_epochs} epochs, lr {plan.qat_lr}, LSQ weight scales)")
    train_file(out / "prepared.onnx", paths["train"], out / "trained.onnx", val_path=str(paths["val"]),
               epochs=plan.qat_epochs, lr=plan.qat_lr, learn_scales=True, **train_opts)

    rows = [_row("float", out / "float.onnx", val, plan), _row("ptq int8 (QDQ)", out / "ptq.onnx", val, plan),
            _row("qat int8 (QDQ)", out / "trained.onnx", val, plan)]
    for source in ("ptq", "trained"):
        for target in TARGETS:
            lowered = out / f"{source}.{target}.onnx"
            step(f"lower {source}.onnx --target {target}; diff against the interpreter")
            lower_file(out / f"{source}.onnx", target, lowered)
            report = diff_models(load_model(lowered), {k: v[:plan.batch_size] for k, v in val.items()})
            label = f"{'qat' if source == 'trained' else 'ptq'} int8 lowered {target}"
            rows.append(_row(label, lowered, val, plan, bit_exact=report.bit_exact))

    result = {"model": model_name, "quick": quick, "image_size": plan.image_size,
              "train_samples": plan.train_samples, "val_samples": plan.val_samples,
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    write_json(out / "results.json", result)
    table = format_table(result)
    atomic_write_bytes(out / "report.md", (_markdown(result, table)).encode())
    step(f"done: {out / 'results.json'}, {out / 'report.md'}")
    echo(table)
    return result


DEMO_MODELS = ("lenet", "resnet", "mobilenetv2", "repvgg", "mlp")


def _demo_folder(model_name: str, out_dir, seed: int) -> Path:
    """Check the arguments before anything is written, then create the work folder."""
    if model_name not in DEMO_MODELS:
        raise ConfigError(f"--model {model_name!r} is not a bundled demo model; choose one of: {', '.join(DEMO_MODELS)}")
    check_value(seed, Annotated[int, Range(0, 2**32 - 1)], "--seed")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out exists and is not a folder; give a folder for the demo's files")
    if not out.parent.is_dir():
        raise ConfigError(f"{out}: the folder {out.parent} of --out does not exist; create it first")
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the demo folder ({exc.strerror or exc})") from None
    return out


def _head(data: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    return {k: v[:count] for k, v in data.items()}


def _row(label: str, path: Path, val: dict, plan: DemoPlan, bit_exact: bool | None = None) -> dict:
    feeds = {"input": val["input"][:plan.batch_size]}
    model = onnx.load(path)
    return {"stage": label, "file": path.name, "top1": round(top1_accuracy(model, val), 4),
            "bit_exact": bit_exact, "bytes": path.stat().st_size,
            "latency_ms": round(latency_ms(model, feeds), 3)}


def format_table(result: dict) -> str:
    """The demo's table: one row per stage, the same numbers as results.json."""
    head = f"{'stage':<28} {'top-1':>7} {'bit-exact':>9} {'bytes':>9} {'ms/batch':>9}  file"
    lines = [f"{result['model']} on MNIST {result['image_size']}x{result['image_size']} "
             f"({result['val_samples']} val images, batch latency in ORT)", head, "-" * len(head)]
    for row in result["rows"]:
        exact = "-" if row["bit_exact"] is None else ("yes" if row["bit_exact"] else "NO")
        lines.append(f"{row['stage']:<28} {row['top1']:>7.4f} {exact:>9} {row['bytes']:>9} "
                     f"{row['latency_ms']:>9.3f}  {row['file']}")
    return "\n".join(lines)


def _markdown(result: dict, table: str) -> str:
    return (f"# qgraph demo: {result['model']}\n\n"
            f"Bundled MNIST ({result['train_samples']} train / {result['val_samples']} val images, "
            f"{result['image_size']}x{result['image_size']}); whole run {result['seconds']} s.\n\n"
            "```\n" + table + "\n```\n\n"
            "Files: model.onnx → float.onnx → ptq.onnx / prepared.onnx → trained.onnx → "
            "*.qlinear.onnx, *.integer.onnx. Raw numbers: results.json.\n\n"
            "```json\n" + json.dumps(result["rows"], indent=1) + "\n```\n")
