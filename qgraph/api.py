"""The library calls behind the CLI commands: each reads files, calls the core, writes files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import onnx

from qgraph.data import load_data
from qgraph.describe import describe_model
from qgraph.files import check_output_path, write_json
from qgraph.graph import QModel
from qgraph.model_io import check_model, load_model, save_model
from qgraph.pipeline import PassContext, StepReport, bundled_pipeline, load_pipeline, run_pipeline  # noqa: F401


def run_passes(model_path: str | os.PathLike, pipeline_path: str | os.PathLike, output: str | os.PathLike,
               *, data_path: str | None = None, verify: bool = False, report_path: str | None = None,
               batch_size: int = 64, echo: Callable[[str], None] = print, verbose: bool = False) -> list[StepReport]:
    """`qgraph passes run`: load, apply the pipeline, save atomically; every check before any work."""
    check_output_path(output, model_path)
    if report_path:
        check_output_path(report_path, model_path)
    proto = load_model(model_path)
    pipeline = load_pipeline(pipeline_path)
    data_path = data_path or pipeline.data
    data = load_data(data_path, proto) if data_path else None
    ctx = PassContext(data=data, seed=pipeline.seed, batch_size=batch_size, verbose=verbose)
    model = QModel.from_onnx(proto)

    def show(step: StepReport) -> None:
        echo(step.line())
        for item in step.report.get("warnings", []):  # always: a rule matching nothing is a user mistake
            echo(f"    warning: {item}")
        if verbose:
            for item in step.report.get("skipped", []):
                echo(f"    skipped {item['node']}: {item['reason']}")

    reports = run_pipeline(model, pipeline, ctx, verify=verify, on_step=show)
    result = model.to_onnx()
    check_model(result, origin=f"the output of pipeline {Path(pipeline_path).name} (a qgraph bug; please report it)")
    save_model(result, output, input_path=model_path)
    if report_path:
        write_json(report_path, {"model": str(model_path), "pipeline": str(pipeline_path),
                                 "output": str(output), "passes": [r.as_dict() for r in reports]})
    return reports


def inspect_model(model_path: str | os.PathLike) -> dict:
    """`qgraph inspect`: the model's description (see qgraph.describe)."""
    return describe_model(load_model(model_path, convert_opset=False))


def build_model_file(name: str, output: str | os.PathLike, *, input_shape=(1, 28, 28), width: int | None = None,
                     num_classes: int = 10, seed: int = 0) -> Path:
    """`qgraph models build`: write a bundled architecture (untrained, seeded) to a file."""
    from qgraph.models.builders import build_model
    check_output_path(output)
    kwargs = {"input_shape": tuple(input_shape), "num_classes": num_classes, "seed": seed}
    if width is not None:
        kwargs["width"] = width
    return save_model(build_model(name, **kwargs), output)


def export_dataset(name: str, split: str, output: str | os.PathLike, *, image_size: int | None = None,
                   limit: int | None = None) -> dict:
    """`qgraph data export`: write a bundled dataset split as a user data file (input + labels)."""
    from qgraph.models.datasets import load_dataset, save_npz
    check_output_path(output)
    data = load_dataset(name, split, image_size=image_size)
    if limit is not None:
        data = {k: v[:limit] for k, v in data.items()}
    save_npz(data, output)
    return {k: v.shape for k, v in data.items()}


def train_file(model_path: str | os.PathLike, data_path: str | os.PathLike, output: str | os.PathLike, *,
               val_path: str | None = None, workdir: str | None = None, **options) -> list[dict]:
    """`qgraph train`: checks first, then ORT training, then an atomic save of the QDQ/float result.

    Checkpoints go to `workdir` (default `<output>.work/` beside the output) every epoch.
    """
    from qgraph.train import train_model
    check_output_path(output, model_path)
    model = load_model(model_path)
    train = load_data(data_path, model, need_labels=True)
    val = load_data(val_path, model, need_labels=True) if val_path else None
    workdir = Path(workdir) if workdir else Path(str(output) + ".work")
    workdir.mkdir(parents=True, exist_ok=True)
    trained, history = train_model(model, train, val, workdir=workdir, **options)
    save_model(trained, output, input_path=model_path)
    write_json(workdir / "history.json", history)
    return history


def lower_file(model_path: str | os.PathLike, target: str, output: str | os.PathLike,
               *, report_path: str | None = None) -> dict:
    """`qgraph lower`: QDQ model -> integer ops for `target`, saved atomically."""
    from qgraph.lowering import lower_model
    check_output_path(output, model_path)
    lowered, report = lower_model(load_model(model_path), target)
    save_model(lowered, output, input_path=model_path)
    if report_path:
        write_json(report_path, report)
    return report


def diff_file(model_path: str | os.PathLike, data_path: str | os.PathLike, *, against: str | None = None,
              per_layer: bool = False, json_path: str | None = None, batch_size: int = 64,
              limit: int | None = None):
    """`qgraph diff`: ORT vs the reference interpreter (and vs `against`) on the data file."""
    from qgraph.diff import diff_models
    if json_path:
        check_output_path(json_path, model_path)
    model = load_model(model_path, convert_opset=False)
    data = load_data(data_path, model)
    other = load_model(against, convert_opset=False) if against else None
    report = diff_models(model, data, other, per_layer, batch_size=batch_size, limit=limit)
    if json_path:
        write_json(json_path, report.as_dict())
    return report


def apply_pipeline(model: onnx.ModelProto, pipeline: str | os.PathLike, data: dict | None = None, *,
                   weight_bits: int | None = None, batch_size: int = 64) -> onnx.ModelProto:
    """Run a pipeline (a file or a bundled name) on an in-memory model, without progress output;
    `weight_bits` overrides insert_qdq's weight bits (e.g. 4 for W4A8)."""
    pipe = load_pipeline(pipeline)
    steps = []
    for name, params in pipe.steps:
        params = dict(params)
        if name == "insert_qdq" and weight_bits is not None:
            params["weights"] = {**params.get("weights", {}), "bits": weight_bits}
        if name == "calibrate":
            params["progress"] = False
        steps.append((name, params))
    pipe.steps = steps
    qmodel = QModel.from_onnx(model)
    run_pipeline(qmodel, pipe, PassContext(data=data, seed=pipe.seed, batch_size=batch_size))
    return qmodel.to_onnx()
