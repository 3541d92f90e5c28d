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
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qgraph.annotations import FIX_ACTIVATIONS, get_annotation
from qgraph.errors import DataError, TrainError
from qgraph.fakequant import to_qdq_form, to_training_form
from qgraph.ort_training import generate_training_artifacts, import_training_api, session_options
from qgraph.progress import ProgressBar

LABELS = "labels"
PROGRESS_FILE = "progress.json"
ARTIFACTS = "artifacts"
_STAT_NAME_HINTS = ("running_mean", "running_var", "moving_mean", "moving_variance", "moving_var")


@dataclass
class _Plan:
    """Everything derived from the model and options before the artifacts are built."""

    training: onnx.ModelProto         # training form with the input's BN nodes (exported from)
    graph: onnx.ModelProto            # what generate_artifacts gets (BN rewritten if frozen)
    trainable: list[str]
    frozen: list[str]
    input_names: list[str]
    output_name: str
    num_classes: int | None


def train_model(model: onnx.ModelProto, train_data: dict, val_data: dict | None = None, *, epochs: int = 1,
                lr: float = 1e-3, batch_size: int = 64, optimizer: str = "adamw", momentum: float = 0.9,
                weight_decay: float = 0.0, warmup_steps: int = 0, schedule: str = "linear",
                loss: str | os.PathLike = "cross_entropy", learn_scales: bool = False, freeze_bn: bool = False,
                fix_activations: bool | None = None, seed: int = 0, workdir: str | os.PathLike,
                resume: bool = False, progress: bool = True, threads: int = 0
                ) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Train `model` on `train_data` ({input name: array, "labels": array}) in ONNX Runtime.

    A QDQ model trains as QAT (FakeQuant with straight-through gradients) and comes back in
    QDQ form with trained weights (and scales, with `learn_scales`); a float model trains in
    float. `fix_activations=None` reads the `qgraph.fix_activations` flag written by
    calibration. `workdir` receives the artifacts and a checkpoint per epoch; `resume=True`
    continues after the last completed epoch. Returns the trained model and one dict per
    epoch: {epoch, train_loss, val_loss, val_top1, images_per_s, seconds}.

    Measured by benchmarks/qat.py (ORT 1.19.2, 2 shared CPU cores; MNIST 28x28, 4000 train /
    1000 val, batch 64, AdamW lr 3e-3 decaying linearly to 0, 5 epochs): builders' lenet 95.7%
    val top-1, mobilenetv2 93.4%; the same graphs with the same initial weights, batch order,
    optimizer and schedule in PyTorch 2.13 eager: 96.0% and 94.4% (identical lenet curve to
    epoch 4). QAT from those checkpoints via qat.yaml, 2 epochs: int8 95.7% / 93.4% (= float),
    W4A8 95.8% / 92.6% (PTQ 95.5% / 90.4%). QAT trains at 0.8-1.0x the float throughput.
    """
    _check_options(optimizer, schedule, epochs, batch_size, lr, loss)
    if fix_activations is None:
        fix_activations = bool(get_annotation(model, FIX_ACTIVATIONS, False))
    plan = _plan(model, loss, learn_scales, freeze_bn, bool(fix_activations))
    train_feeds = _prepare_data(train_data, plan, loss, "train data")
    val_feeds = _prepare_data(val_data, plan, loss, "val data") if val_data is not None else None

    workdir = Path(workdir)
    art = workdir / ARTIFACTS
    fingerprint = _fingerprint(model, loss, learn_scales, freeze_bn, fix_activations, optimizer)
    done = _read_progress(workdir, fingerprint) if resume else None
    momentum_sgd = optimizer == "sgd" and (momentum > 0 or weight_decay > 0)
    generate_training_artifacts(plan.graph, plan.trainable, plan.frozen, art, loss=_loss_arg(loss),
                                optimizer=optimizer, weight_decay=weight_decay,
                                extra_outputs=[plan.output_name])
    _, api = import_training_api()
    checkpoint = workdir / done["checkpoint"] if done else art / "checkpoint"
    state = api.CheckpointState.load_checkpoint(str(checkpoint))
    module = api.Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"),
                        session_options=session_options(threads))
    steps_per_epoch = -(-_count(train_feeds) // batch_size)
    total_steps = max(steps_per_epoch * epochs, 1)
    stepper = _Stepper(api, art, module, state, optimizer, lr, momentum, weight_decay, warmup_steps, schedule,
                       total_steps, momentum_sgd, workdir / done["velocity"] if done and done.get("velocity")
                       else None)
    history: list[dict] = list(done["history"]) if done else []
    first_epoch = done["epoch"] + 1 if done else 1
    stepper.fast_forward((first_epoch - 1) * steps_per_epoch)

    for epoch in range(first_epoch, epochs + 1):
        bar = ProgressBar(f"epoch {epoch}/{epochs}", steps_per_epoch, enabled=progress)
        start = time.perf_counter()
        order = np.random.default_rng([seed, epoch]).permutation(_count(train_feeds))
        module.train()
        losses, seen = [], 0
        for step, begin in enumerate(range(0, len(order), batch_size)):
            index = np.sort(order[begin:begin + batch_size])
            outputs = module(*[train_feeds[name][index] for name in module.input_names()])
            stepper.step()
            losses.append(float(np.asarray(outputs[0])) * len(index))
            seen += len(index)
            bar.update(step + 1, f"loss {losses[-1] / len(index):.4f} "
                                 f"{seen / (time.perf_counter() - start):.0f} img/s")
        train_seconds = time.perf_counter() - start
        bar.close()
        record = {"epoch": epoch, "train_loss": sum(losses) / seen, "images_per_s": seen / train_seconds}
        if val_feeds is not None:
            record.update(_evaluate(module, val_feeds, batch_size, plan.num_classes is not None))
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        _save_progress(workdir, api, state, stepper, epoch, fingerprint, history)
    trained = _export(plan, state)
    return trained, history


def evaluate_training_engine(workdir: str | os.PathLike, data: dict[str, np.ndarray]) -> np.ndarray:
    """The eval step's model output for `data["input"]`-style feeds, from `workdir`'s last checkpoint.

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
    feeds = []
    for name in module.input_names():
        if name in data:
            feeds.append(data[name])
        elif name == LABELS:  # the loss needs labels; the output does not depend on them
            feeds.append(np.zeros(count, np.int64))
        else:
            raise DataError(f"evaluate_training_engine: no array for {name!r}; the eval graph needs it")
    return module(*feeds)[-1]


# --- planning: the training graph and its parameters -----------------------------------

def _plan(model: onnx.ModelProto, loss, learn_scales: bool, freeze_bn: bool, fix_activations: bool) -> _Plan:
    if not model.graph.output:
        raise TrainError("model has no outputs; training needs the model output the loss is computed on")
    base = _bn_inference_form(model)
    training, info = to_training_form(base, learn_scales=learn_scales, freeze_activation_scales=fix_activations)
    graph = _freeze_bn(training) if freeze_bn else training
    bn_stats = [name for node in training.graph.node if node.op_type == "BatchNormalization"
                for name in node.input[3:5]]
    trainable, frozen = classify_parameters(graph, info.learned_scales, info.fixed_scales + bn_stats)
    if not trainable:
        raise TrainError("model has no trainable parameters (no float weight/bias initializers); "
                         "training needs weights stored as initializers")
    inits = {t.name for t in model.graph.initializer}
    input_names = [i.name for i in model.graph.input if i.name not in inits]
    output = model.graph.output[0]
    return _Plan(training, graph, trainable, frozen, input_names, output.name,
                 _num_classes(model) if loss == "cross_entropy" else None)


def classify_parameters(model: onnx.ModelProto, learned_scales: list[str] = (),
                        fixed: list[str] = ()) -> tuple[list[str], list[str]]:
    """Split the used initializers into (trainable, frozen).

    Trainable: float tensors of more than one element feeding the computation — weights,
    biases, BN γ/β — and the learned scales. Frozen: `fixed`, and everything else — BN running
    statistics (BN inputs 3-4, and in forward-fused BN the tensors under a Sqrt and the
    subtracted mean, and those listed by fuse_conv_bn's `qgraph.forward_fused_bn`), scalars
    (eps, clip bounds), fixed scales and zero points, integer tensors (shapes), and names
    listed in the model's `qgraph.frozen` annotation.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    used = {name for node in graph.node for name in node.input if name in inits}
    producer = {out: node for node in graph.node for out in node.output}
    frozen = set(get_annotation(model, "frozen", []) or []) | set(fixed)
    for entry in (get_annotation(model, "forward_fused_bn", {}) or {}).values():
        frozen.update(entry.get(key) for key in ("mean", "var") if entry.get(key))
    constant = set(inits)
    for node in graph.node:
        if all(name in constant or not name for name in node.input):
            constant.update(node.output)
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            frozen.update(node.input[3:5])
        if node.op_type in ("Sqrt", "Reciprocal", "Pow"):
            frozen.update(_initializer_ancestors(node.input[0], producer, inits, constant))
        if node.op_type == "Sub" and len(node.input) > 1:
            subtracted = node.input[1]
            if subtracted in inits:
                frozen.add(subtracted)
            elif subtracted in producer and producer[subtracted].op_type == "Mul":
                frozen.update(n for n in producer[subtracted].input if n in inits and _is_stat(n))
        if node.op_type == "FakeQuant" or node.domain == "com.microsoft":
            frozen.update(n for n in node.input[1:] if n in inits)
    learned = set(learned_scales)
    trainable, fixed = [], []
    for name in sorted(used):
        tensor = inits[name]
        is_float = tensor.data_type == onnx.TensorProto.FLOAT
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        if name in learned:
            trainable.append(name)
        elif not is_float or name in frozen or size <= 1 or _is_stat(name) or "__fq" in name and \
                not name.endswith("__fq_float"):
            fixed.append(name)
        else:
            trainable.append(name)
    return trainable, fixed


def _is_stat(name: str) -> bool:
    lowered = name.lower()
    return any(hint in lowered for hint in _STAT_NAME_HINTS)


def _initializer_ancestors(name: str, producer: dict, inits: dict, constant: set) -> set[str]:
    """Initializers that `name` is computed from, if it is computed from initializers alone."""
    found, stack, seen = set(), [name], set()
    while stack:
        current = stack.pop()
        if current in seen or current not in constant:
            continue
        seen.add(current)
        if current in inits:
            found.add(current)
        elif current in producer:
            stack.extend(producer[current].input)
    return found


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
    ranks = _ranks(out)
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


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # only a help: unknown ranks are reported where they matter
        inferred = model
    ranks = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


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

def _prepare_data(data: dict, plan: _Plan, loss, origin: str) -> dict[str, np.ndarray]:
    """Feeds by training-graph input name: model inputs plus `labels` (cross entropy) or `target` (MSE)."""
    if not isinstance(data, dict):
        raise DataError(f"{origin}: expected a dict of arrays, got {type(data).__name__}")
    feeds = {}
    for name in plan.input_names:
        if name not in data:
            raise DataError(f"{origin}: no array for model input {name!r}; keys are {sorted(data)}")
        feeds[name] = np.ascontiguousarray(data[name])
    count = len(feeds[plan.input_names[0]])
    if count == 0:
        raise DataError(f"{origin}: no samples")
    if loss == "cross_entropy":
        feeds[LABELS] = _class_labels(data, plan.num_classes, origin)
    elif loss == "mse":
        if LABELS not in data:
            raise DataError(f"{origin}: no {LABELS!r} array; MSE needs targets under the key {LABELS!r}")
        target = np.asarray(data[LABELS])
        if np.issubdtype(target.dtype, np.integer):  # class indices: regress onto one-hot vectors
            target = np.eye(int(target.max()) + 1, dtype=np.float32)[target]
        feeds["target"] = target.astype(np.float32)
    else:
        for key, value in data.items():
            if key not in feeds:
                feeds[key] = np.ascontiguousarray(value)
    for key, value in feeds.items():
        if len(value) != count:
            raise DataError(f"{origin}: {key!r} has {len(value)} rows, {plan.input_names[0]!r} has {count}")
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


def _count(feeds: dict) -> int:
    return len(next(iter(feeds.values())))


def _loss_arg(loss):
    return loss if loss in ("cross_entropy", "mse") else os.fspath(loss)


# --- steps, evaluation, checkpoints ----------------------------------------------------

class _Stepper:
    """One optimizer + learning-rate step after each train step (ORT's, or NumPy momentum SGD)."""

    def __init__(self, api, art, module, state, optimizer, lr, momentum, weight_decay, warmup, schedule,
                 total, momentum_sgd, velocity_file):
        self.module, self.state, self.lr, self.warmup, self.schedule, self.total = \
            module, state, lr, warmup, schedule, total
        self.momentum, self.weight_decay, self.step_count = momentum, weight_decay, 0
        self.velocity: dict[str, np.ndarray] | None = None
        self.optimizer = None
        if momentum_sgd:
            self.velocity = dict(np.load(velocity_file)) if velocity_file else {}
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


def _evaluate(module, feeds: dict, batch_size: int, classify: bool) -> dict:
    module.eval()
    total_loss, correct, count = 0.0, 0, _count(feeds)
    for begin in range(0, count, batch_size):
        batch = [feeds[name][begin:begin + batch_size] for name in module.input_names()]
        loss, output = module(*batch)[:2]
        n = len(batch[0])
        total_loss += float(np.asarray(loss)) * n
        if classify:
            correct += int((np.asarray(output).reshape(n, -1).argmax(1) == feeds[LABELS][begin:begin + n]).sum())
    module.train()
    result = {"val_loss": total_loss / count}
    result["val_top1"] = correct / count if classify else None
    return result


def _fingerprint(model, loss, learn_scales, freeze_bn, fix_activations, optimizer) -> str:
    digest = hashlib.sha256(model.graph.SerializeToString())
    digest.update(json.dumps([str(loss), learn_scales, freeze_bn, fix_activations, optimizer]).encode())
    return digest.hexdigest()[:16]


def _read_progress(workdir: Path, fingerprint: str) -> dict | None:
    path = workdir / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable ({exc}); delete it to start over") from None
    if progress.get("fingerprint") != fingerprint:
        raise TrainError(f"{path}: checkpoint belongs to another model or other training options "
                         f"(fingerprint {progress.get('fingerprint')}, this run {fingerprint}); "
                         "use another workdir or train without resume")
    if not (workdir / progress["checkpoint"]).exists():
        raise TrainError(f"{workdir / progress['checkpoint']}: checkpoint named in {path} is missing; "
                         "train without resume")
    return progress


def _save_progress(workdir: Path, api, state, stepper: _Stepper, epoch: int, fingerprint: str,
                   history: list) -> None:
    """Checkpoint first, then the JSON that points at it (atomic rename), then drop the old one."""
    name = f"epoch{epoch}.ckpt"
    api.CheckpointState.save_checkpoint(state, str(workdir / name), include_optimizer_state=True)
    velocity = None
    if stepper.velocity is not None:
        velocity = f"epoch{epoch}.velocity.npz"
        np.savez(workdir / velocity, **stepper.velocity)
    progress = {"fingerprint": fingerprint, "epoch": epoch, "checkpoint": name, "velocity": velocity,
                "history": history}
    with tempfile.NamedTemporaryFile("w", dir=workdir, delete=False, suffix=".json") as tmp:
        json.dump(progress, tmp, indent=1)
    os.replace(tmp.name, workdir / PROGRESS_FILE)
    for old in workdir.glob("epoch*"):
        if old.name not in (name, velocity):
            old.unlink()


def _export(plan: _Plan, state) -> onnx.ModelProto:
    values = {name: param.data for name, param in state.parameters}
    return to_qdq_form(plan.training, values)


# --- checks and the progress bar ---------------------------------------------------------

def _check_options(optimizer, schedule, epochs, batch_size, lr, loss) -> None:
    if optimizer not in ("adamw", "sgd"):
        raise TrainError(f"optimizer {optimizer!r}: ORT training offers adamw and sgd")
    if schedule not in ("linear", "constant"):
        raise TrainError(f"schedule {schedule!r} is not one of linear, constant")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise TrainError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1 and lr ({lr}) > 0")
    if loss not in ("cross_entropy", "mse") and not Path(loss).is_file():
        raise TrainError(f"loss {loss!r} is not cross_entropy, mse, or an existing .onnx loss graph")
