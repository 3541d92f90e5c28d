"""Inputs whose batch is not their first axis (a recurrent state ``[layers, batch, hidden]``, as
Silero VAD and ONNX's LSTM take it), seen batch-first for training, which batches every input
along its first axis.

``batch_first_model`` gives such an input a batch-first twin ``<name>::batch_first`` and a
Transpose back to the original layout in front of the graph, ``batch_first_data`` moves the
data's sample axis to the front the same way, and ``restore_batch_axes`` removes the Transposes
from the trained model, so that it takes the input as before. The Transpose moves values and
nothing else: training computes what the original model computes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qgraph.errors import DataError

SUFFIX = "::batch_first"


def later_batch_axes(model: onnx.ModelProto, data: dict) -> dict[str, int]:
    """Input name -> its batch axis, for the inputs with a fixed first dimension whose batch is a
    later symbolic one, next to a batch-first input: the dimension named like another input's
    batch, or else the only symbolic one where `data` gives the input one whole value per sample
    with that axis of size 1 (stacked on a new first axis) — nothing is guessed."""
    initialized = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialized]
    first = [i.type.tensor_type.shape.dim[0] for i in inputs if i.type.tensor_type.shape.dim]
    if not any(not d.HasField("dim_value") for d in first):
        return {}                                  # no batch-first input: a fixed-batch model
    batch_names = {d.dim_param for d in first if not d.HasField("dim_value") and d.dim_param}
    axes = {}
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value"):
            continue
        symbolic = [k for k, d in enumerate(dims) if not d.HasField("dim_value")]
        named = [k for k in symbolic if dims[k].dim_param in batch_names]
        array = np.asarray(data.get(inp.name)) if inp.name in data else None
        if named:
            axes[inp.name] = named[0]
        elif len(symbolic) == 1 and array is not None and array.ndim == len(dims) + 1 \
                and array.shape[symbolic[0] + 1] == 1:
            axes[inp.name] = symbolic[0]
    return axes


def batch_first_model(model: onnx.ModelProto, axes: dict[str, int]) -> onnx.ModelProto:
    """`model` taking each input of `axes` batch-first as ``<name>::batch_first``, a Transpose
    giving the graph the original layout."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    transposes = []
    for inp in model.graph.input:
        if inp.name not in axes:
            continue
        axis, dims = axes[inp.name], list(inp.type.tensor_type.shape.dim)
        original = inp.name
        inp.name = original + SUFFIX
        del inp.type.tensor_type.shape.dim[:]
        inp.type.tensor_type.shape.dim.extend([dims[axis]] + dims[:axis] + dims[axis + 1:])
        perm = list(range(1, axis + 1)) + [0] + list(range(axis + 1, len(dims)))
        transposes.append(helper.make_node("Transpose", [inp.name], [original], name=inp.name + "/transpose",
                                           perm=perm))
    nodes = transposes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def restore_batch_axes(model: onnx.ModelProto, original: onnx.ModelProto, axes: dict[str, int]) -> onnx.ModelProto:
    """`model` (trained in batch_first_model's form) without the Transposes, taking each input of
    `axes` as `original` declares it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    twins = {name + SUFFIX: name for name in axes}
    kept = [n for n in model.graph.node if not (n.op_type == "Transpose" and n.input and n.input[0] in twins)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    declared = {i.name: i for i in original.graph.input}
    for inp in model.graph.input:
        if inp.name in twins:
            inp.CopyFrom(declared[twins[inp.name]])
    return model


def batch_first_data(data: dict | None, model: onnx.ModelProto, axes: dict[str, int],
                     origin: str = "data") -> dict | None:
    """`data` with each input of `axes` under its batch-first name, samples first: from one whole
    input per sample stacked on a new first axis (its batch axis of size 1), or from an array
    whose samples run along the input's batch axis."""
    if data is None:
        return None
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input}
    out = dict(data)
    for name, axis in axes.items():
        if name not in out:
            continue
        array = np.asarray(out.pop(name))
        stacked = array.ndim == ranks[name] + 1
        if stacked and array.shape[axis + 1] != 1:
            raise DataError(f"{origin}: {name!r} holds {array.shape[axis + 1]} samples in each of its "
                            f"{array.shape[0]} entries (axis {axis} of {list(array.shape[1:])}); give one sample per "
                            f"entry, or the samples along axis {axis} of one array")
        out[name + SUFFIX] = np.ascontiguousarray(np.moveaxis(array, axis + 1, 1)[:, 0] if stacked
                                                  else np.moveaxis(array, axis, 0))
    return out
