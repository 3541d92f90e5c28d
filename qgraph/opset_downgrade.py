"""Models of opsets 18-21 brought down to qgraph's working opset (17).

torch.onnx's dynamo exporter writes opset 18 and later; onnx's version converter has no down
adapter for several of their ops (Split 18, Constant 19, ...) and drops a reduction's `axes` when
they come from an initializer. Most changes since opset 17 widen type lists and keep the float32
semantics; those nodes are relabelled. The rest are rewritten into their opset-17 form:

- ReduceMean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare (18): a constant `axes` input becomes
  the attribute (empty with noop_with_empty_axes=1: an Identity);
- Split with `num_outputs` (18): an equal split by output count, or explicit sizes when the axis
  does not divide (the last part smaller, as opset 18 defines);
- Pad with `axes` (18): pads spread over every axis (rank from shape inference);
- Resize (18-19): only the default antialias / keep_aspect_ratio_policy and all-axes scales or
  sizes have an opset-17 form;
- Gelu (20) as torch writes it, ``x · 0.5 · (1 + erf(x / √2))`` (or the tanh form), Mish (18) as
  ``x · tanh(softplus(x))``, GroupNormalization (18, 21) as InstanceNormalization over the groups
  and the per-channel affine; GridSample (20) renames its linear/cubic modes;
- Cast/CastLike's `saturate` (19, float8 only) and Q/DQ's defaults (19, 21) drop out;
  AveragePool/LpPool dilations and ceil_mode (18-19) are kept only at their defaults.

Anything else (new ops, block quantization, wrap padding, scatter max/min, ...) raises
ModelError naming the op and asking for an opset-17 export. Invariant: outputs unchanged up to
float rounding (Gelu and Mish become several ops)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qgraph.errors import ModelError
from qgraph.graph import free_name
from qgraph.model_io import OPSET as TARGET

_REDUCTIONS = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSumSquare"}
#: Ops new since opset 17 (onnx 1.17's schemas) with no opset-17 form.
_NO_FORM = {"AffineGrid", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad", "Col2Im",
            "DFT", "DeformConv", "ImageDecoder", "OptionalGetElement", "OptionalHasElement", "RegexFullMatch",
            "StringConcat", "StringSplit"}


def downgrade(model: onnx.ModelProto, origin: str = "model") -> onnx.ModelProto:
    """`model` (ai.onnx opset 18-21) at opset 17; ModelError for what has no opset-17 form."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:   # ranks and static dims then come only from what the file declares
        inferred = model
    shapes = _shapes(inferred.graph)
    _downgrade_graph(model.graph, shapes, origin)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = TARGET
    return model


def _shapes(graph) -> dict[str, list]:
    out = {}
    for info in (*graph.input, *graph.output, *graph.value_info):
        t = info.type.tensor_type
        if t.HasField("shape"):
            out[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in graph.initializer:
        out[init.name] = list(init.dims)
    return out


class _Graph:
    """What the rewrites need of one (sub)graph: constant values, fresh names, new initializers."""

    def __init__(self, graph, shapes, origin, outer: dict | None = None):
        self.graph, self.shapes, self.origin = graph, shapes, origin
        # a body (If, Loop) reads the enclosing graphs' constants by name too
        self.values = {**(outer or {}), **{t.name: numpy_helper.to_array(t) for t in graph.initializer}}
        for node in graph.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        self.values[node.output[0]] = numpy_helper.to_array(a.t)
        self.names = {t for n in graph.node for t in (*n.input, *n.output)} | set(self.values)

    def fresh(self, base: str) -> str:
        name = free_name(base, self.names)
        self.names.add(name)
        return name

    def constant(self, base: str, value) -> str:
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.values[name] = np.asarray(value)
        return name

    def value(self, node, index: int, what: str):
        name = node.input[index] if len(node.input) > index else ""
        if not name:
            return None
        if name not in self.values:
            raise self.refuse(node, f"its {what} '{name}' is computed at run time")
        return self.values[name]

    def rank(self, name: str, node) -> int:
        shape = self.shapes.get(name)
        if shape is None:
            raise self.refuse(node, f"the rank of '{name}' is unknown")
        return len(shape)

    def refuse(self, node, why: str) -> ModelError:
        return ModelError(f"{self.origin}: {node.op_type} node '{_label(node)}' has no opset-{TARGET} "
                          f"form ({why}); export the model at opset {TARGET}")


def _downgrade_graph(graph, shapes, origin, outer: dict | None = None) -> None:
    g = _Graph(graph, shapes, origin, outer)
    nodes = []
    for node in graph.node:
        for attr in node.attribute:          # If/Loop/Scan bodies
            if attr.type == onnx.AttributeProto.GRAPH:
                _downgrade_graph(attr.g, shapes, origin, g.values)
            for sub in attr.graphs:
                _downgrade_graph(sub, shapes, origin, g.values)
        ours = node.domain in ("", "ai.onnx")
        if ours and node.op_type in _NO_FORM:
            raise g.refuse(node, "the op is newer than opset 17")
        rewrite = _REWRITES.get(node.op_type) if ours else None
        nodes.extend(rewrite(g, node) if rewrite else [node])   # the rest only widened type lists: relabelled
    del graph.node[:]
    graph.node.extend(nodes)


def _attr(node, name, default=None):
    """The attribute's value (strings decoded), or `default`."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _label(node) -> str:
    return node.name or node.output[0]


def _drop(node, *names) -> None:
    kept = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(kept)


def _set(node, name, value) -> None:
    _drop(node, name)
    node.attribute.append(helper.make_attribute(name, value))


def _reduction(g: _Graph, node):
    axes = g.value(node, 1, "axes")
    noop = _attr(node, "noop_with_empty_axes", 0)
    _drop(node, "noop_with_empty_axes")
    del node.input[1:]
    if axes is not None and axes.size:
        _set(node, "axes", [int(a) for a in axes.reshape(-1)])
    elif noop:
        return [helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)]
    return [node]


def _split(g: _Graph, node):
    count = _attr(node, "num_outputs")
    if count is None:
        return [node]
    _drop(node, "num_outputs")
    axis = _attr(node, "axis", 0)
    shape = g.shapes.get(node.input[0])
    dim = None if shape is None else shape[axis]
    if dim is None or dim % count == 0:
        return [node]                          # opset 13-17: equal parts, one per output
    part = -(-dim // count)
    sizes = [part] * (count - 1) + [dim - part * (count - 1)]
    node.input.append(g.constant(f"{_label(node)}_split", np.array(sizes, np.int64)))
    return [node]


def _pad(g: _Graph, node):
    if _attr(node, "mode", "constant") == "wrap":
        raise g.refuse(node, "mode 'wrap'")
    axes = g.value(node, 3, "axes")
    if axes is None:
        return [node]
    pads = g.value(node, 1, "pads").reshape(-1)
    rank = g.rank(node.input[0], node)
    full = np.zeros(2 * rank, np.int64)
    for k, axis in enumerate(int(a) % rank for a in axes.reshape(-1)):
        full[axis], full[rank + axis] = pads[k], pads[len(axes.reshape(-1)) + k]
    inputs = [node.input[0], g.constant(f"{_label(node)}_pads", full)]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(node.input[2])
    del node.input[:]
    node.input.extend(inputs)
    return [node]


def _resize(g: _Graph, node):
    if _attr(node, "antialias", 0):
        raise g.refuse(node, "antialias=1")
    if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise g.refuse(node, "keep_aspect_ratio_policy other than 'stretch'")
    if _attr(node, "coordinate_transformation_mode", "half_pixel") == "half_pixel_symmetric":
        raise g.refuse(node, "coordinate_transformation_mode 'half_pixel_symmetric'")
    axes = _attr(node, "axes")
    if axes is not None and list(axes) != list(range(g.rank(node.input[0], node))):
        raise g.refuse(node, "scales or sizes for some axes only")
    _drop(node, "antialias", "keep_aspect_ratio_policy", "axes")
    return [node]


def _scatter(g: _Graph, node):
    if _attr(node, "reduction", "none") in ("max", "min"):
        raise g.refuse(node, "reduction 'max'/'min'")
    return [node]


def _pool(g: _Graph, node):
    if any(d != 1 for d in _attr(node, "dilations", [])):
        raise g.refuse(node, "dilations")
    _drop(node, "dilations")
    if node.op_type == "LpPool" and _attr(node, "ceil_mode", 0):
        raise g.refuse(node, "ceil_mode")
    _drop(node, *(["ceil_mode"] if node.op_type == "LpPool" else []))
    return [node]


def _quantizer(g: _Graph, node):
    if _attr(node, "block_size", 0):
        raise g.refuse(node, "blocked quantization")
    if _attr(node, "output_dtype", 0):
        raise g.refuse(node, "output_dtype")
    _drop(node, "saturate", "block_size", "output_dtype")
    return [node]


def _cast(g: _Graph, node):
    _drop(node, "saturate")
    return [node]


def _grid_sample(g: _Graph, node):
    mode = _attr(node, "mode", "linear")
    if g.rank(node.input[0], node) != 4:
        raise g.refuse(node, "a grid of more than 2 spatial axes")
    _set(node, "mode", {"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode))
    return [node]


def _gelu(g: _Graph, node):
    x, y, base = node.input[0], node.output[0], _label(node)
    approximate = _attr(node, "approximate", "none")
    t = [g.fresh(f"{base}/{k}") for k in ("a", "b", "c", "d", "e", "f")]
    if approximate == "tanh":     # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        return [helper.make_node("Mul", [x, x], [t[0]]), helper.make_node("Mul", [t[0], x], [t[1]]),
                helper.make_node("Mul", [t[1], g.constant(f"{base}/k", np.float32(0.044715))], [t[2]]),
                helper.make_node("Add", [x, t[2]], [t[3]]),
                helper.make_node("Mul", [t[3], g.constant(f"{base}/s", np.float32(math.sqrt(2 / math.pi)))], [t[4]]),
                helper.make_node("Tanh", [t[4]], [t[5]]),
                *_half_x_one_plus(g, base, x, t[5], y)]
    return [helper.make_node("Div", [x, g.constant(f"{base}/sqrt2", np.float32(math.sqrt(2)))], [t[0]]),
            helper.make_node("Erf", [t[0]], [t[1]]), *_half_x_one_plus(g, base, x, t[1], y)]


def _half_x_one_plus(g: _Graph, base: str, x: str, v: str, y: str):
    """``x · (1 + v) · 0.5``, torch.onnx's order for GELU."""
    plus, times = g.fresh(f"{base}/plus"), g.fresh(f"{base}/times")
    return [helper.make_node("Add", [v, g.constant(f"{base}/one", np.float32(1))], [plus]),
            helper.make_node("Mul", [x, plus], [times]),
            helper.make_node("Mul", [times, g.constant(f"{base}/half", np.float32(0.5))], [y])]


def _group_norm(g: _Graph, node):
    """GroupNormalization (18: γ, β per group; 21: per channel) as torch.onnx wrote it before
    opset 18: InstanceNormalization over ``x`` reshaped to (N, G, -1), reshaped back, then the
    per-channel γ and β."""
    groups = int(_attr(node, "num_groups"))
    x, y, base = node.input[0], node.output[0], _label(node)
    shape = g.shapes.get(x)
    if shape is None or len(shape) < 3 or shape[1] is None:
        raise g.refuse(node, "its input's channel count is unknown")
    channels, rank = shape[1], len(shape)
    gamma, beta = (g.value(node, k, what).reshape(-1) for k, what in ((1, "scale"), (2, "bias")))
    if gamma.size == groups and groups != channels:                  # opset 18: one value per group
        gamma, beta = (np.repeat(v, channels // groups) for v in (gamma, beta))
    per_channel = (channels,) + (1,) * (rank - 2)
    names = [g.fresh(f"{base}/{k}") for k in ("shape", "grouped", "normed", "back", "scaled")]
    return [helper.make_node("Shape", [x], [names[0]]),
            helper.make_node("Reshape", [x, g.constant(f"{base}/groups", np.array([0, groups, -1], np.int64))],
                             [names[1]]),
            helper.make_node("InstanceNormalization",
                             [names[1], g.constant(f"{base}/ones", np.ones(groups, np.float32)),
                              g.constant(f"{base}/zeros", np.zeros(groups, np.float32))], [names[2]],
                             epsilon=float(_attr(node, "epsilon", 1e-5))),
            helper.make_node("Reshape", [names[2], names[0]], [names[3]]),
            helper.make_node("Mul", [names[3], g.constant(f"{base}/gamma",
                                                          gamma.astype(np.float32).reshape(per_channel))], [names[4]]),
            helper.make_node("Add", [names[4], g.constant(f"{base}/beta",
                                                          beta.astype(np.float32).reshape(per_channel))], [y])]


def _mish(g: _Graph, node):
    x, y, base = node.input[0], node.output[0], _label(node)
    soft, tanh = g.fresh(f"{base}/softplus"), g.fresh(f"{base}/tanh")
    return [helper.make_node("Softplus", [x], [soft]), helper.make_node("Tanh", [soft], [tanh]),
            helper.make_node("Mul", [x, tanh], [y])]


_REWRITES = {"Split": _split, "Pad": _pad, "Resize": _resize, "ScatterElements": _scatter, "ScatterND": _scatter,
             "AveragePool": _pool, "LpPool": _pool, "QuantizeLinear": _quantizer, "DequantizeLinear": _quantizer,
             "Cast": _cast, "CastLike": _cast, "GridSample": _grid_sample, "Gelu": _gelu, "Mish": _mish,
             "GroupNormalization": _group_norm, **{op: _reduction for op in _REDUCTIONS}}
