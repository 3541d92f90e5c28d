"""The `qgraph` command. Only argument parsing here; the work is in qgraph.api."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

import click

from qgraph.errors import QGraphError

DEBUG_ENV = "QGRAPH_DEBUG"   # set to 1 to see the traceback of an unexpected error


class _Group(click.Group):
    """Every failure is one `error:` line on stderr and exit code 2: qgraph's own errors,
    click's usage errors, and (as a last resort, naming itself a bug) anything unexpected."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
            sys.exit(2)
        except click.ClickException as exc:
            _fail(_click_message(exc))
        except click.exceptions.Abort:
            _fail("aborted")
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QGraphError as exc:
            _fail(str(exc))
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            _fail("out of memory; use less data per batch (--batch-size) or a smaller model")
        except OSError as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            reason = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            _fail(f"{where}{reason}")
        except Exception as exc:  # noqa: BLE001 - the promise is one line, never a traceback
            if os.environ.get(DEBUG_ENV):
                raise
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            _fail(f"internal error ({type(exc).__name__}: {text}); this is a qgraph bug: please report it "
                  f"with the command and files (rerun with {DEBUG_ENV}=1 for the traceback)")


class _StderrHandler(logging.Handler):
    """Writes to the *current* sys.stderr (click's test runner swaps it per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never fail a command
            self.handleError(record)


def _log_warnings_to_stderr() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)


def _fail(message: str) -> None:
    """One line: messages from ORT or the ONNX checker may span several."""
    click.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(2)


def _click_message(exc: click.ClickException) -> str:
    message = " ".join(exc.format_message().split())
    if isinstance(exc, click.UsageError) and exc.ctx is not None:
        message += f" (see '{exc.ctx.command_path} --help')"
    return message


@click.group(cls=_Group)
@click.version_option(package_name="qgraph")
def main():
    """qgraph: rewrite, calibrate, train and lower ONNX models for integer deployment.

    \b
    Example:
      qgraph passes run model.onnx --pipeline qat.yaml --data calib.npz -o prepared.onnx
    """
    _log_warnings_to_stderr()


@main.group()
def passes():
    """Run rewrite pipelines and list the passes."""


@passes.command("run")
@click.argument("model", type=click.Path())
@click.option("--pipeline", "pipeline_path", required=True, type=click.Path(),
              help="Pipeline YAML, or a bundled name: float, ptq, qat.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output model.")
@click.option("--data", "data_path", type=click.Path(), help="Calibration data .npz.")
@click.option("--verify", is_flag=True, help="Check every output-preserving pass on sample data.")
@click.option("--report", "report_path", type=click.Path(), help="Write a JSON report.")
@click.option("--batch-size", default=64, show_default=True, help="Calibration batch size.")
@click.option("-v", "--verbose", is_flag=True, help="Say why each pass skipped what it skipped.")
@click.option("--fix-input", "fixed", multiple=True, metavar="NAME=VALUE",
              help="Make input NAME the constant VALUE (a number, filled to its static shape) before the "
                   "passes: branches on it fold, and the output model serves that value only. Repeatable.")
def passes_run(model, pipeline_path, output, data_path, verify, report_path, batch_size, verbose, fixed):
    """Apply a pipeline of passes to MODEL.

    \b
    Example:
      qgraph passes run model.onnx --pipeline float.yaml -o folded.onnx --verify
      qgraph passes run silero_vad.onnx --pipeline ptq --data audio.npz --fix-input sr=16000 -o vad.q.onnx
    """
    from qgraph.api import run_passes
    fixed_inputs = {}
    for item in fixed:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise click.BadParameter(f"{item!r}: give NAME=VALUE, e.g. sr=16000", param_hint="--fix-input")
        fixed_inputs[name] = value
    run_passes(model, pipeline_path, output, data_path=data_path, verify=verify,
               report_path=report_path, batch_size=batch_size, echo=click.echo, verbose=verbose,
               fixed_inputs=fixed_inputs)
    click.echo(f"wrote {output}")


@passes.command("list")
def passes_list():
    """List every pass, its parameters with defaults, and one line of doc.

    \b
    Example:
      qgraph passes list
    """
    from qgraph.pipeline import all_passes
    for spec in all_passes().values():
        keeps = "preserves outputs" if spec.preserves_outputs else "changes outputs"
        click.echo(f"{spec.name}  ({keeps})\n    {spec.doc}")
        for key, default in spec.params.items():
            click.echo(f"    {key}: {json.dumps(default)}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(model, as_json):
    """Show opset, inputs/outputs, op histogram, parameters, annotations and QDQ pairs.

    \b
    Example:
      qgraph inspect model.onnx
    """
    from qgraph.api import inspect_model
    from qgraph.describe import format_description
    info = inspect_model(model)
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info, model))


@main.command()
@click.argument("model", type=click.Path())
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="Training data .npz (input names + labels).")
@click.option("--val", "val_path", type=click.Path(), help="Validation data .npz.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Trained model.")
@click.option("--epochs", default=1, show_default=True)
@click.option("--lr", default=1e-3, show_default=True, help="Peak learning rate.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--momentum", default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--warmup-steps", default=0, show_default=True, help="Linear warm-up steps.")
@click.option("--schedule", type=click.Choice(["linear", "constant"]), default="linear", show_default=True)
@click.option("--loss", default="cross_entropy", show_default=True,
              help="cross_entropy, mse, or a loss .onnx file.")
@click.option("--learn-scales", is_flag=True, help="LSQ: train quantizer scales too.")
@click.option("--freeze-bn", is_flag=True, help="Keep BatchNorm statistics fixed.")
@click.option("--train-activation-scales", "train_act", is_flag=True,
              help="With --learn-scales: train activation scales too, even if calibration fixed them.")
@click.option("--seed", default=0, show_default=True)
@click.option("--teacher", "teacher_path", type=click.Path(),
              help="Distill from this float model: the loss compares MODEL's outputs with the teacher's "
                   "(no labels needed).")
@click.option("--distill-loss", multiple=True, metavar="OUTPUT=KIND",
              help="With --teacher: mse or kl for one output (default: kl for Softmax/LogSoftmax outputs, "
                   "else mse). Repeatable.")
@click.option("--temperature", default=1.0, show_default=True, help="With --teacher: the KL temperature.")
@click.option("--feature", multiple=True, metavar="TENSOR",
              help="With --teacher: also match this intermediate tensor (by name) with MSE. Repeatable.")
@click.option("--feature-weight", default=1.0, show_default=True, help="With --teacher: weight of each --feature.")
@click.option("--label-weight", default=0.0, show_default=True,
              help="With --teacher: add this times the --loss on the labels.")
@click.option("--relative-lr", is_flag=True,
              help="Step each tensor by about --lr times its RMS (for pretrained models whose tensors differ "
                   "in scale by orders of magnitude).")
@click.option("--keep-best", is_flag=True,
              help="Write the epoch with the lowest --val loss (the input itself, epoch 0, included).")
@click.option("--keep-best-by", type=click.Choice(["loss", "top1", "cosine", "snr"]),
              help="--keep-best by this: the lowest --val loss, the highest top-1 on labelled --val data, or "
                   "with --teacher the highest cosine or SNR of the worst output to the teacher's (implies "
                   "--keep-best).")
@click.option("--workdir", type=click.Path(), help="Checkpoints (default OUTPUT.work/).")
@click.option("--resume", is_flag=True, help="Continue from the last completed epoch in --workdir.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(model, data_path, val_path, output, epochs, lr, batch_size, optimizer, momentum, weight_decay,
          warmup_steps, schedule, loss, learn_scales, freeze_bn, train_act, seed, teacher_path, distill_loss,
          temperature, feature, feature_weight, label_weight, relative_lr, keep_best, keep_best_by, workdir, resume,
          quiet):
    """Train MODEL in ONNX Runtime: float training, or QAT when MODEL has QDQ pairs.

    \b
    Example:
      qgraph train prepared.onnx --data train.npz --val val.npz --epochs 3 --lr 1e-4 -o trained.onnx
      qgraph train prepared.onnx --teacher float.onnx --data unlabelled.npz -o trained.onnx
    """
    from qgraph.api import train_file
    history = train_file(model, data_path, output, val_path=val_path, workdir=workdir, epochs=epochs, lr=lr,
                         batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, schedule=schedule, loss=loss,
                         learn_scales=learn_scales, freeze_bn=freeze_bn,
                         fix_activations=False if train_act else None, seed=seed, resume=resume,
                         progress=not quiet, teacher_path=teacher_path, distill_loss=distill_loss,
                         temperature=temperature, feature=feature, feature_weight=feature_weight,
                         label_weight=label_weight, relative_lr=relative_lr,
                         keep_best=keep_best or keep_best_by is not None, keep_best_by=keep_best_by or "loss")
    for row in history:
        click.echo(_epoch_line(row, distilled=teacher_path is not None))
    kept = [row["epoch"] for row in history if row.get("kept")]
    if kept:
        why = {"loss": "lowest val loss", "top1": "highest val top-1", "cosine": "highest val cosine",
               "snr": "highest val SNR"}[keep_best_by or "loss"]
        click.echo(f"kept epoch {kept[0]} ({why})")
    click.echo(f"wrote {output}")


def _epoch_line(row: dict, distilled: bool) -> str:
    top1 = "" if row.get("val_top1") is None else f"  val top-1 {row['val_top1']:.4f}"
    fidelity = "" if row.get("val_cosine") is None else \
        f"  val cosine {row['val_cosine']:.5f}  SNR {row['val_snr_db']:.1f} dB"
    if row["epoch"] == 0:
        return f"epoch 0: before training  val loss {row['val_loss']:.4f}{fidelity}{top1}"
    loss = "distill loss" if distilled else "train loss"
    return f"epoch {row['epoch']}: {loss} {row['train_loss']:.4f}{fidelity}{top1}  {row['images_per_s']:.0f} img/s"


@main.command()
@click.argument("model", type=click.Path())
@click.option("--target", type=click.Choice(["qlinear", "integer"]), default="qlinear", show_default=True,
              help="qlinear: ORT QLinear* ops; integer: integer-only arithmetic.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Lowered model.")
@click.option("--report", "report_path", type=click.Path(), help="Write a JSON report.")
@click.option("-v", "--verbose", is_flag=True, help="List every node left in float, with why.")
def lower(model, target, output, report_path, verbose):
    """Lower a QDQ MODEL to integer operators for a deployment target.

    \b
    Example:
      qgraph lower trained.onnx --target integer -o model.int8.onnx
    """
    from qgraph.api import lower_file
    report = lower_file(model, target, output, report_path=report_path)
    click.echo(report.get("summary", ""))
    if verbose:
        for item in report.get("skipped", []) + report.get("outside_region", []):
            click.echo(f"    float {item['node']}: {item['reason']}")
    click.echo(f"wrote {output}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--data", "data_path", required=True, type=click.Path(), help="Inputs .npz.")
@click.option("--against", type=click.Path(), help="Also compare with this model (e.g. the QDQ one).")
@click.option("--per-layer", is_flag=True, help="Compare every intermediate tensor too.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--limit", type=int, help="Use only the first N samples.")
@click.option("--threads", default=1, show_default=True,
              help="BLAS threads of the interpreter (0: OpenBLAS's default; one is fastest on busy machines).")
def diff(model, data_path, against, per_layer, json_path, batch_size, limit, threads):
    """Run MODEL in ORT and in the reference interpreter, tensor by tensor.

    Exit 0 when every integer tensor is exact and every float tensor is within the
    tolerance of the op that produced it (docs/lowering-and-diff.md), 1 otherwise.

    \b
    Example:
      qgraph diff model.int8.onnx --data val.npz --against trained.onnx --per-layer
    """
    from typing import Annotated
    from qgraph.api import diff_file
    from qgraph.interp import recycle_large_arrays, set_blas_threads
    from qgraph.schema import Range, check_value
    check_value(threads, Annotated[int, Range(0, 1024)], "--threads")
    recycle_large_arrays()  # this process is ours: let the interpreter reuse its large buffers
    if threads:  # and its BLAS: many small GEMMs wait for busy cores (measured 5-9x slower with 2 threads)
        set_blas_threads(threads)
    report = diff_file(model, data_path, against=against, per_layer=per_layer, json_path=json_path,
                       batch_size=batch_size, limit=limit)
    click.echo(report.format_table())
    if not report.passed:
        sys.exit(1)


@main.command()
@click.argument("float_model", type=click.Path())
@click.argument("quant_model", type=click.Path())
@click.option("--data", "data_path", required=True, type=click.Path(), help="Validation inputs .npz (labels optional).")
@click.option("-o", "--output", type=click.Path(), help="Report folder: report.md, report.json, plots.")
@click.option("--threshold", default=20.0, show_default=True, help="SNR (dB) below which a tensor is flagged.")
@click.option("--granularity", type=click.Choice(["quantizer", "layer"]), default="quantizer", show_default=True,
              help="Local runs: one quantizer alone, or all quantizers a layer reads.")
@click.option("--no-local", is_flag=True, help="Skip the local runs (cumulative tensors and range use only).")
@click.option("--workers", default=0, show_default=True, help="Local worker processes (0: one per core).")
@click.option("--ray", "ray_address", help="Run the local runs on Ray: 'auto' or a cluster address.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--limit", type=int, help="Use only the first N samples.")
@click.option("--top", default=10, show_default=True, help="Rows per table.")
def analyze(float_model, quant_model, data_path, output, threshold, granularity, no_local, workers, ray_address,
            batch_size, limit, top):
    """Find where QUANT_MODEL loses accuracy against FLOAT_MODEL, tensor by tensor and quantizer by quantizer.

    \b
    Example:
      qgraph analyze float.onnx ptq.onnx --data val.npz -o report/
    """
    from qgraph.analyze import summary_lines
    from qgraph.api import analyze_files
    from qgraph.schema import Range, check_value
    from typing import Annotated
    check_value(top, Annotated[int, Range(1)], "--top")
    report = analyze_files(float_model, quant_model, data_path, output=output, batch_size=batch_size, limit=limit,
                           threshold=threshold, granularity=granularity, workers=workers, ray=ray_address,
                           local=not no_local, echo=lambda line: click.echo(line, err=True))
    for line in summary_lines(report, top):
        click.echo(line)
    if output:
        click.echo(f"wrote {output}/report.md, report.json" +
                   "".join(f", {Path(p).name}" for p in report["_written"] if p.endswith(".png")))


@main.command()
@click.argument("model", type=click.Path())
@click.option("--data", "data_path", required=True, type=click.Path(), help="Inputs .npz.")
@click.option("--against", type=click.Path(), help="Profile this model too, side by side (e.g. the float one).")
@click.option("--batch-size", default=8, show_default=True, help="The second batch size (the first is 1).")
@click.option("--repeats", default=20, show_default=True, help="Timed runs per batch size.")
@click.option("--threads", default=0, show_default=True, help="ORT intra-op threads (0: ORT's default).")
@click.option("--top", default=5, show_default=True, help="Top nodes listed per model.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
def profile(model, data_path, against, batch_size, repeats, threads, top, json_path):
    """ORT latency at batch 1 and --batch-size, and ORT's per-op profile grouped by op type,
    with the top costs and what qgraph could change about them.

    \b
    Example:
      qgraph profile model.int8.onnx --against float.onnx --data val.npz
    """
    from qgraph.api import profile_file
    from qgraph.schema import Range, check_value
    from typing import Annotated
    check_value(top, Annotated[int, Range(1, 1000)], "--top")
    report = profile_file(model, data_path, against=against, batch_size=batch_size, repeats=repeats,
                          threads=threads, json_path=json_path)
    click.echo(report.format_table(top=top))


@main.command()
@click.option("--model", "model_name", default="mobilenetv2", show_default=True,
              help="Bundled builder: lenet, resnet, mobilenetv2, repvgg, mlp.")
@click.option("--out", "out_dir", default="qgraph-demo", show_default=True, type=click.Path(),
              help="Work folder for every stage's files.")
@click.option("--quick", is_flag=True, help="Smaller images, less data, fewer epochs (for CI).")
@click.option("--seed", default=0, show_default=True)
def demo(model_name, out_dir, quick, seed):
    """Run the whole chain on the bundled MNIST data and print one table.

    \b
    Example:
      qgraph demo --model resnet --out demo-resnet
    """
    from qgraph.demo import run_demo
    from qgraph.interp import recycle_large_arrays
    recycle_large_arrays()
    run_demo(model_name, out_dir, quick=quick, seed=seed, echo=click.echo)


@main.group()
def models():
    """Bundled model architectures."""


@models.command("build")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--input-shape", default="1,28,28", show_default=True, help="C,H,W of the input.")
@click.option("--width", type=int, help="Base channel width (builder default if omitted).")
@click.option("--classes", "num_classes", default=10, show_default=True)
@click.option("--seed", default=0, show_default=True)
def models_build(name, output, input_shape, width, num_classes, seed):
    """Write the untrained bundled model NAME (lenet, resnet, mobilenetv2, repvgg, repvgg_deploy, mlp).

    \b
    Example:
      qgraph models build resnet -o resnet.onnx
    """
    from qgraph.api import build_model_file
    build_model_file(name, output, input_shape=input_shape, width=width, num_classes=num_classes, seed=seed)
    click.echo(f"wrote {output}")


@main.group()
def data():
    """Bundled datasets."""


@data.command("export")
@click.argument("name")
@click.option("--split", default="train", show_default=True, help="train, val or all.")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--image-size", type=int, help="Resize images to this size (e.g. 14).")
@click.option("--limit", type=int, help="Keep only the first N samples.")
def data_export(name, split, output, image_size, limit):
    """Write bundled dataset NAME (mnist, digits) as an .npz data file with keys input, labels.

    \b
    Example:
      qgraph data export mnist --split val -o val.npz
    """
    from qgraph.api import export_dataset
    shapes = export_dataset(name, split, output, image_size=image_size, limit=limit)
    click.echo(f"wrote {output}: " + ", ".join(f"{k} {list(v)}" for k, v in shapes.items()))


if __name__ == "__main__":
    main()
