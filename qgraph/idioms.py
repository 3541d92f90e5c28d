"""Graph idioms: the questions many rewrites ask of an ONNX graph, answered in one place.

In the style of onnxscript's rewriter, an idiom is a *pattern* (what to look for) with a
*check* that says why it does not apply. A check that fails raises `Declined(reason)`; the
code that drives a rewrite catches it and reports ``{"node": name, "reason": reason}``
(`skip`), the one shape every pass report and `-v` use.

- constant-only tensors: initializers, Constant outputs, and outputs of deterministic nodes
  whose inputs are all constant (graph inputs never are: an initializer that is also a graph
  input is only a default the caller may override);
- Constant nodes lifted to initializers under fresh names;
- Clip/Relu bounds for every opset (inputs since opset 11, attributes before);
- the range-preserving ops, one table with the conditions under which each is one;
- tensor ranks, node selection by name or regex, BatchNormalization's scale γ/√(σ²+ε),
  unique node names.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qgraph.errors import ConfigError
from qgraph.graph import QModel


class Declined(Exception):
    """A pattern matched but its check failed: `reason` says why the rewrite does not apply."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def skip(node, reason: str) -> dict:
    """The one shape of a "why not" entry in pass reports: {node, reason}."""
    name = node if isinstance(node, str) else (node.name or node.op)
    return {"node": name, "reason": reason}


# -- constants ---------------------------------------------------------------------------------

#: Ops whose output is not a function of their inputs: never folded, never constant.
NONDETERMINISTIC = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli")


def inputs_behind(model, tensor) -> list[str]:
    """The graph inputs a tensor of a QModel is computed from (an If's condition: which input a
    branch depends on)."""
    names = {i.name for i in model.graph.inputs}
    found, seen, stack = [], set(), [tensor]
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if t.name in names:
            found.append(t.name)
        for producer in t.inputs:
            stack.extend(producer.inputs)
    return sorted(found)


def constant_tensors(model) -> set[str]:
    """Names of the tensors computed from constants alone, for a QModel or a ModelProto
    (one pass in node order: both keep their nodes topologically sorted)."""
    if isinstance(model, onnx.ModelProto):
        graph = model.graph
        inputs = {i.name for i in graph.input}
        constant = {t.name for t in graph.initializer if t.name not in inputs}
        nodes = ((n.op_type, list(n.input), list(n.output)) for n in graph.node)
    else:
        inputs = {t.name for t in model.graph.inputs}
        constant = {name for name, t in model.tensors().items() if isinstance(t, gs.Constant) and name not in inputs}
        nodes = ((n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in model.graph.nodes)
    for op, ins, outs in nodes:
        named = [name for name in ins if name]
        if op == "Constant" or (op not in NONDETERMINISTIC and named and all(name in constant for name in named)):
            constant.update(name for name in outs if name)
    return constant


def lift_constant_nodes(model: QModel) -> int:
    """Constant nodes holding a tensor become initializers (gs.Constant) under fresh names, so
    passes see their values; a Constant that is a graph output stays. Returns how many."""
    lifted = 0
    for node in list(model.graph.nodes):
        if node.op != "Constant" or "value" not in node.attrs or not node.outputs:
            continue
        out = node.outputs[0]
        value = node.attrs["value"]
        values = np.asarray(value.values if isinstance(value, gs.Constant) else value)
        const = gs.Constant(model.fresh_tensor_name(out.name + "_value"), values)
        for consumer in list(out.outputs):
            consumer.inputs = [const if t is out else t for t in consumer.inputs]
        if not model.is_graph_output(out):
            node.outputs.clear()
        lifted += 1
    return lifted


def constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ModelProto form of `lift_constant_nodes`, for code that works on protos (the trainer):
    a copy whose Constant nodes holding a tensor are initializers named like their output
    (output names are unique in a valid graph, so no name can collide)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None
                and node.output[0] not in outputs):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    return out


def evaluate_constants(model: QModel, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Values of constant-only tensors `names`, computed by ONNX Runtime (the kernels that run
    the model) on the subgraph that produces them."""
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    from qgraph.runner import run_model  # ORT import is slow; only evaluation needs it
    graph = model.graph.copy()
    tensors = graph.tensors()
    graph.outputs = [tensors[n] for n in names]
    graph.inputs = []
    graph.cleanup()
    proto = gs.export_onnx(graph, do_type_check=False)
    proto.ir_version = model.ir_version
    proto = onnx.shape_inference.infer_shapes(proto)
    return run_model(proto, {}, names, optimize=False)


# -- Clip and Relu bounds ---------------------------------------------------------------------

CLAMPS = ("Relu", "Clip")


def clip_bounds(node) -> tuple[float, float]:
    """(low, high) of a Relu or Clip, ±inf where unbounded: Clip's optional inputs 1 and 2
    (opset ≥ 11) or its `min`/`max` attributes (opset < 11). Declined when a bound is computed."""
    if node.op == "Relu":
        return 0.0, math.inf
    if node.op != "Clip":
        raise Declined(f"{node.op} '{node.name}' is not a Relu or Clip")
    bounds = []
    for index, attr, default in ((1, "min", -math.inf), (2, "max", math.inf)):
        if len(node.inputs) > index and node.inputs[index].name:
            value = QModel.constant_value(node.inputs[index])
            if value is None:
                raise Declined(f"Clip '{node.name}' {attr} '{node.inputs[index].name}' is not a constant")
            bounds.append(float(np.asarray(value).reshape(-1)[0]))
        elif attr in node.attrs:
            bounds.append(float(node.attrs[attr]))
        else:
            bounds.append(default)
    return bounds[0], bounds[1]


def clip_bounds_or_none(node) -> tuple[float, float] | None:
    try:
        return clip_bounds(node)
    except Declined:
        return None


# -- range-preserving ops ---------------------------------------------------------------------

#: Ops whose output only moves or selects values of their first input, so that for a per-tensor
#: quantizer ``op(DQ(q)) == DQ(op(q))``: they need no quantizer of their own (insert_qdq puts the
#: pair on their input), commute with DequantizeLinear (lowering sinks it below them) and run
#: unchanged on integer tensors (both targets). `range_preserving_reason` checks the per-node
#: conditions: Resize only in nearest mode (linear interpolation makes new values), MaxPool
#: without its indices output, Dropout without its mask, and every other input constant.
#: Split's outputs all keep the input's grid; Gather selects with constant indices.
#: Relu and Clip (CLAMPS) preserve the grid only when their bounds lie on it; insert_qdq and
#: lowering decide that with `clip_bounds`. Before this table, insert_qdq lacked Identity,
#: Dropout and Resize (nearest Resize got a quantizer of its own), the lowering's lists had them.
RANGE_PRESERVING = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                    "Dropout", "Resize", "Slice", "Split", "Gather", "Tile", "Expand")


def range_preserving_reason(node, computed: set[str] = frozenset()) -> str | None:
    """None when `node` is range-preserving (see RANGE_PRESERVING), else why not. Inputs
    besides the data must be constants or shapes computed at run time (names in `computed`)."""
    if node.op not in RANGE_PRESERVING:
        return f"{node.op} is not a range-preserving op"
    if node.op == "Resize" and node.attrs.get("mode", "nearest") != "nearest":
        return f"Resize '{node.name}' interpolates ({node.attrs.get('mode')}); only nearest preserves the grid"
    if node.op == "MaxPool" and len([t for t in node.outputs if t.name]) > 1:
        return f"MaxPool '{node.name}' also outputs indices"
    if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
        return f"Dropout '{node.name}' has its mask output read"
    for t in node.inputs[1:]:
        if t.name and QModel.constant_value(t) is None and t.name not in computed:
            return f"input '{t.name}' of {node.op} '{node.name}' is not constant"
    return None


def is_range_preserving(node, computed: set[str] = frozenset()) -> bool:
    return range_preserving_reason(node, computed) is None


# -- ranks -------------------------------------------------------------------------------------

def rank_map(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor whose rank is known: initializers, and what shape inference finds
    (a model shape inference cannot handle keeps only the ranks it already states)."""
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - ranks are a help; a caller needing one names the tensor
        inferred = model
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            ranks.setdefault(vi.name, len(vi.type.tensor_type.shape.dim))
    return ranks


def dims_map(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Dimensions of every tensor whose rank is known (None where a dimension is symbolic),
    like `rank_map`."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - as in rank_map
        inferred = model
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            dims.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                      for d in vi.type.tensor_type.shape.dim])
    return dims


# -- node selection ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NamePattern:
    """A node-name key: an exact name, and a regular expression matched against the whole
    name (None when the key is not a valid regex: then it is an exact name only)."""
    key: str
    regex: re.Pattern | None

    def matches(self, name: str) -> bool:
        return name == self.key or (self.regex is not None and self.regex.fullmatch(name or "") is not None)


def name_patterns(keys: Iterable[str], where: str, *, strict: bool = False) -> list[NamePattern]:
    """Node-name keys as patterns. `strict`: a key that is not a valid regex is a ConfigError
    (for options documented as regexes); otherwise it selects by exact name only."""
    patterns = []
    for key in keys:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: node names must be non-empty strings, got {key!r}")
        try:
            regex = re.compile(key)
        except re.error as exc:
            if strict:
                raise ConfigError(f"{where}: {key!r} is not a valid regular expression: {exc}") from None
            regex = None
        patterns.append(NamePattern(key, regex))
    return patterns


def first_match(patterns: list[NamePattern], name: str) -> str | None:
    """The key that selects `name`: an exact name wins over a regex, else the first regex."""
    for p in patterns:
        if p.key == name:
            return p.key
    return next((p.key for p in patterns if p.regex is not None and p.regex.fullmatch(name or "")), None)


# -- BatchNormalization -------------------------------------------------------------------------

def bn_scale(gamma, var, eps: float) -> np.ndarray:
    """γ/√(σ²+ε) per channel, in float64: BN is y = (x − μ)·scale + β."""
    gamma = np.asarray(gamma, np.float64).reshape(-1)
    var = np.asarray(var, np.float64).reshape(-1)
    return gamma / np.sqrt(var + float(eps))


# -- layer order ---------------------------------------------------------------------------------

def layer_waves(model: QModel, layers: list[str]) -> list[list[str]]:
    """`layers` (node names) grouped by how many of them lie upstream of each: wave k holds the
    layers with k chosen layers on their longest path from the inputs, so no layer of a wave
    feeds another of it (passes that fix layers in order and re-measure after each wave)."""
    chosen = set(layers)
    depth: dict[str, int] = {}
    waves: dict[int, list[str]] = {}
    for node in model.graph.nodes:   # topological order
        upstream = max((depth.get(t.inputs[0].name, 0) for t in node.inputs if t.inputs), default=0)
        if node.name in chosen:
            waves.setdefault(upstream, []).append(node.name)
            upstream += 1
        depth[node.name] = upstream
    return [waves[k] for k in sorted(waves)]


# -- layers: where the output channels of a weight are ---------------------------------------------

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def out_channels(layer, weight_shape) -> int:
    """Output channels (features) of a Conv/ConvTranspose/Gemm/MatMul with this weight shape."""
    if layer.op == "Conv":
        return int(weight_shape[0])
    if layer.op == "ConvTranspose":
        return int(weight_shape[1]) * int(layer.attrs.get("group", 1))
    if layer.op == "Gemm" and int(layer.attrs.get("transB", 0)):
        return int(weight_shape[0])
    return int(weight_shape[1])


def grouped_view(layer, weight_shape) -> tuple[tuple, tuple]:
    """(weight view shape, scale shape) such that view(W) * scale.reshape(scale shape) scales
    output channels: axis 0 of a Conv weight, axis 1 within each group of a ConvTranspose
    weight (C_in, C_out/g, k…), the feature axis of a Gemm/MatMul weight. Only a grouped
    ConvTranspose needs a view different from W's shape."""
    rank = len(weight_shape)
    if layer.op == "Conv":
        return tuple(weight_shape), (-1,) + (1,) * (rank - 1)
    if layer.op == "ConvTranspose":
        group = int(layer.attrs.get("group", 1))
        c_in, c_out_g, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
        if group == 1:
            return tuple(weight_shape), (1, c_out_g) + (1,) * len(kernel)
        return (group, c_in // group, c_out_g) + kernel, (group, 1, c_out_g) + (1,) * len(kernel)
    if layer.op == "Gemm" and int(layer.attrs.get("transB", 0)):
        return tuple(weight_shape), (-1, 1)
    return tuple(weight_shape), (1, -1)


# -- index computation ------------------------------------------------------------------------------

#: Ops whose output describes a tensor's shape, not its values.
SHAPE_SOURCES = ("Shape", "Size")


def index_tensors(model) -> set[str]:
    """Tensors computed from shapes and constants only (Shape/Size outputs and what is computed
    from them: anchor grids, reshape targets, ranges): index computation, never quantized. Given
    static input shapes they are constants; with dynamic H/W they still do not depend on values."""
    constant = constant_tensors(model)
    index: set[str] = set()
    for node in model.graph.nodes:
        named = [t.name for t in node.inputs if t.name]
        if node.op in SHAPE_SOURCES or (node.op not in NONDETERMINISTIC and named
                                         and all(n in index or n in constant for n in named)
                                         and any(n in index for n in named)):
            index.update(t.name for t in node.outputs if t.name)
    return index


# -- unary regions ----------------------------------------------------------------------------------

#: Elementwise ops of one tensor argument (Clip with constant bounds).
UNARY_ELEMENTWISE = ("Sigmoid", "Tanh", "Relu", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Clip", "Erf",
                     "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Softplus", "Softsign", "Elu", "Selu",
                     "Celu", "Mish", "ThresholdedRelu", "Gelu", "Sin", "Cos")
#: Elementwise ops of two arguments: unary when the other argument is a scalar constant or the same source.
BINARY_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")


@dataclass(frozen=True)
class UnaryRegion:
    """Elementwise nodes computing ``y = f(x)`` from one tensor `x` and scalar constants, whose
    inner tensors are read nowhere else: HardSwish written as ``x * Clip(x + 3, 0, 6) / 6``,
    SiLU as ``x * Sigmoid(x)``, GELU as ``0.5 · x · (1 + Erf(x / √2))``, or a single Sigmoid.
    A deployment compiler quantizes only x and y (f becomes one 256-entry table)."""
    input: str
    output: str
    nodes: tuple[str, ...]       # in graph order
    kind: str                    # silu, hardswish, hardsigmoid, gelu, mish, or the single op's name

    @property
    def inner(self) -> set[str]:
        """Names of the nodes whose outputs never leave the region (all but the output's producer)."""
        return set(self.nodes)


def unary_regions(model: QModel) -> list[UnaryRegion]:
    """The maximal unary regions of `model` (see UnaryRegion); single Relu/Clip nodes are clamps,
    not regions (they fold into the producer's output range)."""
    constant = constant_tensors(model)
    source: dict[str, str] = {}                  # tensor -> the region input it is a function of
    members: dict[str, list] = {}                # region input -> nodes, in graph order
    for node in model.graph.nodes:
        if not _elementwise(node, constant) or len([t for t in node.outputs if t.name]) != 1:
            continue
        data = [t.name for t in node.inputs if t.name and t.name not in constant]
        sources = {source.get(name, name) for name in data}
        if len(sources) != 1:
            continue
        x = sources.pop()
        source[node.outputs[0].name] = x
        members.setdefault(x, []).append(node)
    regions = []
    for x, nodes in members.items():
        names = {n.name for n in nodes}
        escaping = [n.outputs[0] for n in nodes
                    if model.is_graph_output(n.outputs[0]) or any(c.name not in names for c in n.outputs[0].outputs)]
        if len(escaping) != 1 or escaping[0] is not nodes[-1].outputs[0]:
            continue
        if len(nodes) == 1 and nodes[0].op in CLAMPS:
            continue
        regions.append(UnaryRegion(x, escaping[0].name, tuple(n.name for n in nodes), _region_kind(nodes)))
    return regions


#: Kinds of unary region that several exported ops make (single-op regions are named by their op).
REGION_KINDS = ("silu", "hardswish", "hardsigmoid", "gelu", "gelu_tanh", "mish", "unary")


def split_region(model: QModel, region: UnaryRegion, integer_ops: Iterable[str]) -> list[UnaryRegion]:
    """`region` op by op, as ONNX Runtime's quantize_static places it: every node of `integer_ops`
    (Mul, Add, Div by a constant, ...) and every clamp runs as itself; every other node (Sigmoid,
    Erf, Pow, ...) becomes a one-op region of its own (a table). SiLU ``x·σ(x)`` becomes the
    region σ(x) and the node Mul(x, σ)."""
    constant = constant_tensors(model)
    nodes = {n.name: n for n in model.graph.nodes}
    parts = []
    for name in region.nodes:
        node = nodes[name]
        if node.op in integer_ops or node.op in CLAMPS:
            continue
        data = [t.name for t in node.inputs if t.name and t.name not in constant]
        parts.append(UnaryRegion(data[0], node.outputs[0].name, (name,), node.op.lower()))
    return parts


def _elementwise(node, constant: set[str]) -> bool:
    if node.domain not in (None, "", "ai.onnx") and not (node.op == "Gelu" and node.domain == "com.microsoft"):
        return False
    if node.op == "Clip":
        return all(not t.name or t.name in constant for t in node.inputs[1:])
    if node.op == "PRelu":
        slope = QModel.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        return slope is not None and np.asarray(slope).size == 1
    if node.op in UNARY_ELEMENTWISE:
        return len([t for t in node.inputs if t.name]) == 1
    if node.op in BINARY_ELEMENTWISE and len(node.inputs) == 2:
        for t in node.inputs:
            if t.name in constant:
                value = QModel.constant_value(t)
                if value is None or np.asarray(value).size != 1:
                    return False           # a per-channel constant makes f depend on the channel
        return True
    return False


def _region_kind(nodes) -> str:
    ops = sorted(n.op for n in nodes)
    if len(nodes) == 1:
        return nodes[0].op.lower()
    if ops == ["Mul", "Sigmoid"]:
        return "silu"
    if ops == ["HardSigmoid", "Mul"] or ("Clip" in ops and ops.count("Mul") + ops.count("Div") >= 2 and "Add" in ops):
        return "hardswish"
    if "Clip" in ops and "Add" in ops:
        return "hardsigmoid"
    if "Erf" in ops:
        return "gelu"
    if "Tanh" in ops and "Pow" in ops:
        return "gelu_tanh"
    if "Softplus" in ops and "Tanh" in ops:
        return "mish"
    return "unary"


#: Region kinds whose function is flat beyond finite bounds (clamps of an affine map, or a product
#: with one): HardSwish is 0 below -3, HardSigmoid 0 below -β/α and 1 above (1-β)/α.
CLAMPED_KINDS = ("hardswish", "hardsigmoid")

@functools.cache
def _probe() -> np.ndarray:
    """Where :func:`flat_bounds` looks: ±2^20 on a log scale, then every 1/256 within ±64 (built
    on first use, not at import)."""
    return np.unique(np.concatenate([-np.logspace(-4, 20, 97, base=2.0), np.logspace(-4, 20, 97, base=2.0),
                                     np.arange(-64 * 256, 64 * 256 + 1) / 256.0])).astype(np.float32)


def evaluate_function(nodes: list, x: str, y: str, values: np.ndarray) -> np.ndarray:
    """The elementwise function from tensor `x` to tensor `y` that `nodes` compute (a unary
    region, or one op), run by ORT on the float32 `values`. Declined when the nodes do not
    form a self-contained function of `x` or ORT refuses them."""
    from qgraph.model_io import OPSET
    from qgraph.runner import run_model
    shared: dict[str, gs.Tensor] = {}
    graph = gs.Graph(nodes=[_copy_node(n, shared) for n in nodes], opset=OPSET)
    source, target = shared.get(x), shared.get(y)
    if source is None or target is None or isinstance(source, gs.Constant):
        raise Declined(f"the function from '{x}' to '{y}' is not self-contained")
    values = np.asarray(values, np.float32).reshape(-1)
    source.dtype, source.shape = np.float32, [values.size]
    target.dtype, target.shape = np.float32, [values.size]
    graph.inputs, graph.outputs = [source], [target]
    proto = gs.export_onnx(graph.cleanup(), do_type_check=False)
    proto.ir_version = 8
    del proto.opset_import[:]
    proto.opset_import.add(domain="", version=OPSET)
    if any(n.domain == "com.microsoft" for n in proto.graph.node):
        proto.opset_import.add(domain="com.microsoft", version=1)
    try:
        onnx.checker.check_model(proto)
        return run_model(proto, {x: values})[y].reshape(-1)
    except Exception as exc:  # noqa: BLE001 - ORT refusing the function is a reason, not a crash
        raise Declined(f"cannot evaluate: {str(exc).splitlines()[0][:120]}") from None


def _copy_node(node: gs.Node, shared: dict[str, gs.Tensor]) -> gs.Node:
    """`node` in a new graph, its tensors shared by name with the other copied nodes (a Constant
    node's output as the constant it is)."""
    def tensor(t):
        if t.name not in shared:
            value = QModel.constant_value(t)
            shared[t.name] = gs.Variable(t.name, dtype=t.dtype) if value is None else gs.Constant(t.name, value)
        return shared[t.name]
    return gs.Node(op=node.op, name=node.name, attrs=dict(node.attrs), inputs=[tensor(t) for t in node.inputs],
                   outputs=[tensor(t) for t in node.outputs], domain=node.domain)


def flat_bounds(model: QModel, region: UnaryRegion) -> tuple[float, float]:
    """(lo, hi) such that the region's function is constant on x <= lo and on x >= hi (-inf / inf
    where it is not): for a kind of :data:`CLAMPED_KINDS`, found on a dense probe of x (every
    1/256 within ±64, a log scale beyond, out to ±2^20) and checked there — lo is the highest
    probe with f equal to f(-2^20) at it and at every probe below; likewise hi. Any other kind, or
    a function ORT cannot evaluate: (-inf, inf). A quantizer of x read only by such functions
    need only cover [lo, hi]: clamping x to it changes no output."""
    if region.kind not in CLAMPED_KINDS:
        return -math.inf, math.inf
    nodes = {n.name: n for n in model.graph.nodes}
    probe = _probe()
    try:
        y = evaluate_function([nodes[n] for n in region.nodes], region.input, region.output, probe)
    except Declined:
        return -math.inf, math.inf
    return _flat_end(probe, y), -_flat_end(-probe[::-1], y[::-1])


def _flat_end(x: np.ndarray, y: np.ndarray) -> float:
    """The largest x[i] with y[0..i] all equal to y[0] (x ascending), or -inf when only x[0] is."""
    changed = np.flatnonzero(y != y[0])
    last = (len(y) if changed.size == 0 else int(changed[0])) - 1
    return float(x[last]) if last > 0 and np.isfinite(y[0]) else -math.inf


# -- names ---------------------------------------------------------------------------------------

def name_nodes(model: QModel) -> int:
    """Give every unnamed or duplicate-named node a unique name `<name or op>_<k>`."""
    seen: set[str] = set()
    renamed = 0
    for node in model.graph.nodes:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or node.op.lower()
        k = 0
        while f"{base}_{k}" in seen:
            k += 1
        node.name = f"{base}_{k}"
        seen.add(node.name)
        renamed += 1
    model.cleanup()
    return renamed
