"""Training an ONNX model with ONNX Runtime's on-device training (float training and QAT).

    model (float or QDQ) --to_training_form--> FakeQuant graph --generate_artifacts--> ORT
    training/eval/optimizer graphs + checkpoint --train/eval steps--> trained parameters
    --to_qdq_form--> model in the input's form (QDQ with trained weights and scales, or float)

What ORT 1.19.2 does, found by running it:
- BatchNormalization: the gradient builder turns every BN into `BatchNormInternal` in
  training mode, whatever its `training_mode` attribute says: batch statistics in the
  forward pass, and the running mean/var in the checkpoint state updated in place each step
  (`new = momentum * old + (1 - momentum) * batch`, ONNX's momentum). The eval graph runs
  BN in inference mode. `freeze_bn=True` instead rewrites each BN as in-graph arithmetic on
  its parameters, `y = (x - mean) * gamma / sqrt(var + eps) + beta`, so γ and β train and the
  statistics stay fixed. Forward-fused BN (fuse_conv_bn forward) always keeps μ, σ² fixed.
- Learning-rate schedule: `LinearLRScheduler(opt, 0, total, lr)` does not decay: with no
  warm-up steps it raises the rate linearly from 0 to `lr` over all `total` steps. qgraph sets
  the rate itself before each step (linear warm-up, then linear decay to 0).
- Optimizers: ORT's artifacts offer AdamW and SGD; its SGD has no momentum and no weight
  decay. `optimizer="sgd"` with momentum or weight decay applies the heavy-ball update in
  NumPy from the gradients ORT computed (slower on big models).
- Export: the trained values (trainable and frozen, so updated BN statistics too) are
  read from the checkpoint state and written into the training-form model, which
  `to_qdq_form` turns back into the input's form; its ORT outputs equal the eval step's
  (tested). `Module.export_model_for_inferencing` is not needed: it would give the
  FakeQuant graph, not QDQ.
- Checkpoints saved with the optimizer state restore AdamW's moments and step exactly: a
  resumed run reproduces the uninterrupted run bit for bit (tested with kill -9).
- A user loss graph's ops must have ORT gradients with all the outputs those need
  (SoftmaxCrossEntropyLoss must keep its log_prob output).
- Shapes: ORT's gradient builder reads tensor shapes from the graph, ONNX shape inference stops
  at com.microsoft FakeQuant, and some CPU gradients go wrong without static sizes (AveragePoolGrad
  divides by zero, MaxPoolGrad returns zeros or crashes when pools are chained). The training
  graph gets the inputs' non-batch sizes of the data and every tensor's shape as ORT computes it
  on one and two samples (`_with_observed_shapes`); ops with no CPU gradient are rewritten
  (qgraph.differentiable).

Distillation (`teacher=`): the teacher runs in an ORT InferenceSession on each batch, and its
values of the distilled tensors feed the training graph as extra inputs `teacher::<name>`; the
loss block (ort_training.DistillationLoss) compares them with the student's. Design decisions:
- MSE is relative to the teacher's energy, mean((s - t)^2) / mean(t^2) per batch: outputs in
  pixels and in probabilities weigh alike, and 10·log10(1/loss) is the batch's SNR in dB.
- KL is the default only for distributions (Softmax/LogSoftmax outputs): on classifier logits
  relative MSE gave the same or better top-1 and fidelity (MNIST MobileNetV2, W4A8: 93.1% /
  cosine 0.9936 against KL's 92.6% / 0.9904).
- Labels are optional (`label_weight`); with none the data file needs only the inputs.
- Every student output must be a teacher output of the same name and shape on the first
  batch: a teacher that does not fit fails before any work, not in the middle of a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qgraph.annotations import FIX_ACTIVATIONS, FROZEN, get_annotation
from qgraph.batch_first import batch_first_data, batch_first_model, later_batch_axes, restore_batch_axes
from qgraph.data import batch_elsewhere, data_fingerprint, model_inputs
from qgraph.differentiable import explain_failure, is_parameter_slot
from qgraph.distill import Distill, distill_plan
from qgraph.errors import DataError, ModelError, QGraphError, TrainError
from qgraph.fakequant import to_qdq_form, to_training_form
from qgraph.files import atomic_write_bytes, json_bytes
from qgraph.idioms import rank_map
from qgraph.ort_training import TEACHER_PREFIX, generate_training_artifacts, import_training_api, session_options
from qgraph.progress import ProgressBar
from qgraph.runner import Runner, ort_message
from qgraph.schema import Range, check_value
from qgraph.workdir import ARTIFACTS, PROGRESS_FILE, Workdir

LABELS = "labels"
BUILTIN_LOSSES = ("cross_entropy", "mse")
log = logging.getLogger("qgraph")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting a training result depends on, validated when built (each field's hint is
    its schema). `--resume` refuses a checkpoint written under other settings."""
    epochs: Annotated[int, Range(1, 1_000_000)] = 1
    lr: Annotated[float, Range(0.0, 1e6, lo_open=True)] = 1e-3
    batch_size: Annotated[int, Range(1, 1 << 24)] = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: Annotated[float, Range(0.0, 1.0, hi_open=True)] = 0.9
    weight_decay: Annotated[float, Range(0.0, 1e6)] = 0.0
    warmup_steps: Annotated[int, Range(0)] = 0
    schedule: Literal["linear", "constant"] = "linear"
    loss: str = "cross_entropy"
    learn_scales: bool = False
    freeze_bn: bool = False
    fix_activations: bool | None = None
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0
    # distillation (with a teacher model): the loss per output, the KL temperature, feature
    # tensors matched by name, their weight, and the weight of the label loss mixed in
    distill_loss: dict[str, Literal["mse", "kl"]] = field(default_factory=dict)
    temperature: Annotated[float, Range(0.0, 1000.0, lo_open=True)] = 1.0
    feature: tuple[str, ...] = ()
    feature_weight: Annotated[float, Range(0.0, 1e6)] = 1.0
    label_weight: Annotated[float, Range(0.0, 1e6)] = 0.0
    # export the best epoch on the validation data, the input itself (epoch 0) included: by the
    # lowest loss, the highest top-1 (labelled val data), or (distillation) the highest cosine or
    # SNR of the worst output to the teacher
    keep_best: bool = False
    keep_best_by: Literal["loss", "top1", "cosine", "snr"] = "loss"
    # steps relative to each trained tensor's RMS (Adafactor's relative step size)
    relative_lr: bool = False

    def __post_init__(self):
        hints = __import__("typing").get_type_hints(TrainConfig, include_extras=True)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "loss" and isinstance(value, os.PathLike):
                object.__setattr__(self, "loss", os.fspath(value))
                continue
            check_value(value, hints[f.name], "--" + f.name.replace("_", "-"))
        object.__setattr__(self, "feature", tuple(dict.fromkeys(self.feature)))
        if self.loss not in BUILTIN_LOSSES and not Path(self.loss).exists():
            raise TrainError(f"--loss {self.loss!r} is not cross_entropy, mse, or an existing .onnx loss graph")

    def distill_settings(self) -> list[str]:
        """The options given that only distillation uses (they need a teacher; --keep-best-by cosine
        and snr compare with the teacher's outputs)."""
        default = TrainConfig()
        names = ("distill_loss", "temperature", "feature", "feature_weight", "label_weight")
        given = ["--" + name.replace("_", "-") for name in names if getattr(self, name) != getattr(default, name)]
        return given + (["--keep-best-by"] if self.keep_best_by in ("cosine", "snr") else [])

    def resolved(self, model: onnx.ModelProto) -> "TrainConfig":
        """`fix_activations=None` means the model's `qgraph.fix_activations` flag (set by calibrate)."""
        if self.fix_activations is not None:
            return self
        flag = bool(get_annotation(model, FIX_ACTIVATIONS, False))
        return TrainConfig(**{**asdict(self), "fix_activations": flag})


def train_model(model: onnx.ModelProto, train_data: dict, val_data: dict | None = None, *,
                workdir: str | os.PathLike | Workdir, config: TrainConfig | None = None, resume: bool = False,
                progress: bool = True, threads: int = 0, teacher: onnx.ModelProto | None = None,
                **options) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Train `model` on `train_data` ({input name: array, "labels": array}) in ONNX Runtime.

    A QDQ model trains as QAT (FakeQuant with straight-through gradients) and comes back in
    QDQ form with trained weights (and scales, with `learn_scales`); a float model trains in
    float. Settings come as a `TrainConfig` or as its fields in `options`. `workdir` receives
    the artifacts and a checkpoint per epoch; `resume=True` continues after the last completed
    epoch of a run with the same model, data and settings. Training stops at the first
    non-finite loss. Returns the trained model and one dict per epoch: {epoch, train_loss,
    val_loss, val_top1, images_per_s, seconds}.

    With a `teacher` (the float model), the loss is distillation (see `qgraph.distill.distill_plan`): labels
    are not needed, and validation adds `val_cosine` and `val_snr_db` (the worst output's
    fidelity to the teacher) and `val_outputs` (per output), with an epoch 0 record for the
    input model. `keep_best` returns the epoch (0 included) with the lowest validation loss, with
    `keep_best_by="top1"` the highest top-1 on labelled validation data, or with `"cosine"` / `"snr"`
    the highest fidelity to the teacher, and marks it `kept`.

    Measured by benchmarks/qat.py (ORT 1.19.2, 2 shared CPU cores; MNIST 28x28, 4000 train /
    1000 val, batch 64, AdamW lr 3e-3 decaying linearly to 0, 5 epochs): builders' lenet 95.7%
    val top-1, mobilenetv2 93.4%; the same graphs with the same initial weights, batch order,
    optimizer and schedule in PyTorch 2.13 eager: 96.0% and 94.4% (identical lenet curve to
    epoch 4). QAT from those checkpoints via qat.yaml, 2 epochs: int8 95.7% / 93.4% (= float),
    W4A8 95.8% / 92.6% (PTQ 95.5% / 90.4%). QAT trains at 0.8-1.0x the float throughput.
    """
    config = (config or TrainConfig(**options)).resolved(model)
    if teacher is None and config.distill_settings():
        raise TrainError(f"{config.distill_settings()[0]} is a distillation setting; give the float model "
                         "as --teacher, or drop it")
    if config.keep_best and val_data is None:
        raise TrainError("--keep-best picks the epoch with the lowest validation loss; give --val data")
    if config.keep_best_by != "loss" and not config.keep_best:
        raise TrainError(f"--keep-best-by {config.keep_best_by} chooses what --keep-best compares; "
                         "give --keep-best too")
    if teacher is not None and config.loss != "cross_entropy" and config.label_weight == 0:
        raise TrainError(f"--loss {config.loss!r} is the loss on the labels, which distillation only adds with "
                         "--label-weight > 0; give a --label-weight or drop --loss")
    # a recurrent state [layers, batch, hidden] trains batch-first, and comes back as it was
    axes = later_batch_axes(model, train_data) if isinstance(train_data, dict) else {}
    original = model
    if axes:
        model = batch_first_model(model, axes)
        teacher = None if teacher is None else batch_first_model(
            teacher, {k: v for k, v in axes.items() if k in {i.name for i in teacher.graph.input}})
        train_data = batch_first_data(train_data, original, axes, "train data")
        val_data = batch_first_data(val_data, original, axes, "val data")
    if isinstance(workdir, Workdir):
        trained, history = _train(model, train_data, val_data, config, workdir, resume, progress, threads, teacher)
    else:
        with Workdir.open(workdir) as opened:
            trained, history = _train(model, train_data, val_data, config, opened, resume, progress, threads, teacher)
    return (restore_batch_axes(trained, original, axes) if axes else trained), history


def _train(model, train_data, val_data, config: TrainConfig, wd: Workdir, resume: bool, progress: bool,
           threads: int, teacher: onnx.ModelProto | None) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    loss_graph = _load_loss(config.loss)
    labelled = teacher is None or config.label_weight > 0
    shapes = {name: np.shape(train_data[name])[1:] for name in model_inputs(model)
              if isinstance(train_data, dict) and name in train_data}
    plan = _plan(model, config, labelled, shapes)
    train_feeds = _prepare_data(train_data, plan, config, "train data", labelled)
    val_feeds = _prepare_data(val_data, plan, config, "val data", labelled, optional_labels=teacher is not None) \
        if val_data is not None else None
    batch = _check_batch(plan, config, _count(train_feeds))
    plan.graph = _with_observed_shapes(plan.graph, train_feeds, plan)
    for name in plan.input_names if val_feeds is not None else ():
        if val_feeds[name].shape[1:] != train_feeds[name].shape[1:]:
            raise DataError(f"val data: {name!r} has samples of shape {list(val_feeds[name].shape[1:])}, the "
                            f"train data {list(train_feeds[name].shape[1:])}; training runs the model at the "
                            "training data's size, so validate at that size too")
    if val_feeds is not None and plan.fixed_batch and _count(val_feeds) < plan.fixed_batch:
        raise DataError(f"val data: {_count(val_feeds)} samples, fewer than the model's fixed batch of {batch}")
    classify = plan.num_classes is not None and val_feeds is not None and LABELS in val_feeds
    if config.keep_best and config.keep_best_by == "top1" and not classify:
        raise TrainError("--keep-best-by top1 compares each epoch's top-1 on the --val labels: give --val data "
                         "with labels, for a model with a class-scores output, or keep the best by loss")
    distill = distill_plan(teacher, model, plan, config, train_feeds, batch, threads, loss_graph) \
        if teacher is not None else None

    workdir = wd.path
    art = workdir / ARTIFACTS
    identity = _run_identity(model, config, train_feeds, val_feeds, loss_graph, teacher)
    done = _read_progress(workdir, identity, config) if resume else None
    if resume and done is None:
        log.warning("%s: no completed epoch to resume from; training starts at epoch 1", workdir)
    momentum_sgd = config.optimizer == "sgd" and (config.momentum > 0 or config.weight_decay > 0)
    if distill is not None:
        generate_training_artifacts(distill.graph, plan.trainable, plan.frozen, art, loss=distill.loss,
                                    optimizer=config.optimizer, weight_decay=config.weight_decay,
                                    extra_outputs=distill.outputs, declined=plan.declined)
    else:
        generate_training_artifacts(plan.graph, plan.trainable, plan.frozen, art,
                                    loss=loss_graph if loss_graph is not None else config.loss,
                                    optimizer=config.optimizer, weight_decay=config.weight_decay,
                                    extra_outputs=[plan.output_name], declined=plan.declined)
    _, api = import_training_api()
    checkpoint = workdir / done["checkpoint"] if done else art / "checkpoint"
    state = _load_checkpoint(api, checkpoint)
    module = _ort("loading the training graphs", api.Module, str(art / "training_model.onnx"), state,
                  str(art / "eval_model.onnx"), session_options=session_options(threads, spin=distill is None),
                  declined=plan.declined)
    count = _count(train_feeds) - _count(train_feeds) % batch if plan.fixed_batch else _count(train_feeds)
    steps_per_epoch = -(-count // batch)
    total_steps = max(steps_per_epoch * config.epochs, 1)
    stepper = _Stepper(api, art, module, state, config, total_steps, momentum_sgd,
                       workdir / done["velocity"] if done and done.get("velocity") else None)
    history: list[dict] = list(done["history"]) if done else []
    first_epoch = done["epoch"] + 1 if done else 1
    stepper.fast_forward((first_epoch - 1) * steps_per_epoch)
    names = module.input_names()
    what = "distillation loss" if distill is not None else "training loss"
    best = done.get("best") if done else None
    if not done and val_feeds is not None and (distill is not None or config.keep_best):
        # where training starts from: the input's own validation loss and fidelity
        history.append({"epoch": 0, **_evaluate(module, val_feeds, batch, classify, plan.fixed_batch is not None,
                                                 distill)})
        best = {"epoch": 0, **_best_value(history[0], config), "file": None}

    for epoch in range(first_epoch, config.epochs + 1):
        bar = ProgressBar(f"epoch {epoch}/{config.epochs}", steps_per_epoch, enabled=progress)
        start = time.perf_counter()
        order = np.random.default_rng([config.seed, epoch]).permutation(_count(train_feeds))[:count]
        module.train()
        losses, seen = [], 0
        for step, begin in enumerate(range(0, len(order), batch)):
            index = np.sort(order[begin:begin + batch])
            where = f"epoch {epoch} step {step + 1}"
            feeds = _step_feeds(names, train_feeds, index, distill, where)
            outputs = _ort(where, module, *feeds)
            loss = float(np.asarray(outputs[0]))
            if not math.isfinite(loss):
                raise TrainError(f"{where}: the {what} is {loss}; lower --lr or check the data and the "
                                 f"model{_resume_hint(wd)}")
            _ort(f"{where}: the optimizer step", stepper.step)
            losses.append(loss * len(index))
            seen += len(index)
            bar.update(step + 1, f"loss {loss:.4f} {seen / (time.perf_counter() - start):.0f} img/s")
        train_seconds = time.perf_counter() - start
        bar.close()
        record = {"epoch": epoch, "train_loss": sum(losses) / seen, "images_per_s": seen / train_seconds}
        if val_feeds is not None:
            record.update(_evaluate(module, val_feeds, batch, classify, plan.fixed_batch is not None, distill))
            if not math.isfinite(record["val_loss"]):
                raise TrainError(f"epoch {epoch}: the validation loss is {record['val_loss']}; lower --lr or check "
                                 f"the validation data{_resume_hint(wd)}")
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        _check_finite_parameters(state, epoch, wd, plan.nonfinite)
        if config.keep_best and best is not None and _better(record, best, config):
            best = {"epoch": epoch, **_best_value(record, config), "file": _save_best(wd, state, epoch)}
        _save_progress(wd, api, state, stepper, epoch, identity, config, history, best)
    if config.keep_best and best is not None:
        for record in history:
            record["kept"] = record["epoch"] == best["epoch"]
        return _export_best(plan, model, wd, best), history
    trained = _export(plan, state, model)
    return trained, history


#: --keep-best-by: the validation record's key, and +1 where higher is better
_BEST_BY = {"loss": ("val_loss", -1), "top1": ("val_top1", 1), "cosine": ("val_cosine", 1), "snr": ("val_snr_db", 1)}


def _best_value(record: dict, config: TrainConfig) -> dict:
    """What the best-epoch record keeps of a validation record: the compared value, by its key."""
    key, _ = _BEST_BY[config.keep_best_by]
    return {key: record[key]}


def _better(record: dict, best: dict, config: TrainConfig) -> bool:
    """Whether this epoch's validation beats the best so far (ties keep the earlier epoch)."""
    key, sign = _BEST_BY[config.keep_best_by]
    return sign * (record[key] - best[key]) > 0


def _step_feeds(names: list[str], feeds: dict, index: np.ndarray, distill: "Distill | None", where: str) -> list:
    """The arrays of one step in the order of the graph's inputs (teacher values computed on the batch)."""
    batch = {name: feeds[name][index] for name in names if name in feeds}
    if distill is not None:
        batch.update(distill.teacher_values(batch, where))
    return [batch[name] for name in names]


def _ort(what: str, call, *args, declined: dict[str, str] | None = None, **kwargs):
    """`call(*args)`, with ORT's C++ exceptions turned into one TrainError naming `what` (and the
    node, when ORT cannot differentiate an op of the model)."""
    try:
        return call(*args, **kwargs)
    except QGraphError:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT raises RuntimeError and its own types
        explained = explain_failure(str(exc), declined)
        raise TrainError(f"{what}: {explained or 'ONNX Runtime failed: ' + ort_message(exc)}") from None


def _resume_hint(wd: Workdir) -> str:
    done = wd.completed_checkpoint()
    return f" (the last good checkpoint, {done}, stays in {wd.path}: --resume continues from it)" if done else ""


def _check_finite_parameters(state, epoch: int, wd: Workdir, nonfinite: str | None = None) -> None:
    advice = (f"the model computes NaN or Inf at {nonfinite} on the training data; fix the model there"
              if nonfinite else "lower --lr")
    for name, param in state.parameters:   # frozen ones never change (an exported -inf bound stays so)
        if param.requires_grad and not np.isfinite(param.data).all():
            raise TrainError(f"epoch {epoch}: parameter {name!r} became NaN or Inf; {advice}{_resume_hint(wd)}")


def _load_loss(loss: str) -> onnx.ModelProto | None:
    """A loss graph file as a ModelProto (None for the built-in losses)."""
    if loss in BUILTIN_LOSSES:
        return None
    from qgraph.model_io import load_model
    return load_model(loss, check=False, convert_opset=False, what="loss graph")


def _check_batch(plan: "_Plan", config: TrainConfig, count: int) -> int:
    """The batch size; a model whose batch dimension is fixed trains only at that size."""
    if plan.fixed_batch is None:
        return config.batch_size
    if config.batch_size != plan.fixed_batch:
        raise TrainError(f"model input {plan.input_names[0]!r} has a batch dimension fixed at {plan.fixed_batch}; "
                         f"train with --batch-size {plan.fixed_batch} (or re-export the model with a dynamic batch)")
    if count < plan.fixed_batch:
        raise DataError(f"train data: {count} samples, fewer than the model's fixed batch of {plan.fixed_batch}")
    if count % plan.fixed_batch:
        log.warning("the last %d training samples do not fill the model's fixed batch of %d; they are left out",
                    count % plan.fixed_batch, plan.fixed_batch)
    return plan.fixed_batch


def evaluate_training_engine(workdir: str | os.PathLike, data: dict[str, np.ndarray],
                             teacher: onnx.ModelProto | None = None) -> np.ndarray:
    """The eval step's model output for `data["input"]`-style feeds, from `workdir`'s last checkpoint
    (the first distilled output for a run with a `teacher`).

    (For checking that an exported model computes what the training engine computed.)"""
    workdir = Path(workdir)
    progress = json.loads((workdir / PROGRESS_FILE).read_text())
    _, api = import_training_api()
    state = api.CheckpointState.load_checkpoint(str(workdir / progress["checkpoint"]))
    art = workdir / ARTIFACTS
    module = api.Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"),
                        session_options=session_options())
    module.eval()
    count = len(next(iter(data.values())))
    names = module.input_names()
    taught = [name[len(TEACHER_PREFIX):] for name in names if name.startswith(TEACHER_PREFIX)]
    values = Runner(teacher, taught).run(data, taught) if teacher is not None and taught else {}
    feeds = []
    for name in names:
        if name in data:
            feeds.append(data[name])
        elif name == LABELS:  # the loss needs labels; the output does not depend on them
            feeds.append(np.zeros(count, np.int64))
        elif name.startswith(TEACHER_PREFIX) and name[len(TEACHER_PREFIX):] in values:
            feeds.append(values[name[len(TEACHER_PREFIX):]])
        else:
            raise DataError(f"evaluate_training_engine: no array for {name!r}; the eval graph needs it")
    return module(*feeds)[1]


# --- planning: the training graph and its parameters -----------------------------------

@dataclass
class _Plan:
    """Everything derived from the model and settings before the artifacts are built."""

    training: onnx.ModelProto         # training form with the input's BN nodes (exported from)
    graph: onnx.ModelProto            # what generate_artifacts gets (BN rewritten if frozen)
    trainable: list[str]
    frozen: list[str]
    input_names: list[str]
    output_name: str
    output_dims: list                 # static dims of the first output (None where symbolic)
    num_classes: int | None
    fixed_batch: int | None           # the inputs' batch dimension when the model fixes it
    declined: dict[str, str] = field(default_factory=dict)   # nodes left for ORT to differentiate, why
    nonfinite: str | None = None      # the first tensor the model computes as NaN/Inf on the data
    relative: dict[str, float] = field(default_factory=dict)  # tensor -> c: trained as W / c (relative_lr)


def _plan(model: onnx.ModelProto, config: TrainConfig, labelled: bool = True,
          sample_shapes: dict[str, tuple] | None = None) -> _Plan:
    if not model.graph.output:
        raise TrainError("model has no outputs; training needs the model output the loss is computed on")
    inputs = model_inputs(model)
    if not inputs:
        raise TrainError("model has no inputs; training feeds data to the model's inputs")
    base = _with_sample_shapes(_bn_inference_form(model), sample_shapes or {})
    training, info = to_training_form(base, learn_scales=config.learn_scales,
                                      freeze_activation_scales=bool(config.fix_activations))
    graph = _freeze_bn(training) if config.freeze_bn else training
    bn_stats = [name for node in training.graph.node if node.op_type == "BatchNormalization"
                for name in node.input[3:5]]
    trainable, frozen = classify_parameters(graph, info.learned_scales,
                                            info.fixed_scales + info.created_constants + bn_stats)
    if not trainable:
        raise TrainError("model has no trainable parameters (no float weight/bias initializers); "
                         "training needs weights stored as initializers")
    relative: dict[str, float] = {}
    if config.relative_lr:
        graph, relative = _relative_parameters(graph, trainable)
        frozen = frozen + [_relative_scale_name(name) for name in relative]
    batch_dims = {dims[0] if dims else None for _, dims in inputs.values()}
    fixed = {d for d in batch_dims if d is not None}
    if any(not dims for _, dims in inputs.values()):
        raise TrainError("model has a scalar input; training needs inputs with a batch dimension")
    if len(fixed) > 1 or (fixed and None in batch_dims):
        later = batch_elsewhere(inputs)
        where = ""
        if later is not None:
            name, shown, one = later
            where = (f" (input {name!r} has shape {shown}: its batch is not its first axis, as in a recurrent "
                     "state [layers, batch, hidden]; give it one whole value per sample stacked on a new first "
                     f"axis, shape [S, {', '.join(map(str, one))}], and training takes it batch-first)")
        raise TrainError(f"model inputs have different batch dimensions {sorted(map(str, batch_dims))}; "
                         "training needs one batch dimension for all inputs" + where)
    output = model.graph.output[0]
    if config.loss != "cross_entropy":
        classes = None
    elif labelled:
        classes = _num_classes(model)
    else:  # distillation: classes only for reporting top-1 when the data has labels
        try:
            classes = _num_classes(model)
        except TrainError:
            classes = None
    return _Plan(training, graph, trainable, frozen, list(inputs), output.name, _output_dims(model),
                 classes, fixed.pop() if fixed else None, info.declined, relative=relative)


RELATIVE_FLOOR = 1e-3   # Adafactor's ε₂: a tensor near zero still moves by about lr · 1e-3


def _relative_scale_name(name: str) -> str:
    return f"{name}__relative_scale"


def _relative_parameters(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, dict[str, float]]:
    """A copy in which each tensor W of `names` is stored as W / c and read through Mul(·, c), with c
    the power of two nearest max(RMS(W), 1e-3): an optimizer step of about lr on the stored tensor
    moves W by about lr · c (Adafactor's relative step size; Shazeer & Stern 2018, section 8).

    A power of two makes W / c and the export's (W / c) · c exact in float32. Pretrained tensors
    differ in scale by orders of magnitude (a conv folded with a BN whose running variance is 1e7
    has weights near 2e-5), and Adam moves every element by about lr whatever its size."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    scales: dict[str, float] = {}
    muls = []
    for name in names:
        weight = numpy_helper.to_array(inits[name])
        rms = float(np.sqrt(np.mean(np.square(weight, dtype=np.float64)))) if weight.size else 0.0
        scale = float(2.0 ** round(math.log2(max(rms, RELATIVE_FLOOR))))
        scales[name] = scale
        inits[name].CopyFrom(numpy_helper.from_array((weight / np.float32(scale)).astype(np.float32), name))
        graph.initializer.append(numpy_helper.from_array(np.float32(scale), _relative_scale_name(name)))
        muls.append(helper.make_node("Mul", [name, _relative_scale_name(name)], [f"{name}__relative"],
                                     name=f"{name}__relative_mul"))
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in scales:
                node.input[k] = f"{name}__relative"
    nodes = muls + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out, scales


def _absolute_values(plan: "_Plan", values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Trained values as the model holds them: the tensors stored as W / c (relative_lr) times c."""
    return {name: (value * np.float32(plan.relative[name])).astype(value.dtype) if name in plan.relative else value
            for name, value in values.items()}


def _with_sample_shapes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> onnx.ModelProto:
    """`model` with the symbolic non-batch dimensions of its inputs fixed to the data's.

    ORT 1.19's CPU pooling gradients read the input size from the graph's static shapes: with a
    symbolic dimension AveragePoolGrad divides by zero (the process dies of SIGFPE) and MaxPoolGrad
    returns zeros. A data file has one sample shape, so fixing it changes nothing else; the
    exported model keeps the input's own dimensions."""
    fixed = False
    for inp in model.graph.input:
        shape = shapes.get(inp.name)
        dims = inp.type.tensor_type.shape.dim
        if shape is None or len(shape) != len(dims) - 1:
            continue
        for dim, size in zip(list(dims)[1:], shape):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = int(size)
                fixed = True
    if fixed:   # shapes the exporter inferred from the symbolic sizes would shadow the static ones
        del model.graph.value_info[:]
    return model


def _with_observed_shapes(graph: onnx.ModelProto, feeds: dict, plan: "_Plan") -> onnx.ModelProto:
    """`graph` with the shape of every tensor declared as ORT computes it on the data.

    ORT's gradient builder takes tensor shapes from the graph, and ONNX shape inference stops
    at com.microsoft FakeQuant: behind the first quantizer every shape is unknown, and some
    gradients fail on that (MaxPoolGrad of chained pools crashes the process). The graph runs
    on one sample and on two; a dimension that differs between them depends on the batch and
    stays symbolic, every other one is static."""
    count = _count(feeds)
    sizes = [plan.fixed_batch] if plan.fixed_batch else ([1, 2] if count >= 2 else [1])
    inits = {t.name for t in graph.graph.initializer}
    names = [out for node in graph.graph.node for out in node.output if out and out not in inits]
    try:
        runner = Runner(graph, names)
        runs = [runner.run({k: feeds[k][:size] for k in plan.input_names}, names) for size in sizes]
    except ModelError as exc:
        raise TrainError(f"the training form of the model cannot run on the training data: {exc}") from None
    producers = {out: node for node in graph.graph.node for out in node.output}
    for name in names:
        value = np.asarray(runs[0][name])
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            node = producers[name]
            plan.nonfinite = f"{name} ({node.op_type} {node.name or name})"
            log.warning("the model computes NaN or Inf at %s on the training data; gradients through it are "
                        "NaN (a quantizer that rounds a variance or a divisor to 0 does this)", plan.nonfinite)
            break
    out = onnx.ModelProto()
    out.CopyFrom(graph)
    declared = {o.name for o in out.graph.output} | {i.name for i in out.graph.input}
    del out.graph.value_info[:]
    for name in names:
        values = [np.asarray(run[name]) for run in runs]
        if name in declared or values[0].dtype.kind not in "fiub":
            continue
        shapes = [v.shape for v in values]
        if len({len(s) for s in shapes}) != 1:
            continue
        dims = [d if all(s[k] == d for s in shapes) else f"{name}::batch{k}" for k, d in enumerate(shapes[0])]
        elem = helper.np_dtype_to_tensor_dtype(values[0].dtype)
        out.graph.value_info.append(helper.make_tensor_value_info(name, elem, dims))
    return out


def _output_dims(model: onnx.ModelProto) -> list:
    output = model.graph.output[0]
    if not output.type.tensor_type.HasField("shape"):
        try:
            output = onnx.shape_inference.infer_shapes(model).graph.output[0]
        except Exception:  # noqa: BLE001 - dims only help to check targets early
            return []
    return [d.dim_value if d.HasField("dim_value") else None for d in output.type.tensor_type.shape.dim]


def classify_parameters(model: onnx.ModelProto, learned_scales: list[str] = (),
                        fixed: list[str] = ()) -> tuple[list[str], list[str]]:
    """Split the used initializers into (trainable, frozen), from what the graph and its
    rewrites say, never from names.

    Frozen: `fixed` (the training form's fixed scales and the constants it created), the
    tensors rewrites list in the `qgraph.frozen` annotation (fuse_conv_bn's forward mode lists
    BN statistics), BatchNormalization's running statistics (inputs 3-4), quantizer parameters
    (scale and zero point inputs of FakeQuant and com.microsoft ops), non-float tensors
    (shapes, indices), scalars (epsilons, clip bounds, exponents: hyper-parameters in an
    exported graph) and tensors used only where no gradient reaches (Resize scales, Pad values:
    `qgraph.differentiable.NON_DIFFERENTIABLE_INPUTS`). Trainable: every other float
    initializer the graph uses, and the learned scales.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    used = {name for node in graph.node for name in node.input if name in inits}
    reachable = {name for node in graph.node for i, name in enumerate(node.input)
                 if name in inits and is_parameter_slot(node.op_type, i)}
    frozen = set(get_annotation(model, FROZEN, []) or []) | set(fixed) | (used - reachable)
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            frozen.update(node.input[3:5])
        if node.op_type == "FakeQuant" or (node.domain == "com.microsoft" and not node.op_type.endswith("Training")):
            frozen.update(n for n in node.input[1:] if n in inits)
    learned = set(learned_scales)
    trainable, kept = [], []
    for name in sorted(used):
        tensor = inits[name]
        is_float = tensor.data_type == onnx.TensorProto.FLOAT
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        if name in learned:
            trainable.append(name)
        elif not is_float or name in frozen or size <= 1:
            kept.append(name)
        else:
            trainable.append(name)
    return trainable, kept


def _bn_inference_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose BatchNormalization nodes have one output and training_mode 0.

    (ORT trains every BN in training mode anyway; the extra outputs would break the eval graph.)"""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "BatchNormalization":
            del node.output[1:]
            for attr in node.attribute:
                if attr.name == "training_mode":
                    attr.i = 0
    return out


def _freeze_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    """BN as `(x - mean) * (gamma / sqrt(var + eps)) + beta` on a [C,1,..] broadcast: γ, β train, μ, σ² don't."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    ranks = rank_map(out)
    nodes = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        x, gamma, beta, mean, var = node.input[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        rank = ranks.get(x)
        if rank is None:
            raise TrainError(f"BatchNormalization {node.name or node.output[0]}: input rank unknown; "
                             "run shape inference (qgraph passes canonicalize) before freeze_bn")
        p = f"{node.name or node.output[0]}__frozen_bn"
        graph.initializer.extend([numpy_helper.from_array(np.float32(eps), f"{p}_eps"),
                                  numpy_helper.from_array(np.array([-1] + [1] * (rank - 2), np.int64), f"{p}_shape")])
        nodes += [helper.make_node("Add", [var, f"{p}_eps"], [f"{p}_var_eps"], name=f"{p}_add_eps"),
                  helper.make_node("Sqrt", [f"{p}_var_eps"], [f"{p}_std"], name=f"{p}_sqrt"),
                  helper.make_node("Div", [gamma, f"{p}_std"], [f"{p}_factor"], name=f"{p}_div"),
                  helper.make_node("Reshape", [f"{p}_factor", f"{p}_shape"], [f"{p}_factor_b"], name=f"{p}_rf"),
                  helper.make_node("Reshape", [mean, f"{p}_shape"], [f"{p}_mean_b"], name=f"{p}_rm"),
                  helper.make_node("Reshape", [beta, f"{p}_shape"], [f"{p}_beta_b"], name=f"{p}_rb"),
                  helper.make_node("Sub", [x, f"{p}_mean_b"], [f"{p}_centered"], name=f"{p}_sub"),
                  helper.make_node("Mul", [f"{p}_centered", f"{p}_factor_b"], [f"{p}_scaled"], name=f"{p}_mul"),
                  helper.make_node("Add", [f"{p}_scaled", f"{p}_beta_b"], [node.output[0]], name=f"{p}_add")]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _num_classes(model: onnx.ModelProto) -> int:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
        return int(dims[-1].dim_value)
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
        return int(dims[-1].dim_value)
    raise TrainError(f"output {model.graph.output[0].name}: number of classes unknown (last dimension is "
                     "symbolic); give the output a static class dimension")


# --- data -----------------------------------------------------------------------------

def _prepare_data(data: dict, plan: _Plan, config: TrainConfig, origin: str, labelled: bool = True,
                  optional_labels: bool = False) -> dict[str, np.ndarray]:
    """Feeds by training-graph input name: model inputs plus `labels` (cross entropy) or `target` (MSE).

    Unlabelled (distillation without label loss): model inputs only, and with `optional_labels`
    the class labels when the data has them (validation top-1)."""
    if not isinstance(data, dict):
        raise DataError(f"{origin}: expected a dict of arrays, got {type(data).__name__}")
    feeds = {}
    for name in plan.input_names:
        if name not in data:
            raise DataError(f"{origin}: no array for model input {name!r}; keys are {sorted(data)}")
        array = np.ascontiguousarray(data[name])
        if array.dtype == np.float16:         # a float16 model's data: qgraph reads the model as float32
            array = array.astype(np.float32)
        if array.ndim == 0:
            raise DataError(f"{origin}: {name!r} is a scalar; training needs one row per sample")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise DataError(f"{origin}: input {name!r} holds NaN or Inf; clean the data")
        feeds[name] = array
    count = len(feeds[plan.input_names[0]])
    if count == 0:
        raise DataError(f"{origin}: no samples")
    if not labelled:
        if optional_labels and LABELS in data and plan.num_classes is not None:
            feeds[LABELS] = _class_labels(data, plan.num_classes, origin)
    elif config.loss == "cross_entropy":
        feeds[LABELS] = _class_labels(data, plan.num_classes, origin)
    elif config.loss == "mse":
        feeds["target"] = _mse_targets(data, plan, origin)
    else:
        for key, value in data.items():
            if key not in feeds:
                feeds[key] = np.ascontiguousarray(value)
    for key, value in feeds.items():
        if np.ndim(value) == 0 or len(value) != count:
            raise DataError(f"{origin}: {key!r} has {np.shape(value)[:1] or 'no'} rows, "
                            f"{plan.input_names[0]!r} has {count}")
    return feeds


def _class_labels(data: dict, num_classes: int, origin: str) -> np.ndarray:
    if LABELS not in data:
        raise DataError(f"{origin}: no {LABELS!r} array; cross-entropy training needs integer class labels "
                        f"under the key {LABELS!r}")
    labels = np.asarray(data[LABELS])
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{origin}: {LABELS!r} has dtype {labels.dtype}; class labels must be integers")
    if labels.ndim != 1:
        raise DataError(f"{origin}: {LABELS!r} has shape {list(labels.shape)}; expected one class index per sample")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{origin}: {LABELS!r}[{i}] = {int(labels[i])} is outside [0, {num_classes}) "
                        f"(the model has {num_classes} outputs)")
    return labels.astype(np.int64)


def _mse_targets(data: dict, plan: _Plan, origin: str) -> np.ndarray:
    """MSE targets: float arrays shaped like the output, or class indices regressed as one-hot rows."""
    if LABELS not in data:
        raise DataError(f"{origin}: no {LABELS!r} array; MSE needs targets under the key {LABELS!r}")
    target = np.asarray(data[LABELS])
    expected = plan.output_dims[1:]
    if np.issubdtype(target.dtype, np.integer):
        classes = expected[-1] if expected and expected[-1] is not None else None
        if target.ndim != 1 or len(expected) != 1 or classes is None:
            raise DataError(f"{origin}: integer {LABELS!r} of shape {list(target.shape)} cannot be one-hot "
                            f"targets for an output of shape {['N', *expected]}; give float targets of the "
                            "output's shape")
        bad = (target < 0) | (target >= classes)
        if target.size and bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{origin}: {LABELS!r}[{i}] = {int(target[i])} is outside [0, {classes}) "
                            f"(the output has {classes} values per sample)")
        return np.eye(classes, dtype=np.float32)[target]
    if not np.issubdtype(target.dtype, np.floating):
        raise DataError(f"{origin}: {LABELS!r} has dtype {target.dtype}; MSE targets are numbers")
    if len(expected) != target.ndim - 1 or any(d is not None and d != s for d, s in zip(expected, target.shape[1:])):
        raise DataError(f"{origin}: {LABELS!r} has shape {list(target.shape)}, the output is "
                        f"{['N', *['?' if d is None else d for d in expected]]}")
    if not np.isfinite(target).all():
        raise DataError(f"{origin}: {LABELS!r} holds NaN or Inf; clean the targets")
    return target.astype(np.float32)


def _count(feeds: dict) -> int:
    return len(next(iter(feeds.values())))


# --- steps, evaluation, checkpoints ----------------------------------------------------

class _Stepper:
    """One optimizer + learning-rate step after each train step (ORT's, or NumPy momentum SGD)."""

    def __init__(self, api, art, module, state, config: TrainConfig, total: int, momentum_sgd: bool,
                 velocity_file: Path | None):
        self.module, self.state, self.lr, self.warmup, self.schedule, self.total = \
            module, state, config.lr, config.warmup_steps, config.schedule, total
        self.momentum, self.weight_decay, self.step_count = config.momentum, config.weight_decay, 0
        self.velocity: dict[str, np.ndarray] | None = None
        self.optimizer = None
        if momentum_sgd:
            self.velocity = _read_velocity(velocity_file) if velocity_file else {}
            self.trainable = [name for name, p in state.parameters if p.requires_grad]
        else:
            # not ORT's LinearLRScheduler: with warmup_step_count=0 it ramps the rate *up* from 0
            # over the whole run (measured on 1.19.2); the rate is set before every step instead
            self.optimizer = api.Optimizer(str(art / "optimizer_model.onnx"), module)
            self.optimizer.set_learning_rate(self.current_lr())

    def current_lr(self) -> float:
        t = self.step_count
        if self.warmup and t < self.warmup:
            factor = t / self.warmup
        elif self.schedule == "linear":
            factor = max(0.0, (self.total - t) / max(1, self.total - self.warmup))
        else:
            factor = 1.0
        return self.lr * factor

    def fast_forward(self, steps: int) -> None:
        for _ in range(steps):
            self._advance_lr()

    def _advance_lr(self):
        self.step_count += 1
        if self.optimizer is not None:
            self.optimizer.set_learning_rate(self.current_lr())

    def step(self) -> None:
        if self.velocity is None:
            self.optimizer.step()
            self._advance_lr()
        else:
            lr = self.current_lr()
            for name in self.trainable:
                param = self.state.parameters[name]
                weight, grad = param.data, param.grad
                if self.weight_decay:
                    grad = grad + self.weight_decay * weight
                v = self.velocity.get(name)
                v = grad if v is None else self.momentum * v + grad
                self.velocity[name] = v
                self.state.parameters[name] = (weight - lr * v).astype(weight.dtype)
            self.step_count += 1
        self.module.lazy_reset_grad()


def _evaluate(module, feeds: dict, batch_size: int, classify: bool, fixed_batch: bool = False,
              distill: "Distill | None" = None) -> dict:
    """Mean loss (and top-1) over the feeds; a fixed-batch model sees only whole batches. With a
    teacher, also each output's fidelity to it (cosine, SNR) and the worst of them."""
    from qgraph.diff import TensorStats
    module.eval()
    total_loss, correct, count = 0.0, 0, _count(feeds)
    if fixed_batch:
        count -= count % batch_size
    names = module.input_names()
    fidelity = {name: TensorStats(name, "float32") for name in distill.outputs} if distill else {}
    for begin in range(0, count, batch_size):
        index = np.arange(begin, min(begin + batch_size, count))
        batch = _step_feeds(names, feeds, index, distill, "evaluating the validation data")
        results = _ort("evaluating the validation data", module, *batch)
        n = len(index)
        total_loss += float(np.asarray(results[0])) * n
        if distill is not None:
            for name, value in zip(distill.outputs, results[1:]):
                fidelity[name].update(batch[names.index(TEACHER_PREFIX + name)], np.asarray(value))
        if classify:
            output = results[1]
            correct += int((np.asarray(output).reshape(n, -1).argmax(1) == feeds[LABELS][begin:begin + n]).sum())
    module.train()
    result = {"val_loss": total_loss / count}
    result["val_top1"] = correct / count if classify else None
    if distill is not None:
        result["val_outputs"] = {name: {"cosine": stats.cosine, "snr_db": stats.snr_db}
                                 for name, stats in fidelity.items()}
        result["val_cosine"] = min(stats.cosine for stats in fidelity.values())
        result["val_snr_db"] = min(stats.snr_db for stats in fidelity.values())
    return result


def _run_identity(model: onnx.ModelProto, config: TrainConfig, train_feeds: dict, val_feeds: dict | None,
                  loss_graph: onnx.ModelProto | None, teacher: onnx.ModelProto | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model, the teacher, the data and every
    setting (a loss graph by its content, not its path), as JSON would store them."""
    settings = json.loads(json.dumps(asdict(config)))
    if loss_graph is not None:
        settings["loss"] = "graph:" + hashlib.sha256(loss_graph.SerializeToString()).hexdigest()[:16]
    return {"model": _graph_hash(model), "teacher": _graph_hash(teacher) if teacher is not None else None,
            "train_data": data_fingerprint(train_feeds), "val_data": data_fingerprint(val_feeds),
            "settings": settings}


_DISTILL_DEFAULTS = {"distill_loss": {}, "temperature": 1.0, "feature": [], "feature_weight": 1.0,
                     "label_weight": 0.0, "keep_best": False, "keep_best_by": "loss", "relative_lr": False}


def _graph_hash(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()[:16]


def _read_progress(workdir: Path, identity: dict, config: TrainConfig) -> dict | None:
    """The progress record of `workdir` when it can be resumed with this run's identity;
    TrainError naming every field that differs."""
    path = workdir / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text())
        if not isinstance(progress, dict):
            raise ValueError("not a JSON object")
        epoch, checkpoint, history = progress["epoch"], progress["checkpoint"], progress["history"]
        start = 1 if history and isinstance(history[0], dict) and history[0].get("epoch") == 0 else 0
        if not (isinstance(epoch, int) and epoch >= 1 and isinstance(checkpoint, str) and isinstance(history, list)
                and len(history) == epoch + start and isinstance(progress.get("identity"), dict)):
            raise ValueError("unexpected fields")
    except (OSError, ValueError, KeyError) as exc:
        raise TrainError(f"{path}: unreadable progress record ({exc}); train without --resume to start over") from None
    stored = progress["identity"]
    what = {"model": "another model", "teacher": "another --teacher model (or none)", "train_data": "other --data",
            "val_data": "other --val data"}
    differ = [text for key, text in what.items() if stored.get(key) != identity[key]]
    new = identity["settings"]
    recorded = stored.get("settings", {})
    # runs recorded before distillation existed have none of its settings: they had the defaults
    old = {key: recorded.get(key, _DISTILL_DEFAULTS.get(key)) for key in new}
    settings = [f"--{key.replace('_', '-')} {old.get(key)!r} (now {new[key]!r})" for key in new
                if key != "epochs" and old.get(key) != new[key]]
    if settings:
        differ.append("other settings: " + ", ".join(settings))
    if differ:
        raise TrainError(f"{path}: the checkpoint belongs to " + "; ".join(differ) +
                         "; resume with the same model, data and settings, or train without --resume")
    if epoch > config.epochs or (config.epochs != old.get("epochs") and config.schedule == "linear"):
        raise TrainError(f"{path}: the checkpoint's run has --epochs {old.get('epochs')} ({epoch} done); "
                         f"--epochs {config.epochs} would change its linear schedule: resume with --epochs "
                         f"{old.get('epochs')} (with --schedule constant, a resumed run may add epochs)")
    if not (workdir / checkpoint).exists():
        raise TrainError(f"{workdir / checkpoint}: checkpoint named in {path} is missing; train without --resume")
    best = progress.get("best")
    if best is not None and best.get("file") and not (workdir / best["file"]).exists():
        raise TrainError(f"{workdir / best['file']}: the best epoch's parameters named in {path} are missing; "
                         "train without --resume")
    return progress


def _load_checkpoint(api, path: Path):
    try:
        return api.CheckpointState.load_checkpoint(str(path))
    except Exception as exc:  # ORT raises RuntimeError from C++ for a truncated or foreign file
        raise TrainError(f"{path}: cannot load the checkpoint ({str(exc).strip().splitlines()[0][:200]}); "
                         "train without --resume to start over") from None


def _read_velocity(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files}
    except (OSError, ValueError, EOFError) as exc:
        raise TrainError(f"{path}: cannot read the SGD momentum state ({exc}); train without --resume") from None


def _save_best(wd: Workdir, state, epoch: int) -> str:
    """The parameters of the best epoch so far, beside the checkpoints (the older best goes with
    the stale checkpoints)."""
    import io
    name = f"epoch{epoch}.best.npz"
    buffer = io.BytesIO()
    np.savez(buffer, **{key: param.data for key, param in state.parameters})
    atomic_write_bytes(wd.path / name, buffer.getvalue())
    return name


def _export_best(plan: _Plan, model: onnx.ModelProto, wd: Workdir, best: dict) -> onnx.ModelProto:
    if best["file"] is None:   # no epoch beat the input: it is the result
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    try:
        with np.load(wd.path / best["file"], allow_pickle=False) as stored:
            values = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, EOFError) as exc:
        raise TrainError(f"{wd.path / best['file']}: cannot read the best epoch's parameters ({exc}); "
                         "train without --resume") from None
    trained = to_qdq_form(plan.training, _absolute_values(plan, values))
    return _with_input_shapes(trained, model)


def _save_progress(wd: Workdir, api, state, stepper: _Stepper, epoch: int, identity: dict, config: TrainConfig,
                   history: list, best: dict | None = None) -> None:
    """Checkpoint first, then the JSON that points at it (atomic rename), then drop the old one."""
    workdir = wd.path
    name = f"epoch{epoch}.ckpt"
    try:
        api.CheckpointState.save_checkpoint(state, str(workdir / name), include_optimizer_state=True)
    except Exception as exc:  # disk full, permissions: ORT raises RuntimeError
        _remove_quietly(workdir / name)
        raise TrainError(f"{workdir / name}: cannot write the checkpoint of epoch {epoch} "
                         f"({str(exc).strip().splitlines()[0][:200]}); free some space{_resume_hint(wd)}") from None
    velocity = None
    if stepper.velocity is not None:
        import io
        velocity = f"epoch{epoch}.velocity.npz"
        buffer = io.BytesIO()
        np.savez(buffer, **stepper.velocity)
        atomic_write_bytes(workdir / velocity, buffer.getvalue())
    progress = {"identity": identity, "epoch": epoch, "checkpoint": name, "velocity": velocity,
                "history": history, "best": best}
    atomic_write_bytes(workdir / PROGRESS_FILE, json_bytes(progress))
    wd.remove_stale_checkpoints(keep={name, velocity, (best or {}).get("file")} - {None})


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _export(plan: _Plan, state, model: onnx.ModelProto) -> onnx.ModelProto:
    """The trained values in the input's form, with the input's own input dimensions."""
    values = {name: param.data for name, param in state.parameters}
    return _with_input_shapes(to_qdq_form(plan.training, _absolute_values(plan, values)), model)


def _with_input_shapes(trained: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    originals = {i.name: i for i in model.graph.input}
    for inp in trained.graph.input:
        if inp.name in originals:
            inp.CopyFrom(originals[inp.name])
    if not trained.graph.value_info:
        present = {name for node in trained.graph.node for name in node.output}
        trained.graph.value_info.extend(v for v in model.graph.value_info if v.name in present)
    return trained
