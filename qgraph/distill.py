"""Distillation: the teacher model in ORT inference beside the trainer, and the loss terms that
compare the student's tensors with the teacher's (qgraph.train runs the steps).

The teacher takes the student's inputs by name and has each of the student's float outputs by
name (and each --feature tensor); both run on the first training batch and every pair must
have one shape. Per output the loss is `--distill-loss`, else KL along the axis of a Softmax or
LogSoftmax output (a distribution) and relative MSE for every other output (logits, boxes,
maps); features are MSE with `feature_weight`; labels, when given, add the label loss with
`label_weight` (qgraph.ort_training.DistillationLoss builds the graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from qgraph.annotations import rescale_between
from qgraph.data import model_inputs
from qgraph.errors import ModelError, TrainError
from qgraph.idioms import dims_map
from qgraph.ort_training import TEACHER_PREFIX, DistillationLoss, DistillTerm
from qgraph.runner import Runner

if TYPE_CHECKING:   # train imports this module
    from qgraph.train import TrainConfig, _Plan


@dataclass
class Distill:
    """The teacher in ORT inference beside the trainer, and the loss that compares with it."""

    runner: Runner                 # the teacher, returning its outputs and the feature tensors
    inputs: list[str]              # the teacher's inputs (each also a student input)
    outputs: list[str]             # student outputs distilled (float), compared for fidelity
    tensors: list[str]             # outputs + features: the teacher values the loss reads
    graph: onnx.ModelProto         # the student training graph, features added as outputs
    loss: DistillationLoss
    models: tuple                  # (teacher, student): their qgraph.rescaled map teacher tensors onto the student's

    def teacher_values(self, batch: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        """The teacher's value of every distilled tensor on `batch`, keyed by graph input name."""
        try:
            values = self.runner.run({name: batch[name] for name in self.inputs}, self.tensors)
        except ModelError as exc:
            raise TrainError(f"{where}: the teacher failed: {exc}") from None
        for name, value in values.items():
            if not np.isfinite(value).all():
                raise TrainError(f"{where}: the teacher's {name!r} holds NaN or Inf on this batch; "
                                 "check the data and the --teacher model")
        # a feature that smooth or equalize rescaled in the student is the teacher's divided the same way
        return {TEACHER_PREFIX + name: rescale_between(*self.models, name, value) for name, value in values.items()}


def distill_plan(teacher: onnx.ModelProto, student: onnx.ModelProto, plan: "_Plan", config: "TrainConfig",
                  train_feeds: dict, batch: int, threads: int, loss_graph) -> Distill:
    """Check that the teacher fits the student, and build the loss terms.

    The teacher takes the student's inputs and has each of its float outputs by name (and each
    --feature tensor); on the first training batch both run in ORT inference and every pair of
    tensors must have one shape."""
    student_inputs = set(plan.input_names)
    teacher_inputs = model_inputs(teacher)
    for name, (_, dims) in teacher_inputs.items():
        if name not in student_inputs:
            raise TrainError(f"--teacher: its input {name!r} is not an input of the model "
                             f"({', '.join(plan.input_names)}); the teacher must take the model's inputs")
        if dims and dims[0] is not None and dims[0] != batch:
            raise TrainError(f"--teacher: its input {name!r} has a batch dimension fixed at {dims[0]}, and the "
                             f"model trains at batch {batch}; give --batch-size {dims[0]} or a teacher with a "
                             "dynamic batch")
    teacher_inputs = list(teacher_inputs)
    teacher_outputs = [o.name for o in teacher.graph.output]
    outputs = [o.name for o in student.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if not outputs:
        raise TrainError("the model has no float output to distill")
    for name in outputs:
        if name not in teacher_outputs:
            raise TrainError(f"--teacher: the model's output {name!r} is not an output of the teacher (its outputs: "
                             f"{', '.join(teacher_outputs)}); distill against the float model the model was "
                             "prepared from")
    for name in config.distill_loss:
        if name not in outputs:
            raise TrainError(f"--distill-loss {name!r}: the model has no float output of that name; its outputs: "
                             f"{', '.join(outputs)}")
    features = list(config.feature)
    for name in features:
        if name in outputs:
            raise TrainError(f"--feature {name!r} is a model output, which is distilled anyway; "
                             "name intermediate tensors")
        for model, who in ((student, "the model"), (teacher, "the teacher")):
            _check_feature(model, name, who)
    tensors = outputs + features
    try:
        runner = Runner(teacher, features, threads=threads, spin=False)
    except ModelError as exc:
        raise TrainError(f"--teacher: {exc}") from None
    probe = {name: train_feeds[name][:batch] for name in plan.input_names}
    taught = {name: rescale_between(teacher, student, name, value)
              for name, value in _distill_probe(runner, probe, tensors, "the teacher").items()}
    learnt = _distill_probe(Runner(student, features, threads=threads), probe, tensors, "the model")
    for name in tensors:
        if taught[name].shape != learnt[name].shape:
            kind = "output" if name in outputs else "--feature"
            raise TrainError(f"--teacher: {kind} {name!r} has shape {list(taught[name].shape)} in the teacher and "
                             f"{list(learnt[name].shape)} in the model on the same batch; distill against the "
                             "float model the model was prepared from")
    terms = [_output_term(teacher, name, taught[name].shape, config) for name in outputs]
    terms += [DistillTerm(name, "mse", taught[name].ndim, weight=config.feature_weight) for name in features]
    label_loss = loss_graph if loss_graph is not None else config.loss
    loss = DistillationLoss(tuple(terms), label_loss, config.label_weight)
    graph = _with_distilled_outputs(plan.graph, {name: taught[name].ndim for name in tensors})
    return Distill(runner, teacher_inputs, outputs, tensors, graph, loss, (teacher, student))


def _check_feature(model: onnx.ModelProto, name: str, who: str) -> None:
    produced = [out for node in model.graph.node for out in node.output if out]
    if name in produced:
        return
    import difflib
    close = difflib.get_close_matches(name, produced, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TrainError(f"--feature {name!r}: {who} has no tensor of that name{hint}; name a tensor both the "
                     "teacher and the model compute")


def _distill_probe(runner: Runner, feeds: dict, names: list[str], who: str) -> dict[str, np.ndarray]:
    try:
        values = runner.run(feeds, names)
    except ModelError as exc:
        raise TrainError(f"{who} cannot run on the first training batch: {exc}") from None
    for name, value in values.items():
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            raise TrainError(f"{who}'s {name!r} is {np.asarray(value).dtype}, not float; distill float tensors")
    return values


def _output_term(teacher: onnx.ModelProto, name: str, shape: tuple, config: "TrainConfig") -> DistillTerm:
    """The loss term of one output: `--distill-loss`, else KL along the axis of a Softmax or
    LogSoftmax output (a distribution) and relative MSE for every other output."""
    op, axis = _distribution(teacher, name, shape) or ("", -1)
    form = {"Softmax": "probs", "LogSoftmax": "logprobs"}.get(op, "logits")
    if name in config.distill_loss:
        kind = config.distill_loss[name]
    else:   # a distribution: KL; raw values (logits, boxes, maps): MSE, which measured as well on logits
        kind = "kl" if op in ("Softmax", "LogSoftmax") else "mse"
    return DistillTerm(name, kind, len(shape), form=form, axis=axis, temperature=config.temperature)


_RESHAPES = ("Reshape", "Flatten")


def _distribution(teacher: onnx.ModelProto, name: str, shape: tuple) -> tuple[str, int] | None:
    """(Softmax or LogSoftmax, axis) when output `name` is one, looking through Identity, and
    through Reshape/Flatten when the softmax runs along its input's last axis and the output's
    last axis has that size: each row of the output is then one softmax row (Paddle2ONNX writes
    CTC probabilities as Flatten -> Softmax -> Reshape)."""
    by_output = {out: node for node in teacher.graph.node for out in node.output}
    node, reshaped = by_output.get(name), False
    while node is not None and (node.op_type == "Identity" or node.op_type in _RESHAPES):
        reshaped |= node.op_type in _RESHAPES
        node = by_output.get(node.input[0])
    if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    if not reshaped:
        return node.op_type, axis
    dims = dims_map(teacher).get(node.input[0])
    if not dims or axis not in (-1, len(dims) - 1) or dims[-1] is None or not shape or dims[-1] != shape[-1]:
        return None
    return node.op_type, -1


def _with_distilled_outputs(graph: onnx.ModelProto, ranks: dict[str, int]) -> onnx.ModelProto:
    """A copy whose outputs are the distilled tensors (features added), declared by rank only
    (exporters sometimes declare output shapes the model does not produce)."""
    out = onnx.ModelProto()
    out.CopyFrom(graph)
    kept = [o for o in out.graph.output if o.name not in ranks]
    del out.graph.output[:]
    for name, rank in ranks.items():
        out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                              [f"{name}::d{k}" for k in range(rank)]))
    out.graph.output.extend(kept)
    return out
