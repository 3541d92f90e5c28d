"""The library calls behind the CLI commands: each checks every path and number it was given,
then reads files, calls the core, and writes its outputs all at once (qgraph.files).

Path labels in errors are the CLI's option names (`-o`, `--data`, ...), since this is the
boundary users cross."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Callable

import onnx

from qgraph.annotations import CALIBRATED, get_annotation
from qgraph.data import load_data
from qgraph.describe import describe_model
from qgraph.errors import ConfigError, ModelError
from qgraph.files import check_input_file, check_outputs, json_bytes, write_files
from qgraph.graph import QModel
from qgraph.model_io import check_model, fix_inputs, load_model, model_bytes, save_model
from qgraph.pipeline import (PassContext, StepReport, bundled_pipeline, load_pipeline,  # noqa: F401
                             pipeline_from_document, resolve_pipeline_path, run_pipeline)
from qgraph.schema import Range, check_value

log = logging.getLogger("qgraph")

BatchSize = Annotated[int, Range(1, 1 << 24)]
Count = Annotated[int, Range(1)]


def run_passes(model_path: str | os.PathLike, pipeline_path: str | os.PathLike, output: str | os.PathLike,
               *, data_path: str | None = None, verify: bool = False, report_path: str | None = None,
               batch_size: int = 64, echo: Callable[[str], None] = print, verbose: bool = False,
               fixed_inputs: dict[str, str] | None = None) -> list[StepReport]:
    """`qgraph passes run`: load, apply the pipeline, save atomically; every check before any work.
    `fixed_inputs` ({input: value}) become constants first (model_io.fix_inputs)."""
    check_value(batch_size, BatchSize, "--batch-size")
    pipeline_file = resolve_pipeline_path(pipeline_path)
    pipeline = load_pipeline(pipeline_file)
    data_path = data_path or pipeline.data
    reads = {"model": model_path, "--pipeline": pipeline_file, "--data": data_path}
    check_outputs({"-o": output, "--report": report_path}, reads)
    proto = load_model(model_path)
    if fixed_inputs:
        proto = fix_inputs(proto, fixed_inputs, origin=str(model_path))
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
            for tensor, why in step.report.get("placement", {}).items():
                echo(f"    tensor {tensor}: {why}")

    reports = run_pipeline(model, pipeline, ctx, verify=verify, on_step=show)
    result = model.to_onnx()
    check_model(result, origin=f"the output of pipeline {Path(pipeline_file).name} on {model_path}")
    payloads = {output: model_bytes(result)}
    if report_path:
        payloads[report_path] = json_bytes({"model": str(model_path), "pipeline": str(pipeline_file),
                                            "output": str(output), "passes": [r.as_dict() for r in reports]})
    write_files(payloads)
    return reports


def inspect_model(model_path: str | os.PathLike) -> dict:
    """`qgraph inspect`: the model's description (see qgraph.describe)."""
    return describe_model(load_model(model_path, convert_opset=False))


def build_model_file(name: str, output: str | os.PathLike, *, input_shape=(1, 28, 28), width: int | None = None,
                     num_classes: int = 10, seed: int = 0) -> Path:
    """`qgraph models build`: write a bundled architecture (untrained, seeded) to a file."""
    from qgraph.models.builders import BUILDERS, build_model
    if name not in BUILDERS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(BUILDERS)}")
    shape = parse_input_shape(input_shape)
    check_value(width, Annotated[int, Range(1, 4096)] | None, "--width")
    check_value(num_classes, Annotated[int, Range(2, 1_000_000)], "--classes")
    check_value(seed, Annotated[int, Range(0, 2**32 - 1)], "--seed")
    check_outputs({"-o": output})
    kwargs = {"input_shape": shape, "num_classes": num_classes, "seed": seed}
    if width is not None:
        kwargs["width"] = width
    return save_model(build_model(name, **kwargs), output)


MAX_INPUT_PIXELS = 4096 * 4096


def parse_input_shape(value) -> tuple[int, int, int]:
    """C,H,W from "1,28,28" (or a sequence): three integers >= 1, at most 4096x4096 pixels."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        dims = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        raise ConfigError(f"--input-shape {value!r} must be three integers C,H,W like 1,28,28") from None
    if len(dims) != 3 or min(dims) < 1:
        raise ConfigError(f"--input-shape {value!r} must be three integers C,H,W >= 1, like 1,28,28")
    if dims[1] * dims[2] > MAX_INPUT_PIXELS or dims[0] > 4096:
        raise ConfigError(f"--input-shape {value!r} is too large (at most 4096 channels and 4096x4096 pixels)")
    return dims


MAX_IMAGE_SIZE = 1024   # the bundled images are 8x8 and 28x28; larger only costs memory


def export_dataset(name: str, split: str, output: str | os.PathLike, *, image_size: int | None = None,
                   limit: int | None = None) -> dict:
    """`qgraph data export`: write a bundled dataset split as a user data file (input + labels)."""
    from qgraph.models.datasets import DATASETS, SPLITS, encode_npz, load_dataset
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    check_value(image_size, Annotated[int, Range(1, MAX_IMAGE_SIZE)] | None, "--image-size")
    check_value(limit, Count | None, "--limit")
    check_outputs({"-o": output})
    data = load_dataset(name, split, image_size=image_size)
    if limit is not None:
        data = {k: v[:limit] for k, v in data.items()}
    write_files({output: encode_npz(data)})
    return {k: v.shape for k, v in data.items()}


def train_file(model_path: str | os.PathLike, data_path: str | os.PathLike, output: str | os.PathLike, *,
               val_path: str | None = None, workdir: str | None = None, resume: bool = False,
               progress: bool = True, threads: int = 0, teacher_path: str | None = None,
               distill_loss=(), **options) -> list[dict]:
    """`qgraph train`: checks first, then ORT training, then an atomic save of the QDQ/float result.

    Checkpoints go to `workdir` (default `<output>.work/` beside the output) every epoch; it
    stays after success (for --resume and history.json) and after a failure that left a
    completed epoch; otherwise a failed run removes what it created. With `teacher_path`
    the loss is distillation from that model; `distill_loss` is "OUTPUT=KIND" strings (or a
    mapping).
    """
    from qgraph.train import BUILTIN_LOSSES, TrainConfig, train_model
    from qgraph.workdir import HISTORY, Workdir
    config = TrainConfig(distill_loss=parse_assignments(distill_loss, "--distill-loss"), **options)
    if teacher_path is None and config.distill_settings():
        raise ConfigError(f"{config.distill_settings()[0]} is a distillation setting; give the float model as "
                          "--teacher, or drop it")
    loss_file = None if config.loss in BUILTIN_LOSSES else config.loss
    reads = {"model": model_path, "--data": data_path, "--val": val_path, "--loss": loss_file,
             "--teacher": teacher_path}
    if loss_file:
        check_input_file(loss_file, "loss graph", ConfigError)
    check_outputs({"-o": output}, reads)
    model = load_model(model_path)
    teacher = _load_teacher(teacher_path) if teacher_path else None
    labelled = teacher is None or config.label_weight > 0
    train = load_data(data_path, model, need_labels=labelled and config.loss in BUILTIN_LOSSES)
    val = load_data(val_path, model, need_labels=teacher is None) if val_path else None
    workdir = Path(workdir) if workdir else Path(str(output) + ".work")
    with Workdir.open(workdir, reads, {"-o": output}) as wd:
        trained, history = train_model(model, train, val, workdir=wd, config=config, resume=resume,
                                       progress=progress, threads=threads, teacher=teacher)
        write_files({output: model_bytes(trained), wd.path / HISTORY: json_bytes(history)})
    return history


def _load_teacher(path) -> onnx.ModelProto:
    try:
        return load_model(path, what="teacher model")
    except ModelError as exc:
        raise ModelError(f"--teacher: {exc}") from None


def parse_assignments(values, option: str) -> dict[str, str]:
    """{"name": "value"} from "name=value" strings (a mapping passes through); ConfigError naming
    `option` for anything else. The name may itself hold "=": the value is after the last one."""
    if isinstance(values, dict):
        return dict(values)
    if isinstance(values, str):
        values = [values]
    result = {}
    for text in values:
        name, sep, value = str(text).rpartition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{option} {text!r} must be NAME=VALUE, e.g. {option} logits=kl")
        result[name] = value
    return result


def lower_file(model_path: str | os.PathLike, target: str, output: str | os.PathLike,
               *, report_path: str | None = None) -> dict:
    """`qgraph lower`: QDQ model -> integer ops for `target`, saved atomically."""
    from qgraph.lowering import TARGETS, lower_model
    if target not in TARGETS:
        raise ConfigError(f"unknown lowering target {target!r}; valid targets: {', '.join(TARGETS)}")
    check_outputs({"-o": output, "--report": report_path}, {"model": model_path})
    model = load_model(model_path)
    _check_lowerable(model, model_path)
    lowered, report = lower_model(model, target)
    payloads = {output: model_bytes(lowered)}
    if report_path:
        payloads[report_path] = json_bytes(report)
    write_files(payloads)
    return report


def _check_lowerable(model: onnx.ModelProto, path) -> None:
    """Lowering needs QDQ pairs; an uncalibrated qgraph model lowers, with a warning."""
    from qgraph.describe import dynamic_quantizers, integer_ops, qdq_pairs
    if not qdq_pairs(model):
        if dynamic_quantizers(model):
            raise ModelError(f"{path}: is dynamically quantized (ONNX Runtime quantize_dynamic: "
                             f"{dynamic_quantizers(model)} run-time quantizers), not QDQ; quantize it statically "
                             "first: qgraph passes run MODEL --pipeline ptq --data calib.npz -o q.onnx "
                             "(its dequantize_dynamic step restores the float layers), then lower q.onnx")
        if integer_ops(model):
            raise ModelError(f"{path}: holds no QuantizeLinear/DequantizeLinear pairs but {integer_ops(model)} "
                             "integer ops: it is already lowered; lower its QDQ source instead")
        raise ModelError(f"{path}: holds no QuantizeLinear/DequantizeLinear pairs, so there is nothing to lower; "
                         "quantize it first (qgraph passes run MODEL --pipeline ptq --data calib.npz -o q.onnx)")
    if get_annotation(model, CALIBRATED) is False:
        log.warning("%s: its quantizers were never calibrated (activation ranges are the defaults [-1, 1]); "
                    "run calibrate before lowering for a usable model", path)


def diff_file(model_path: str | os.PathLike, data_path: str | os.PathLike, *, against: str | None = None,
              per_layer: bool = False, json_path: str | None = None, batch_size: int = 64,
              limit: int | None = None):
    """`qgraph diff`: ORT vs the reference interpreter (and vs `against`) on the data file."""
    from qgraph.diff import diff_models
    check_value(batch_size, BatchSize, "--batch-size")
    check_value(limit, Count | None, "--limit")
    check_outputs({"--json": json_path}, {"model": model_path, "--data": data_path, "--against": against})
    model = load_model(model_path, convert_opset=False)
    data = load_data(data_path, model)
    other = load_model(against, convert_opset=False, what="--against model") if against else None
    report = diff_models(model, data, other, per_layer, batch_size=batch_size, limit=limit)
    if json_path:
        write_files({json_path: json_bytes(report.as_dict())})
    return report


def apply_pipeline(model: onnx.ModelProto, pipeline: str | os.PathLike | dict | list, data: dict | None = None, *,
                   weight_bits: int | None = None, batch_size: int = 64) -> onnx.ModelProto:
    """Run a pipeline (a file, a bundled name, or a parsed pipeline document: {passes: [...]} or
    the bare list) on an in-memory model, without progress output; `weight_bits` overrides
    insert_qdq's weight bits (e.g. 4 for W4A8), and smooth's, which measures on those grids."""
    pipe = pipeline_from_document(pipeline) if isinstance(pipeline, (dict, list)) else load_pipeline(pipeline)
    steps = []
    for name, params in pipe.steps:
        params = dict(params)
        if name == "insert_qdq" and weight_bits is not None:
            params["weights"] = {**params.get("weights", {}), "bits": weight_bits}
        if name == "smooth" and weight_bits is not None:      # its choice weighs the same weight grids
            params["weight_bits"] = weight_bits
        if name == "calibrate":
            params["progress"] = False
        steps.append((name, params))
    pipe.steps = steps
    qmodel = QModel.from_onnx(model)
    run_pipeline(qmodel, pipe, PassContext(data=data, seed=pipe.seed, batch_size=batch_size))
    return qmodel.to_onnx()


ANALYZE_FILES = ("report.json", "report.md")


def _has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def analyze_files(float_path: str | os.PathLike, quant_path: str | os.PathLike, data_path: str | os.PathLike, *,
                  output: str | os.PathLike | None = None, batch_size: int = 16, limit: int | None = None,
                  threshold: float = 20.0, granularity: str = "quantizer", workers: int = 0,
                  ray: str | None = None, local: bool = True, echo: Callable[[str], None] = lambda _: None) -> dict:
    """`qgraph analyze`: compare a quantized model with its float source (qgraph.analyze); with
    `output`, write report.json, report.md and the plots into that folder, all or nothing."""
    from qgraph import analyze
    from qgraph.parallel import Evaluator
    check_value(batch_size, BatchSize, "--batch-size")
    check_value(limit, Count | None, "--limit")
    check_value(threshold, float, "--threshold")
    if granularity not in analyze.GRANULARITIES:
        raise ConfigError(f"--granularity must be one of {', '.join(analyze.GRANULARITIES)}, got {granularity!r}")
    evaluator = Evaluator(workers, ray)
    reads = {"float model": float_path, "quantized model": quant_path, "--data": data_path}
    folder = _check_report_folder(output, reads)
    float_model = load_model(float_path, what="float model")
    quant_model = load_model(quant_path, convert_opset=False, what="quantized model")
    if not _has_qdq(quant_model) and _has_qdq(float_model):
        raise ModelError(f"{quant_path}: holds no QuantizeLinear/DequantizeLinear pairs but {float_path} does: the float "
                         f"model comes first (qgraph analyze {quant_path} {float_path} --data ...)")
    data = load_data(data_path, quant_model)
    report = analyze.analyze_models(float_model, quant_model, data, batch_size=batch_size, limit=limit,
                                    threshold_db=threshold, granularity=granularity, evaluator=evaluator,
                                    local=local, echo=echo)
    report = {"float_model": str(float_path), "quantized_model": str(quant_path), **report}
    if folder is not None:
        images = analyze.plots(report)
        payloads = {folder / name: data for name, data in images.items()}
        payloads[folder / "report.md"] = analyze.markdown(report, list(images)).encode()
        payloads[folder / "report.json"] = json_bytes(analyze.public(report))
        created = not folder.exists()
        folder.mkdir(exist_ok=True)
        try:
            write_files(payloads)
        except BaseException:
            if created:
                folder.rmdir()
            raise
        report["_written"] = sorted(str(p) for p in payloads)
    return report


def _check_report_folder(output, reads) -> Path | None:
    """-o names a folder: an existing one (its report files checked like any output), or a new
    one in an existing writable folder (created only when the report is written)."""
    from qgraph.files import FileError, path_mode
    import stat
    if output is None:
        return None
    folder = Path(output)
    mode = path_mode(folder, "-o")
    if mode is None:
        check_outputs({"-o": folder}, reads)       # the parent exists and is writable; not an input
        return folder
    if not stat.S_ISDIR(mode):
        raise FileError(f"{folder}: -o must be a folder for the report (report.md, report.json, plots); "
                        "give a new or existing folder")
    check_outputs({f"-o {name}": folder / name for name in ANALYZE_FILES}, reads)
    return folder


def profile_file(model_path: str | os.PathLike, data_path: str | os.PathLike, *, against: str | None = None,
                 batch_size: int = 8, repeats: int = 20, threads: int = 0, json_path: str | None = None):
    """`qgraph profile`: ORT latency and per-op profile of MODEL (beside AGAINST, the reference of
    the ratios, when given), on the data file; no file is left but the --json report."""
    from qgraph.profile import profile_models
    check_value(batch_size, BatchSize, "--batch-size")
    check_value(repeats, Annotated[int, Range(1, 100_000)], "--repeats")
    check_value(threads, Annotated[int, Range(0, 1024)], "--threads")
    check_outputs({"--json": json_path}, {"model": model_path, "--data": data_path, "--against": against})
    model = load_model(model_path, convert_opset=False)
    data = load_data(data_path, model)
    models = [(model, str(model_path))]
    if against:
        other = load_model(against, convert_opset=False, what="--against model")
        models.insert(0, (other, str(against)))
    report = profile_models(models, data, batch_size=batch_size, repeats=repeats, threads=threads)
    if json_path:
        write_files({json_path: json_bytes(report.as_dict())})
    return report
