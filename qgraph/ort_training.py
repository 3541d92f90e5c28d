"""The one place that imports ONNX Runtime's training API, without torch.

`import onnxruntime.training` imports torch (through its `optim` subpackage), but the
`artifacts` and `api` submodules need neither. Registering an empty package object for
`onnxruntime.training` in `sys.modules`, whose `__path__` is the installed folder, lets
Python import those two submodules while skipping the package's `__init__`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qgraph.differentiable import explain_failure
from qgraph.errors import TrainError
from qgraph.runner import ort_message

_PACKAGE = "onnxruntime.training"


def import_training_api() -> tuple[types.ModuleType, types.ModuleType]:
    """Return `(artifacts, api)` of onnxruntime-training with logging at warning level."""
    try:
        import onnxruntime
        from onnxruntime.capi import _pybind_state as capi
    except ImportError as exc:
        raise TrainError(f"onnxruntime is not importable ({exc}); install onnxruntime-training-cpu==1.19.2") from None
    if not hasattr(capi, "load_checkpoint"):
        raise TrainError("this onnxruntime has no training support; install onnxruntime-training-cpu==1.19.2 "
                         "instead of the plain onnxruntime package")
    if _PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise TrainError("onnxruntime.training is not installed; install onnxruntime-training-cpu==1.19.2")
        package = types.ModuleType(_PACKAGE)
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = _PACKAGE
        sys.modules[_PACKAGE] = package
        onnxruntime.training = package
    artifacts = importlib.import_module(_PACKAGE + ".artifacts")
    api = importlib.import_module(_PACKAGE + ".api")
    quiet_ort_logging()
    return artifacts, api


def quiet_ort_logging() -> None:
    """ORT's C++ core logs at verbose/info by default: keep warnings and errors only."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


@contextlib.contextmanager
def quiet_python_logging():
    """generate_artifacts logs every step on the root logger; hold it at warning meanwhile."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _quiet_session_options():
    """SessionOptions for the sessions generate_artifacts opens itself (they log at info)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4   # errors come back as exceptions, which qgraph reports
    return options


def session_options(threads: int = 0, spin: bool = True):
    """SessionOptions for training sessions: quiet, `threads` intra-op threads (0 = ORT's choice);
    `spin=False` when another session (a distillation teacher) alternates with this one: ORT's
    idle worker threads busy-wait by default, and two pools spinning in turn halve the throughput
    of both on few cores (measured: distillation at 0.66x of labelled QAT on LeNet, 0.88x without)."""
    options = _quiet_session_options()
    options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def control_flow_on_gradient_path(model: onnx.ModelProto, requires_grad: list[str]) -> onnx.NodeProto | None:
    """The first If/Loop/Scan node through which values computed from a trained parameter reach a
    graph output: its bodies read such a tensor other than for its shape (Shape, Size), or a Loop
    or Scan carries one; an If's condition and a Loop's trip count and condition carry no
    gradient. None when there is none."""
    from qgraph.interp.registry import outer_names, subgraphs
    nodes = list(model.graph.node)
    value_reads = [_value_reads(n) for n in nodes]
    all_reads = [[*n.input, *outer_names(n)] for n in nodes]
    tainted = set(requires_grad)
    for node, names in zip(nodes, all_reads):              # nodes are in topological order
        if any(t in tainted for t in names):
            tainted.update(o for o in node.output if o)
    needed = {o.name for o in model.graph.output}
    for node, names, values in zip(reversed(nodes), reversed(all_reads), reversed(value_reads)):
        if any(o in needed for o in node.output):
            if subgraphs(node) and any(t in tainted for t in values):
                return node
            needed.update(t for t in names if t)
    return None


def _value_reads(node: onnx.NodeProto) -> list[str]:
    """What a node passes on as values: its inputs (a Loop's carried ones only, none of an If's),
    and what its bodies read other than for a shape (Shape, Size), nested bodies by this rule."""
    from qgraph.interp.registry import outer_names, subgraphs
    body = outer_names(node, reads=lambda n: _value_reads(n) if subgraphs(n) else
                       (() if n.op_type in ("Shape", "Size") else n.input))
    if node.op_type == "If":
        return list(body)
    if node.op_type == "Loop":
        return [*node.input[2:], *body]
    return [*node.input, *body]


def generate_training_artifacts(model: onnx.ModelProto, requires_grad: list[str], frozen: list[str],
                                directory: str | os.PathLike, *, loss="cross_entropy", optimizer: str = "adamw",
                                weight_decay: float = 0.0, extra_outputs: list[str] | None = None,
                                declined: dict[str, str] | None = None) -> None:
    """Write training_model.onnx, eval_model.onnx, optimizer_model.onnx and checkpoint into `directory`.

    `loss` is "cross_entropy", "mse", an ONNX loss graph (path or ModelProto) whose first
    input takes the model's first output, whose other inputs are data keys, and whose first
    output is the scalar loss, or a `DistillationLoss`. `optimizer` is "adamw" or "sgd" (ORT's
    SGD has no momentum). `declined` (node -> reason) explains ops ORT cannot differentiate.
    """
    blocked = control_flow_on_gradient_path(model, requires_grad)
    if blocked is not None:
        raise TrainError(f"node {blocked.name or blocked.output[0]!r} ({blocked.op_type}) lies between a trained "
                         "parameter and the loss, and ONNX Runtime 1.19 training cannot differentiate control flow "
                         "(its gradient builder aborts the process); fold it first (canonicalize inlines an If whose "
                         "condition is constant: `qgraph passes run --fix-input`, static shapes) or freeze the "
                         "layers before it")
    artifacts, _ = import_training_api()
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _training_graph_utils

    Path(directory).mkdir(parents=True, exist_ok=True)
    if isinstance(loss, DistillationLoss):
        loss_block = _distillation_block(onnxblock, loss)
    elif loss == "cross_entropy":
        loss_block = artifacts.LossType.CrossEntropyLoss
    elif loss == "mse":
        loss_block = artifacts.LossType.MSELoss
    else:
        loss_block = _graph_loss_block(onnxblock, loss)
    if optimizer == "adamw":
        optim_block = onnxblock.optim.AdamW(weight_decay=weight_decay)
    elif optimizer == "sgd":
        optim_block = artifacts.OptimType.SGD
    else:
        raise TrainError(f"optimizer {optimizer!r} is not one of adamw, sgd")
    # generate_artifacts opens sessions with default (info-level) options: make them quiet
    _training_graph_utils.SessionOptions = _quiet_session_options
    try:
        with quiet_python_logging():
            artifacts.generate_artifacts(model, requires_grad=list(requires_grad), frozen_params=list(frozen),
                                         loss=loss_block, optimizer=optim_block, artifact_directory=str(directory),
                                         additional_output_names=list(extra_outputs) if extra_outputs else None)
    except TrainError:
        raise
    except Exception as exc:  # ORT raises bare RuntimeErrors from C++
        explained = explain_failure(str(exc), declined)
        raise TrainError(f"ONNX Runtime cannot build training artifacts: {explained or ort_message(exc)}") \
            from None
    if optimizer == "adamw":
        _torch_adamw_mode(Path(directory) / "optimizer_model.onnx")


def _torch_adamw_mode(path: Path) -> None:
    """Switch ORT's AdamWOptimizer node from Hugging Face mode to PyTorch mode (`adam_mode` 1 -> 0).

    onnxblock's AdamW always writes `adam_mode=1`, which adds eps to the *uncorrected*
    sqrt(v): the effective eps is eps / sqrt(1 - beta2^t), 31.6x larger at step 1. Every
    gradient element below ~3e-5 then gets a far smaller first update than torch.optim.AdamW
    gives it (measured on mobilenetv2: median per-tensor first-update difference 63% -> 0.4%
    in mode 0). Mode 0 is torch.optim.AdamW: bias-corrected moments, decoupled weight decay
    applied before the update.
    """
    model = onnx.load(str(path))
    changed = False
    for node in model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attr in node.attribute:
                if attr.name == "adam_mode" and attr.i != 0:
                    attr.i = 0
                    changed = True
    if changed:
        onnx.save(model, str(path))


def _graph_loss_block(onnxblock, loss):
    """An onnxblock.Block that splices a user's loss graph onto the model's output."""
    if isinstance(loss, onnx.ModelProto):
        loss_model = loss
    else:
        path = Path(loss)
        if not path.is_file():
            raise TrainError(f"loss {loss!r} is not cross_entropy, mse, or an existing .onnx loss graph")
        loss_model = onnx.load(str(path))
    graph = loss_model.graph
    if not graph.input or not graph.output:
        raise TrainError(f"loss graph {loss!r}: needs a prediction input, target inputs and a scalar output")

    class GraphLoss(onnxblock.Block):
        def build(self, prediction: str, *_unused):
            base = self.base
            rename = {graph.input[0].name: prediction}
            existing = {i.name for i in base.graph.input}
            for target in graph.input[1:]:
                if target.name not in existing:
                    base.graph.input.append(target)
            for init in graph.initializer:
                copy = onnx.TensorProto()
                copy.CopyFrom(init)
                copy.name = "loss::" + init.name
                rename[init.name] = copy.name
                base.graph.initializer.append(copy)
            for node in graph.node:
                new = onnx.NodeProto()
                new.CopyFrom(node)
                for i, name in enumerate(new.input):
                    new.input[i] = rename.get(name, name)
                new.name = "loss::" + (node.name or node.output[0])
                base.graph.node.append(new)
            return graph.output[0].name

    return GraphLoss()


# --- the distillation loss ------------------------------------------------------------------

TEACHER_PREFIX = "teacher::"   # graph inputs that carry the teacher's value of a tensor


@dataclass(frozen=True)
class DistillTerm:
    """One term of a distillation loss: the student tensor, compared with the teacher's value of
    it (fed as the graph input `TEACHER_PREFIX + tensor`).

    `mse`: mean((s - t)^2) / max(mean(t^2), 1e-12), the squared error relative to the teacher's
    energy (1 / SNR), so outputs of any magnitude weigh alike. `kl`: T^2 * mean over positions of
    KL(softmax(t / T) || softmax(s / T)) along `axis`; `form` says what the tensors hold
    (logits; probabilities, whose log is taken first; log-probabilities)."""

    tensor: str
    kind: Literal["mse", "kl"]
    rank: int
    weight: float = 1.0
    form: Literal["logits", "probs", "logprobs"] = "logits"
    axis: int = -1
    temperature: float = 1.0

    @property
    def teacher_input(self) -> str:
        return TEACHER_PREFIX + self.tensor


@dataclass(frozen=True)
class DistillationLoss:
    """The loss of distillation training: the sum of `terms`, plus `label_weight` times the
    label loss (`label_loss`: "cross_entropy", "mse" or a loss graph) on the first output."""

    terms: tuple[DistillTerm, ...]
    label_loss: object = None
    label_weight: float = 0.0


_EPS = 1e-12


def _distillation_block(onnxblock, spec: DistillationLoss):
    """An onnxblock.Block that adds the teacher inputs and the distillation loss nodes."""

    label_block = None
    if spec.label_weight > 0:
        if spec.label_loss == "cross_entropy":
            label_block = onnxblock.loss.CrossEntropyLoss()
        elif spec.label_loss == "mse":
            label_block = onnxblock.loss.MSELoss()
        else:
            label_block = _graph_loss_block(onnxblock, spec.label_loss)

    class Distillation(onnxblock.Block):
        def build(self, *outputs):
            graph = self.base.graph
            nodes: list[onnx.NodeProto] = []

            def const(name: str, value) -> str:
                graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
                return name

            def node(op: str, inputs: list[str], out: str, **attrs) -> str:
                nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
                return out

            parts = []
            for i, term in enumerate(spec.terms):
                p = f"distill::{i}::"
                graph.input.append(helper.make_tensor_value_info(
                    term.teacher_input, onnx.TensorProto.FLOAT, [f"{p}d{k}" for k in range(term.rank)]))
                if term.kind == "mse":
                    value = _relative_mse(node, const, p, term.tensor, term.teacher_input)
                else:
                    value = _kl_divergence(node, const, p, term)
                if term.weight != 1.0:
                    value = node("Mul", [value, const(p + "weight", term.weight)], p + "weighted")
                parts.append(value)
            if label_block is not None:
                graph.node.extend(nodes)
                nodes.clear()
                label = label_block(outputs[0])
                parts.append(node("Mul", [label, const("distill::label_weight", spec.label_weight)],
                                  "distill::label_term"))
            total = parts[0]
            for i, part in enumerate(parts[1:]):
                total = node("Add", [total, part], f"distill::sum{i}")
            graph.node.extend(nodes)
            return total

    return Distillation()


def _relative_mse(node, const, p: str, student: str, teacher: str) -> str:
    diff = node("Sub", [student, teacher], p + "diff")
    error = node("ReduceMean", [node("Mul", [diff, diff], p + "sq")], p + "mse", keepdims=0)
    energy = node("ReduceMean", [node("Mul", [teacher, teacher], p + "tsq")], p + "energy", keepdims=0)
    energy = node("Max", [energy, const(p + "eps", _EPS)], p + "energy_floor")
    return node("Div", [error, energy], p + "relative_mse")


def _kl_divergence(node, const, p: str, term: DistillTerm) -> str:
    def logits(name: str, side: str) -> str:
        if term.form == "probs":
            floor = node("Max", [name, const(p + side + "tiny", 1e-30)], p + side + "floor")
            name = node("Log", [floor], p + side + "log")
        if term.temperature != 1.0:
            name = node("Div", [name, const(p + side + "T", term.temperature)], p + side + "scaled")
        return name

    student = node("LogSoftmax", [logits(term.tensor, "s_")], p + "s_logp", axis=term.axis)
    teacher_logits = logits(term.teacher_input, "t_")
    teacher = node("LogSoftmax", [teacher_logits], p + "t_logp", axis=term.axis)
    prob = node("Softmax", [teacher_logits], p + "t_p", axis=term.axis)
    gap = node("Mul", [prob, node("Sub", [teacher, student], p + "gap")], p + "pointwise")
    axes = p + "axes"
    node("Constant", [], axes, value=numpy_helper.from_array(np.array([term.axis], np.int64), axes))
    per_position = node("ReduceSum", [gap, axes], p + "kl", keepdims=0)
    value = node("ReduceMean", [per_position], p + "kl_mean", keepdims=0)
    if term.temperature != 1.0:
        value = node("Mul", [value, const(p + "T2", term.temperature ** 2)], p + "kl_scaled")
    return value
