"""Ops that ONNX Runtime 1.19.2's trainer cannot differentiate on CPU, rewritten into ops it can.

Measured with onnxruntime-training-cpu 1.19.2 (tests/test_differentiable.py puts each op between
a trained Conv and a loss, then builds the artifacts and runs a CPU train step):
- no gradient: HardSigmoid, HardSwish, PRelu, Softplus, Elu, Sum, ReduceMax, GlobalMaxPool, Einsum,
  InstanceNormalization, DepthToSpace, SpaceToDepth, CumSum, Floor, Round, RNN;
- a gradient graph but no CPU kernel for it: Resize (ResizeGrad), ConvTranspose (ConvTransposeGrad);
- pooling gradients that read the input size from the graph's static shapes: AveragePoolGrad
  divides by zero when a dimension is symbolic (the process dies of SIGFPE), MaxPoolGrad returns
  zeros when a spatial dimension is; the trainer fixes the inputs' non-batch dimensions to the
  data's, and AveragePool (whose batch dimension stays symbolic) is rewritten;
- LayerNormalization: its gradient reads the node's Mean and InvStdDev outputs, which exported
  nodes omit;
- LSTM and GRU: a gradient only for com.microsoft LSTMTraining / GRUTraining, with every optional
  input slot written out and their extra state outputs; the CPU kernels run forward only;
- trains as is: Conv, Gemm, MatMul (also activation x activation), BatchNormalization, Relu,
  Clip, LeakyRelu, Sigmoid, Tanh, Erf, Exp, Log, Abs, Neg, Reciprocal, Pow, Sqrt, Add/Sub/Mul/
  Div, Min/Max, Softmax, LogSoftmax, Split, Concat, Slice, Gather, GatherElements, Transpose,
  Reshape, Flatten, Squeeze, Unsqueeze, Expand, Tile, Where, Pad, TopK, MaxPool (static sizes),
  GlobalAveragePool, ReduceMean, ReduceSum, Identity, Dropout.

The rewrites (outputs unchanged up to float rounding; each records the node it replaced, so
`restore_nodes` puts it back, reading the trained parameters by their unchanged names):

    HardSigmoid(x) = Clip(α·x + β, 0, 1)        HardSwish(x) = x · HardSigmoid(x; 1/6, 1/2)
    PRelu(x, a) = Relu(x) + a · Min(x, 0)       Softplus(x) = Relu(x) + Log(1 + Exp(-|x|))
    Elu(x) = Relu(x) + α · (Exp(Min(x, 0)) - 1) Sum(a, b, ...) = a + b + ...
    Resize that repeats each element s times (nearest, integer factors; dynamic sizes too):
        Reshape(Unsqueeze(x) · ones[s], Shape(x) · s)
    Resize with static sizes (nearest, linear, cubic): y = Σ_k w_k · Gather(x, i_k) along each
        resized axis, with the taps (i_k, w_k) read off by running the node itself on a one-hot probe
    ConvTranspose(x, W) = Conv(x zero-stuffed by the strides, W with in/out channels swapped per
        group and its kernel flipped), padded by d·(k - 1) - p
    AveragePool(x) = Conv(x, 1/|window|, group=C) (divided by the window's element count where
        padding does not count)
    GlobalMaxPool(x) = MaxPool(x) over the whole (static) map
    ReduceMax(x, axes) = TopK(x, 1) along each axis (Squeezed for keepdims=0)
    LayerNormalization: the Mean and InvStdDev outputs added
    LSTM/GRU -> LSTMTraining/GRUTraining; direction reverse = a forward run on the time-reversed
        sequence; bidirectional = both, concatenated

A node a rewrite cannot handle stays as it is, with the reason kept: ORT only needs gradients on
paths from trained parameters to the loss, and when it fails on such a node, `explain_failure`
turns its message into one naming the node, the op and that reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qgraph.idioms import Declined, constant_tensors, dims_map
from qgraph.model_io import MS_DOMAIN

_SUFFIX = "__diff"

# Float inputs that no gradient reaches (sizes, bounds, indices given as floats): an initializer
# used only in such a slot is a constant of the graph, not a trainable parameter.
NON_DIFFERENTIABLE_INPUTS: dict[str, set[int]] = {
    "Resize": {1, 2, 3}, "Upsample": {1}, "Pad": {1, 2, 3}, "Clip": {1, 2}, "Reshape": {1}, "Expand": {1},
    "Tile": {1}, "Slice": {1, 2, 3, 4}, "Range": {0, 1, 2}, "ConstantOfShape": {0}, "Where": {0},
    "TopK": {1}, "Gather": {1}, "GatherElements": {1}, "GatherND": {1}, "Split": {1}, "Squeeze": {1},
    "Unsqueeze": {1}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}, "ReduceMin": {1},
    "Pow": {1}, "Equal": {0, 1}, "Greater": {0, 1}, "Less": {0, 1}, "GreaterOrEqual": {0, 1},
    "LessOrEqual": {0, 1}, "Shape": {0}, "Size": {0}, "Cast": {0}, "Floor": {0}, "Ceil": {0},
    "Round": {0}, "Sign": {0}, "ArgMax": {0}, "ArgMin": {0}, "NonZero": {0}, "CumSum": {1},
    "OneHot": {0, 1, 2},     # its off/on values (Keras' [0, 1]): ORT has no gradient for them
}


@dataclass
class RewriteInfo:
    """What `make_differentiable` did: one record per replaced node, and the nodes it left."""

    records: list[dict] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)   # node name -> why it was kept

    @property
    def created_constants(self) -> list[str]:
        return [name for r in self.records for name in r["created_inits"]]


def make_differentiable(model: onnx.ModelProto) -> tuple[onnx.ModelProto, RewriteInfo]:
    """A copy of `model` whose nodes ORT cannot train through are rewritten (see the module doc)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    info = RewriteInfo()
    if not any(node.op_type in _REWRITES and node.domain in ("", "ai.onnx") for node in graph.node):
        return out, info
    context = _Context(out)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        rewrite = _REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rewrite is None:
            nodes.append(node)
            continue
        emit = _Emitter(node)
        try:
            rewrite(node, emit, context)
        except Declined as exc:
            info.declined[node.name or node.output[0]] = exc.reason
            nodes.append(node)
            continue
        nodes.extend(emit.nodes)
        graph.initializer.extend(emit.inits)
        info.records.append({"node": _to_b64(node), "created_nodes": [n.name for n in emit.nodes],
                             "created_inits": [t.name for t in emit.inits]})
    del graph.node[:]
    graph.node.extend(nodes)
    if any(n.domain == MS_DOMAIN for n in nodes) and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out, info


def restore_nodes(graph: onnx.GraphProto, records: list[dict]) -> None:
    """Put the recorded original nodes back in place of what replaced them, in place."""
    if not records:
        return
    owner = {name: i for i, r in enumerate(records) for name in r["created_nodes"]}
    created_inits = {name for r in records for name in r["created_inits"]}
    nodes, done = [], set()
    for node in graph.node:
        index = owner.get(node.name)
        if index is None:
            nodes.append(node)
        elif index not in done:
            done.add(index)
            nodes.append(_from_b64(records[index]["node"]))
    kept = [t for t in graph.initializer if t.name not in created_inits]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)


def is_parameter_slot(op_type: str, index: int) -> bool:
    """Whether a gradient can reach input `index` of an `op_type` node."""
    return index not in NON_DIFFERENTIABLE_INPUTS.get(op_type, ())


_NO_GRADIENT = re.compile(r"gradient builder has not been registered:\s*(\w+) for node\s*(\S*)")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)Grad\(\d+\) node with name '(.*?)_Grad/")
# a plain LSTM/GRU: ORT builds the gradient of its *Training form, whose inputs do not line up
_WRONG_FORM = re.compile(r"of operator \((LSTM|GRU)Grad\) in node \((.*?)(?:_training)?_Grad/")


def explain_failure(message: str, declined: dict[str, str] | None = None) -> str | None:
    """A one-line explanation of an ORT training failure on an op it cannot differentiate, or None."""
    declined = declined or {}
    for pattern, what in ((_NO_GRADIENT, "has no gradient for"), (_NO_KERNEL, "has no CPU gradient kernel for"),
                          (_WRONG_FORM, "cannot differentiate this form of")):
        match = pattern.search(message)
        if match:
            op, node = match.group(1), match.group(2)
            reason = declined.get(node)
            why = f"; qgraph could not rewrite it: {reason}" if reason else \
                f"; qgraph rewrites {', '.join(sorted(_REWRITES))} into ops it can train"
            if op == "DynamicQuantizeLSTM":   # kept by ptq (dequantize_dynamic keep_lstm), made float by qat
                why = "; prepare the model with --pipeline qat, whose dequantize_dynamic makes it a float LSTM"
            return (f"node {node} ({op}) lies between a trained parameter and the loss, and ONNX Runtime 1.19 "
                    f"training {what} {op}{why}")
    return None


# --- building blocks --------------------------------------------------------------------------

class _Context:
    """What the rewrites ask of the model: static dimensions and constant values."""

    def __init__(self, model: onnx.ModelProto):
        self.dims = dims_map(model)
        self.constant = constant_tensors(model)
        self.values = {t.name: t for t in model.graph.initializer}

    def value(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.values[name]) if name in self.values else None

    def static_dims(self, name: str) -> list[int | None] | None:
        return self.dims.get(name)


class _Emitter:
    """Collects the nodes and constants replacing one node, under names derived from its output."""

    def __init__(self, node: onnx.NodeProto):
        self.prefix = f"{node.output[0]}{_SUFFIX}"
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, key: str, value) -> str:
        name = f"{self.prefix}_{key}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | str | None = None, *, count: int = 1,
           domain: str = "", **attrs) -> str | list[str]:
        index = len(self.nodes)
        if outputs is None:
            outputs = [f"{self.prefix}_{index}_{op_type}_{k}" for k in range(count)]
        names = [outputs] if isinstance(outputs, str) else list(outputs)
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{self.prefix}_{index}_{op_type}",
                                           domain=domain, **attrs))
        return names[0] if len(names) == 1 else names


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


# --- activations --------------------------------------------------------------------------

def _hard_sigmoid(node, emit: _Emitter, context) -> None:
    alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
    _hard_sigmoid_nodes(emit, node.input[0], node.output[0], alpha, beta)


def _hard_sigmoid_nodes(emit: _Emitter, x: str, y: str, alpha: float, beta: float) -> str:
    scaled = emit.op("Mul", [x, emit.const("alpha", np.float32(alpha))])
    shifted = emit.op("Add", [scaled, emit.const("beta", np.float32(beta))])
    return emit.op("Clip", [shifted, emit.const("zero", np.float32(0)), emit.const("one", np.float32(1))], y)


def _hard_swish(node, emit: _Emitter, context) -> None:
    gate = _hard_sigmoid_nodes(emit, node.input[0], f"{emit.prefix}_gate", 1.0 / 6.0, 0.5)
    emit.op("Mul", [node.input[0], gate], node.output[0])


def _prelu(node, emit: _Emitter, context) -> None:
    x, slope = node.input[:2]
    negative = emit.op("Min", [x, emit.const("zero", np.float32(0))])
    emit.op("Add", [emit.op("Relu", [x]), emit.op("Mul", [slope, negative])], node.output[0])


def _softplus(node, emit: _Emitter, context) -> None:
    x = node.input[0]
    tail = emit.op("Exp", [emit.op("Neg", [emit.op("Abs", [x])])])
    log = emit.op("Log", [emit.op("Add", [tail, emit.const("one", np.float32(1))])])
    emit.op("Add", [emit.op("Relu", [x]), log], node.output[0])


def _elu(node, emit: _Emitter, context) -> None:
    x, alpha = node.input[0], _attr(node, "alpha", 1.0)
    negative = emit.op("Exp", [emit.op("Min", [x, emit.const("zero", np.float32(0))])])
    shifted = emit.op("Sub", [negative, emit.const("one", np.float32(1))])
    emit.op("Add", [emit.op("Relu", [x]), emit.op("Mul", [shifted, emit.const("alpha", np.float32(alpha))])],
            node.output[0])


def _sum(node, emit: _Emitter, context) -> None:
    inputs = [name for name in node.input if name]
    if len(inputs) == 1:
        emit.op("Identity", inputs, node.output[0])
        return
    total = inputs[0]
    for i, name in enumerate(inputs[1:]):
        total = emit.op("Add", [total, name], node.output[0] if i == len(inputs) - 2 else None)


def _layer_norm(node, emit: _Emitter, context) -> None:
    if len([o for o in node.output if o]) >= 3:
        raise Declined("it already has its Mean and InvStdDev outputs")
    outputs = list(node.output) + [""] * (3 - len(node.output))
    outputs[1] = outputs[1] or f"{emit.prefix}_mean"
    outputs[2] = outputs[2] or f"{emit.prefix}_inv_std_dev"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    emit.op("LayerNormalization", list(node.input), outputs, **attrs)


# --- Resize ---------------------------------------------------------------------------------

def _resize(node, emit: _Emitter, context: _Context) -> None:
    x = node.input[0]
    mode = _attr(node, "mode", "nearest")
    transform = _attr(node, "coordinate_transformation_mode", "half_pixel")
    if transform == "tf_crop_and_resize":
        raise Declined("tf_crop_and_resize reads a region of interest; only whole-tensor resizes are rewritten")
    dims = context.static_dims(x)
    if dims is None:
        raise Declined(f"the rank of its input {x} is unknown; run shape inference (canonicalize) first")
    scales = context.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = context.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if scales is not None and scales.size:
        factors = [float(s) for s in scales.reshape(-1)]
        out_dims = [None if d is None else int(np.floor(d * f)) for d, f in zip(dims, factors)]
    elif sizes is not None and sizes.size:
        out_dims = [int(s) for s in sizes.reshape(-1)]
        if any(d is None for d, o in zip(dims, out_dims) if o != d):
            raise Declined("its output sizes are given for an input whose resized dimensions are not static")
        factors = [o / d for d, o in zip(dims, out_dims)]
    else:
        raise Declined("its scales and sizes are not constants")
    if len(factors) != len(dims):
        raise Declined(f"{len(factors)} scales for an input of rank {len(dims)}")
    axes = [a for a, f in enumerate(factors) if f != 1.0]
    if not axes:
        emit.op("Identity", [x], node.output[0])
        return
    attrs = (mode, transform, _attr(node, "nearest_mode", "round_prefer_floor"),
             float(_attr(node, "cubic_coeff_a", -0.75)), int(_attr(node, "exclude_outside", 0)))
    integral = all(float(factors[a]).is_integer() and factors[a] >= 1 for a in axes)
    if mode == "nearest" and integral and all(_repeats(attrs, int(factors[a])) for a in axes):
        _resize_by_repeat(emit, x, node.output[0], len(dims), {a: int(factors[a]) for a in axes})
        return
    if any(dims[a] is None for a in axes):
        raise Declined(f"{mode} resize of dimensions that are not static (only nearest resizes by integer "
                       "factors are rewritten for dynamic sizes); export the model with a static input size")
    use_sizes = scales is None or not scales.size
    taps = {a: _resize_taps(attrs, dims[a], out_dims[a] if use_sizes else factors[a], use_sizes) for a in axes}
    _resize_by_taps(emit, x, node.output[0], len(dims), taps)


def _resize_by_repeat(emit: _Emitter, x: str, y: str, rank: int, factors: dict[int, int]) -> None:
    axes = sorted(factors)
    inserted = [a + 1 + j for j, a in enumerate(axes)]
    ones = np.ones([factors[axes[inserted.index(i)]] if i in inserted else 1 for i in range(rank + len(axes))],
                   np.float32)
    spread = emit.op("Mul", [emit.op("Unsqueeze", [x, emit.const("axes", np.array(inserted, np.int64))]),
                             emit.const("ones", ones)])
    multiplier = np.array([factors.get(a, 1) for a in range(rank)], np.int64)
    shape = emit.op("Mul", [emit.op("Shape", [x]), emit.const("factors", multiplier)])
    emit.op("Reshape", [spread, shape], y)


def _resize_by_taps(emit: _Emitter, x: str, y: str, rank: int, taps: dict) -> None:
    current = x
    axes = sorted(taps)
    for n, axis in enumerate(axes):
        index, weight = taps[axis]
        last = n == len(axes) - 1
        target = y if last else None
        trailing = [1] * (rank - 1 - axis)
        if index.shape[1] == 1 and np.all(weight == 1.0):
            current = emit.op("Gather", [current, emit.const(f"index{axis}", index[:, 0])], target, axis=axis)
            continue
        parts = []
        for k in range(index.shape[1]):
            picked = emit.op("Gather", [current, emit.const(f"index{axis}_{k}", index[:, k])], axis=axis)
            w = weight[:, k].astype(np.float32).reshape([-1, *trailing])
            parts.append(emit.op("Mul", [picked, emit.const(f"weight{axis}_{k}", w)]))
        total = parts[0]
        for k, part in enumerate(parts[1:]):
            total = emit.op("Add", [total, part], target if k == len(parts) - 2 else None)
        if len(parts) == 1:
            total = emit.op("Identity", [total], target) if last else total
        current = total


@lru_cache(maxsize=None)
def _repeats(attrs: tuple, factor: int) -> bool:
    """Whether a nearest Resize with these attributes repeats every element `factor` times (ORT run)."""
    for length in (1, 2, 5, 8):
        probe = np.arange(length, dtype=np.float32).reshape(1, 1, length, 1)
        out = _run_resize(attrs, probe, np.array([1, 1, factor, 1], np.float32), None)
        if out.shape != (1, 1, length * factor, 1) or not np.array_equal(out, np.repeat(probe, factor, axis=2)):
            return False
    return True


@lru_cache(maxsize=None)
def _resize_taps(attrs: tuple, length: int, target, by_size: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights) [out, K] of a 1-D resize of `length` elements, from ORT resizing a one-hot
    batch: sample n has a one at position n, so output o of sample n is the weight of input n."""
    probe = np.eye(length, dtype=np.float32).reshape(length, 1, length, 1)
    if by_size:
        out = _run_resize(attrs, probe, None, np.array([length, 1, int(target), 1], np.int64))
    else:
        out = _run_resize(attrs, probe, np.array([1, 1, float(target), 1], np.float32), None)
    matrix = out[:, 0, :, 0].T.astype(np.float64)            # [out, in]
    width = max(1, int((matrix != 0).sum(axis=1).max()))
    index = np.zeros((matrix.shape[0], width), np.int64)
    weight = np.zeros((matrix.shape[0], width), np.float32)
    for o, row in enumerate(matrix):
        nonzero = np.flatnonzero(row)
        index[o, :len(nonzero)] = nonzero
        weight[o, :len(nonzero)] = row[nonzero]
    return index, weight


def _run_resize(attrs: tuple, probe: np.ndarray, scales, sizes) -> np.ndarray:
    from qgraph.runner import run_model
    mode, transform, nearest, cubic, exclude = attrs
    inits = [numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    inputs = ["x", "roi"]
    if scales is not None:
        inits.append(numpy_helper.from_array(scales, "scales"))
        inputs.append("scales")
    else:
        inits.append(numpy_helper.from_array(sizes, "sizes"))
        inputs += ["", "sizes"]
    node = helper.make_node("Resize", inputs, ["y"], mode=mode, coordinate_transformation_mode=transform,
                            nearest_mode=nearest, cubic_coeff_a=cubic, exclude_outside=exclude)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             list(probe.shape))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return run_model(model, {"x": probe}, ["y"], optimize=False)["y"]


# --- ConvTranspose ------------------------------------------------------------------------------

def _conv_transpose(node, emit: _Emitter, context: _Context) -> None:
    x, w = node.input[:2]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if _attr(node, "output_shape") is not None:
        raise Declined("its output_shape attribute is not rewritten; give pads and output_padding instead")
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise Declined(f"auto_pad {_attr(node, 'auto_pad')} is not rewritten; give explicit pads")
    w_dims = context.static_dims(w)
    if not w_dims or any(d is None for d in w_dims):
        raise Declined(f"the shape of its weight {w} is unknown")
    spatial = len(w_dims) - 2
    kernel = list(_attr(node, "kernel_shape", w_dims[2:]))
    strides = list(_attr(node, "strides", [1] * spatial))
    dilations = list(_attr(node, "dilations", [1] * spatial))
    pads = list(_attr(node, "pads", [0] * 2 * spatial))
    extra = list(_attr(node, "output_padding", [0] * spatial))
    group = int(_attr(node, "group", 1))
    begins = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:spatial])]
    ends = [d * (k - 1) - p + e for d, k, p, e in zip(dilations, kernel, pads[spatial:], extra)]
    if min(begins + ends) < 0:
        raise Declined("pads larger than the dilated kernel are not rewritten")
    stuffed = _zero_stuff(emit, x, strides) if any(s > 1 for s in strides) else x
    c_in, c_out_g = w_dims[0], w_dims[1]
    if group == 1:
        swapped = emit.op("Transpose", [w], perm=[1, 0, *range(2, 2 + spatial)])
    else:
        grouped = emit.op("Reshape", [w, emit.const("grouped", np.array([group, c_in // group, c_out_g, *kernel],
                                                                      np.int64))])
        turned = emit.op("Transpose", [grouped], perm=[0, 2, 1, *range(3, 3 + spatial)])
        swapped = emit.op("Reshape", [turned, emit.const("swapped", np.array([group * c_out_g, c_in // group,
                                                                              *kernel], np.int64))])
    flipped = swapped
    for axis, size in enumerate(kernel):
        flipped = emit.op("Gather", [flipped, emit.const(f"flip{axis}", np.arange(size - 1, -1, -1, dtype=np.int64))],
                          axis=2 + axis)
    inputs = [stuffed, flipped] + ([bias] if bias else [])
    emit.op("Conv", inputs, node.output[0], dilations=dilations, group=group, pads=begins + ends,
            strides=[1] * spatial, kernel_shape=kernel)


def _zero_stuff(emit: _Emitter, x: str, strides: list[int]) -> str:
    """x with s - 1 zeros between neighbours along each spatial axis: [.., (L - 1)·s + 1, ..]."""
    spatial = len(strides)
    inserted = [2 + 2 * i + 1 for i in range(spatial)]
    grown = emit.op("Unsqueeze", [x, emit.const("stuff_axes", np.array(inserted, np.int64))])
    pads = [0] * (2 + 2 * spatial) * 2
    for i, s in enumerate(strides):
        pads[(2 + 2 * spatial) + inserted[i]] = s - 1
    padded = emit.op("Pad", [grown, emit.const("stuff_pads", np.array(pads, np.int64))])
    shape = emit.op("Mul", [emit.op("Shape", [x]), emit.const("stuff_factors", np.array([1, 1, *strides], np.int64))])
    merged = emit.op("Reshape", [padded, shape])
    axes = [2 + i for i, s in enumerate(strides) if s > 1]
    ends = [-(strides[a - 2] - 1) for a in axes]
    return emit.op("Slice", [merged, emit.const("stuff_starts", np.zeros(len(axes), np.int64)),
                             emit.const("stuff_ends", np.array(ends, np.int64)),
                             emit.const("stuff_slice_axes", np.array(axes, np.int64))])


# --- AveragePool ---------------------------------------------------------------------------------

def _average_pool(node, emit: _Emitter, context: _Context) -> None:
    """A depthwise Conv with weights 1/|window| (and, for windows cut by padding that do not count
    it, a division by the number of elements each window covers)."""
    x = node.input[0]
    dims = context.static_dims(x)
    if dims is None or len(dims) < 3 or dims[1] is None:
        raise Declined(f"the channel count of its input {x} is unknown")
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise Declined(f"auto_pad {_attr(node, 'auto_pad')} is not rewritten; give explicit pads")
    kernel = list(_attr(node, "kernel_shape"))
    spatial = len(kernel)
    strides = list(_attr(node, "strides", [1] * spatial))
    pads = list(_attr(node, "pads", [0] * 2 * spatial))
    dilations = list(_attr(node, "dilations", [1] * spatial))
    sizes = dims[2:]
    counting = any(pads) and not _attr(node, "count_include_pad", 0)
    if (counting or _attr(node, "ceil_mode", 0)) and any(d is None for d in sizes):
        raise Declined("its window counts depend on the input size, which is not static")
    outputs = [None if d is None else (d + pads[i] + pads[spatial + i] - dilations[i] * (kernel[i] - 1) - 1)
               // strides[i] + 1 for i, d in enumerate(sizes)]
    if _attr(node, "ceil_mode", 0):
        ceiled = [-(-(d + pads[i] + pads[spatial + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i]) + 1
                  for i, d in enumerate(sizes)]
        if ceiled != outputs:
            raise Declined("ceil_mode adds a partial window at the end; only ceil_mode pools without one are "
                           "rewritten")
    channels = dims[1]
    area = float(np.prod(kernel))
    weight = np.full([channels, 1, *kernel], 1.0 if counting else 1.0 / area, np.float32)
    attrs = dict(group=channels, kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations)
    if not counting:
        emit.op("Conv", [x, emit.const("weight", weight)], node.output[0], **attrs)
        return
    counts = np.ones([1] * 2, np.float64)
    for i, (size, out) in enumerate(zip(sizes, outputs)):
        starts = np.arange(out) * strides[i] - pads[i]
        taps = starts[:, None] + np.arange(kernel[i])[None, :] * dilations[i]
        counts = np.multiply.outer(counts.reshape(-1), ((taps >= 0) & (taps < size)).sum(axis=1))
    counts = counts.reshape([1, 1, *outputs]).astype(np.float32)
    summed = emit.op("Conv", [x, emit.const("weight", weight)], **attrs)
    emit.op("Div", [summed, emit.const("counts", counts)], node.output[0])


def _global_max_pool(node, emit: _Emitter, context: _Context) -> None:
    """A MaxPool whose window is the whole map (MaxPool trains; its window needs static sizes)."""
    dims = context.static_dims(node.input[0])
    if dims is None or len(dims) < 3 or any(d is None for d in dims[2:]):
        raise Declined(f"the spatial sizes of its input {node.input[0]} are not static")
    emit.op("MaxPool", [node.input[0]], node.output[0], kernel_shape=[int(d) for d in dims[2:]])


def _reduce_max(node, emit: _Emitter, context: _Context) -> None:
    """TopK(k=1) along each reduced axis in turn (TopK trains), then a Squeeze of them for
    keepdims=0 — the maximum, and its gradient to the element that holds it."""
    dims = context.static_dims(node.input[0])
    if len(node.input) > 1 or dims is None:
        raise Declined("its axes come as an input or its input's rank is unknown")
    rank = len(dims)
    axes = sorted({int(a) % rank for a in (_attr(node, "axes") or range(rank))})
    value, one = node.input[0], emit.const("k", np.array([1], np.int64))
    for axis in axes:
        value = emit.op("TopK", [value, one], count=2, axis=axis)[0]
    if _attr(node, "keepdims", 1):
        emit.op("Identity", [value], node.output[0])
    else:
        emit.op("Squeeze", [value, emit.const("axes", np.array(axes, np.int64))], node.output[0])


# --- recurrent layers -------------------------------------------------------------------------

_RNN_INPUTS = {"LSTM": 8, "GRU": 6}          # X, W, R, B, sequence_lens, initial_h[, initial_c, P]
_RNN_TRAINING_OUTPUTS = {"LSTM": 5, "GRU": 3}
_RNN_STATES = {"LSTM": (1, 2), "GRU": (1,)}    # outputs with a leading num_directions axis
_RNN_DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh")}
_RNN_ATTRIBUTES = {"LSTM": ("hidden_size",), "GRU": ("hidden_size", "linear_before_reset")}   # the rest: defaults
_RNN_PER_DIRECTION = {"LSTM": (1, 2, 3, 5, 6, 7), "GRU": (1, 2, 3, 5)}   # W, R, B, h0, c0, P


def _recurrent(node, emit: _Emitter, context: _Context) -> None:
    op = node.op_type
    activations = _attr(node, "activations")
    directions = 2 if _attr(node, "direction", "forward") == "bidirectional" else 1
    if activations is not None and [a.decode().lower() if isinstance(a, bytes) else a.lower()
                                    for a in activations] != list(_RNN_DEFAULT_ACTIVATIONS[op]) * directions:
        raise Declined(f"activations {activations} (ONNX Runtime's {op}Training runs only the default ones)")
    for name in ("activation_alpha", "activation_beta", "clip"):
        if _attr(node, name) is not None:
            raise Declined(f"its {name} attribute is not supported by ONNX Runtime's {op}Training")
    if _attr(node, "input_forget", 0) or _attr(node, "layout", 0):
        raise Declined("input_forget and layout=1 are not supported by ONNX Runtime's training kernels")
    direction = _attr(node, "direction", "forward")
    inputs = list(node.input) + [""] * (_RNN_INPUTS[op] - len(node.input))
    if direction != "forward" and inputs[4]:
        raise Declined(f"a {direction} {op} with sequence_lens (only forward runs are trainable in ONNX Runtime, "
                       "and reversing padded sequences needs their lengths)")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in _RNN_ATTRIBUTES[op]}
    outputs = list(node.output) + [""] * (len(_RNN_STATES[op]) + 1 - len(node.output))
    if direction == "forward":
        _training_run(emit, op, inputs, outputs, attrs, "f")
        return
    if direction == "reverse":
        _reversed_run(emit, op, inputs, outputs, attrs, "r")
        return
    halves = []
    for d, tag in ((0, "f"), (1, "b")):
        part = list(inputs)
        index = emit.const(f"dir{d}", np.array([d], np.int64))
        for i in _RNN_PER_DIRECTION[op]:
            if part[i]:
                part[i] = emit.op("Gather", [part[i], index], axis=0)
        part_outputs = [f"{emit.prefix}_{tag}{k}" for k in range(len(outputs))]
        (_training_run if d == 0 else _reversed_run)(emit, op, part, part_outputs, attrs, tag)
        halves.append(part_outputs)
    for k, name in enumerate(outputs):
        if name:
            emit.op("Concat", [halves[0][k], halves[1][k]], name, axis=1 if k == 0 else 0)


def _training_run(emit: _Emitter, op: str, inputs: list[str], outputs: list[str], attrs: dict, tag: str) -> None:
    names = [name or f"{emit.prefix}_{tag}_out{k}" for k, name in enumerate(outputs)]
    names += [f"{emit.prefix}_{tag}_state{k}" for k in range(len(names), _RNN_TRAINING_OUTPUTS[op])]
    emit.op(f"{op}Training", inputs, names, domain=MS_DOMAIN, direction="forward", **attrs)


def _reversed_run(emit: _Emitter, op: str, inputs: list[str], outputs: list[str], attrs: dict, tag: str) -> None:
    """A reverse-direction layer: the forward layer on the sequence reversed in time, and its
    all-steps output reversed back (states after the last step are the reverse run's final ones)."""
    x = inputs[0]
    length = emit.op("Gather", [emit.op("Shape", [x]), emit.const(f"{tag}_zero", np.array(0, np.int64))], axis=0)
    last = emit.op("Sub", [length, emit.const(f"{tag}_one", np.array(1, np.int64))])
    order = emit.op("Range", [last, emit.const(f"{tag}_stop", np.array(-1, np.int64)),
                              emit.const(f"{tag}_step", np.array(-1, np.int64))])
    flipped = emit.op("Gather", [x, order], axis=0)
    run_outputs = [f"{emit.prefix}_{tag}_reversed_y"] + list(outputs[1:])
    _training_run(emit, op, [flipped, *inputs[1:]], run_outputs, attrs, tag)
    if outputs[0]:
        emit.op("Gather", [run_outputs[0], order], outputs[0], axis=0)


_REWRITES = {
    "HardSigmoid": _hard_sigmoid, "HardSwish": _hard_swish, "PRelu": _prelu, "Softplus": _softplus, "Elu": _elu,
    "Sum": _sum, "LayerNormalization": _layer_norm, "Resize": _resize, "ConvTranspose": _conv_transpose,
    "LSTM": _recurrent, "GRU": _recurrent, "AveragePool": _average_pool, "GlobalMaxPool": _global_max_pool,
    "ReduceMax": _reduce_max,
}


def _to_b64(message) -> str:
    import base64
    return base64.b64encode(message.SerializeToString()).decode("ascii")


def _from_b64(blob: str) -> onnx.NodeProto:
    import base64
    node = onnx.NodeProto()
    node.ParseFromString(base64.b64decode(blob))
    return node
