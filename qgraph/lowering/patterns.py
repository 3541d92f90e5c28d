"""What lowering matches: quantizers and *sites*.

A quantizer is a QuantizeLinear/DequantizeLinear node with constant scale and zero point.
A site is a float op whose inputs are dequantized integers (or float constants) and whose
output, after an optional chain of Relu/Clip, is read by exactly one QuantizeLinear:

    DQ(x_q) ─┐
    DQ(w_q) ─┼─ op ─ [Relu | Clip]* ─ Q ─▶ y_q        becomes        x_q, w_q ─ lowered op(s) ─▶ y_q
    bias    ─┘

Because Q is monotone, ``Q(relu(y)) = max(Q(y), Q(0))`` and ``Q(clip(y, a, b)) =
clip(Q(y), Q(a), Q(b))`` exactly: an activation chain becomes a Clip on the integer output,
and disappears when those bounds are the storage range already (e.g. zp = qmin for Relu).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from qgraph import quant
from qgraph.errors import PassError
from qgraph.graph import QModel
from qgraph.idioms import CLAMPS, Declined, clip_bounds_or_none

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"
QUANTIZERS = (QUANTIZE, DEQUANTIZE)
NOTHING_TO_LOWER = ("nothing to lower: the model has no QuantizeLinear/DequantizeLinear pairs; "
                    "run insert_qdq first")

@dataclass(frozen=True, eq=False)
class Quantizer:
    """Constant parameters of one Q/DQ node: ``scale`` float32 and ``zero_point`` in the storage
    type, both 0-d (per tensor) or 1-d along ``axis`` (per channel)."""
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    node: str

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype

    @property
    def qmin(self) -> int:
        return quant.storage_range(self.dtype)[0]

    @property
    def qmax(self) -> int:
        return quant.storage_range(self.dtype)[1]

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim > 0 and self.scale.size > 1

    def same_grid(self, other: "Quantizer") -> bool:
        return (self.dtype == other.dtype and self.scale.shape == other.scale.shape
                and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.zero_point, other.zero_point))

    def quantize(self, x, axis: int | None = None) -> np.ndarray:
        return quant.quantize(x, self.scale, self.zero_point, self.qmin, self.qmax,
                              axis=axis if self.per_channel else None, dtype=self.dtype)

    def dequantize(self, q, axis: int | None = None) -> np.ndarray:
        return quant.dequantize(q, self.scale, self.zero_point, axis=axis if self.per_channel else None)

    def scalar_scale(self) -> np.float32:
        return np.float32(self.scale.reshape(-1)[0])

    def scalar_zero_point(self) -> int:
        return int(self.zero_point.reshape(-1)[0])


#: Storage types the targets do not lower: 16-bit pairs (mixed precision, com.microsoft domain)
#: stay QDQ (8-bit activations and weights and int32 biases lower).
WIDE_STORAGE = ("int16", "uint16")


def wide_quantizer_nodes(model: QModel) -> list[gs.Node]:
    """Q/DQ nodes with a 16-bit zero point: no QLinear*/integer kernel takes them, so lowering
    keeps them as QDQ pairs (and the layers next to them in float)."""
    wide = []
    for node in quantizer_nodes(model):
        q = read_quantizer(node, any_storage=True)
        if q is not None and q.dtype.name in WIDE_STORAGE:
            wide.append(node)
    return wide


def read_quantizer(node: gs.Node, any_storage: bool = False) -> Quantizer | None:
    """The constant parameters of a Q/DQ node, or None when the scale or zero point is computed
    or (unless `any_storage`) its storage is 16-bit (see WIDE_STORAGE)."""
    scale = QModel.constant_value(node.inputs[1])
    if scale is None:
        return None
    if len(node.inputs) > 2 and node.inputs[2].name:
        zp = QModel.constant_value(node.inputs[2])
        if zp is None:
            return None
    else:
        zp = np.zeros(scale.shape, np.uint8)
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zp)
    if not any_storage and zp.dtype.name in WIDE_STORAGE:
        return None
    if scale.ndim == 1 and scale.size == 1:
        scale, zp = scale.reshape(()), zp.reshape(())
    return Quantizer(scale, zp, int(node.attrs.get("axis", 1)), node.name)


# -- validation ---------------------------------------------------------------------------

def quantizer_nodes(model: QModel) -> list[gs.Node]:
    return [n for n in model.graph.nodes if n.op in QUANTIZERS]


def check_quantizers(model: QModel) -> None:
    """PassError when the model has no quantizer, or a scale that is zero, negative or not finite."""
    nodes = quantizer_nodes(model)
    if not nodes:
        raise PassError(NOTHING_TO_LOWER)
    for node in nodes:
        scale = QModel.constant_value(node.inputs[1])
        if scale is None:
            continue
        scale = np.asarray(scale, np.float64)
        if scale.size and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            bad = scale[~(np.isfinite(scale) & (scale > 0))].reshape(-1)[0]
            raise PassError(f"{node.op} '{node.name}' of tensor '{node.inputs[0].name}' has scale {bad:g} "
                            f"in '{node.inputs[1].name}'; scales must be positive: recalibrate or fix that tensor")


def weight_channel_axis(consumer: gs.Node, index: int, rank: int) -> int | None:
    """The axis that a per-channel weight quantizer must use for `consumer`'s input `index`:
    the output-channel axis of the layer, or None if the input is not a weight."""
    if index == 1 and consumer.op == "Conv":
        return 0
    if index == 1 and consumer.op == "ConvTranspose":
        return 1
    if index == 1 and consumer.op == "Gemm":
        return 0 if consumer.attrs.get("transB", 0) else 1
    if index == 1 and consumer.op == "MatMul":
        return rank - 1
    if index == 2 and consumer.op in ("Conv", "ConvTranspose", "Gemm"):
        return 0
    return None


def check_weight_axes(model: QModel) -> None:
    """PassError naming a per-channel weight quantizer whose axis is not its layer's output channel."""
    for node in quantizer_nodes(model):
        if node.op != DEQUANTIZE:
            continue
        q = read_quantizer(node)
        value = QModel.constant_value(node.inputs[0])
        if q is None or not q.per_channel or value is None:
            continue
        axis = q.axis % max(value.ndim, 1)
        if value.shape[axis] != q.scale.size:
            raise PassError(f"per-channel quantizer '{node.name}' of '{node.inputs[0].name}' has {q.scale.size} "
                            f"scales but axis {q.axis} has {value.shape[axis]} entries; re-quantize the weight")
        for consumer in node.outputs[0].outputs:
            for index, tensor in enumerate(consumer.inputs):
                if tensor is not node.outputs[0]:
                    continue
                want = weight_channel_axis(consumer, index, value.ndim)
                if want is not None and axis != want:
                    raise PassError(f"per-channel quantizer '{node.name}' of weight '{node.inputs[0].name}' is on "
                                    f"axis {q.axis}, but {consumer.op} '{consumer.name}' needs its output channels "
                                    f"(axis {want}); re-quantize that weight per output channel")


#: Compute ops that may read integers and write float: the last layer before float post-processing.
FLOAT_OUTPUT_OPS = ("Conv", "Gemm", "MatMul")


def quantized_region(model: QModel, inner: frozenset[str] = frozenset()) -> set[str]:
    """Names of the nodes between an activation QuantizeLinear and a DequantizeLinear: reachable
    from the first and reaching the second (float pre/post-processing outside is not lowered),
    plus compute ops reading dequantized activations whose output stays float. `inner`: nodes
    that compute inside the region whatever their op (a lowered float activation's DQ → f → Q),
    whose Q and DQ neither start nor end it."""
    view = model.nx_view()
    starts = [n.name for n in model.graph.nodes if n.op == QUANTIZE and model.constant_value(n.inputs[0]) is None
              and n.name not in inner]
    ends = [n.name for n in model.graph.nodes if n.op == DEQUANTIZE and model.constant_value(n.inputs[0]) is None
            and n.name not in inner]
    after = set(starts).union(*(nx.descendants(view, s) for s in starts)) if starts else set()
    before = set(ends).union(*(nx.ancestors(view, e) for e in ends)) if ends else set()
    region = after & before
    for node in model.graph.nodes:
        if node.op in FLOAT_OUTPUT_OPS and node.inputs and node.name in after:
            producer = model.producer(node.inputs[0])
            if producer is not None and producer.op == DEQUANTIZE:
                region.add(node.name)
    return region


# -- sites --------------------------------------------------------------------------------

@dataclass
class QInput:
    """An integer input of a site: the tensor read by the DequantizeLinear and its quantizer."""
    tensor: gs.Tensor
    quantizer: Quantizer

    @property
    def const(self) -> np.ndarray | None:
        return QModel.constant_value(self.tensor)


@dataclass
class Site:
    node: gs.Node
    inputs: list  # per node input: QInput, np.ndarray (float constant), or None (omitted)
    quantize_node: gs.Node | None        # None: a compute op whose output stays float
    out_q: Quantizer | None
    clamp: tuple[float, float] = (-np.inf, np.inf)
    act_nodes: list = field(default_factory=list)

    @property
    def out(self) -> gs.Variable:
        return self.quantize_node.outputs[0] if self.quantize_node is not None else self.node.outputs[0]

    @property
    def float_output(self) -> bool:
        return self.quantize_node is None

    def qin(self, i: int) -> QInput | None:
        v = self.inputs[i] if i < len(self.inputs) else None
        return v if isinstance(v, QInput) else None


def match_site(model: QModel, node: gs.Node, index: set[str] = frozenset()) -> Site:
    """The site rooted at `node`; Declined says why `node` is not one. Inputs in `index`
    (shapes computed at run time) are taken as they are."""
    inputs = []
    for tensor in node.inputs:
        if not tensor.name:
            inputs.append(None)
            continue
        producer = model.producer(tensor)
        if producer is not None and producer.op == DEQUANTIZE:
            q = read_quantizer(producer)
            if q is None:
                raise Declined(f"input '{tensor.name}' has a computed (dynamic) quantizer")
            inputs.append(QInput(producer.inputs[0], q))
            continue
        value = model.constant_value(tensor)
        if value is None and tensor.name in index:
            inputs.append(tensor)             # a shape computed at run time (Reshape's target, ...)
            continue
        if value is None:
            raise Declined(f"missing quantizer: input '{tensor.name}' is not dequantized")
        inputs.append(np.asarray(value))
    if len(node.outputs) != 1:
        raise Declined(f"unsupported op: {node.op} with {len(node.outputs)} outputs")
    lo, hi = -np.inf, np.inf
    act_nodes = []
    own = clip_bounds_or_none(node) if node.op in CLAMPS else None
    if own is not None:
        lo, hi = own
    tensor = node.outputs[0]
    while True:
        nxt = model.only_consumer(tensor)
        clamp = clip_bounds_or_none(nxt) if nxt is not None and nxt.op in CLAMPS else None
        if clamp is None or nxt.inputs[0] is not tensor:
            break
        lo, hi = max(lo, clamp[0]), min(hi, clamp[1])
        act_nodes.append(nxt)
        tensor = nxt.outputs[0]
    readers = list(tensor.outputs)
    if model.is_graph_output(tensor) or len(readers) != 1 or readers[0].op != QUANTIZE:
        if node.op in FLOAT_OUTPUT_OPS:   # integer inputs, float output: no activation folds in
            return Site(node, inputs, None, None)
        raise Declined(f"missing quantizer: output '{tensor.name}' is not read by exactly one QuantizeLinear")
    out_q = read_quantizer(readers[0])
    if out_q is None:
        raise Declined(f"output '{tensor.name}' has a computed (dynamic) quantizer")
    if out_q.per_channel:
        raise Declined(f"output '{tensor.name}' has a per-channel activation quantizer")
    return Site(node, inputs, readers[0], out_q, (lo, hi), act_nodes)


# -- editing helpers shared by the targets ----------------------------------------------------

def const(model: QModel, name: str, value) -> gs.Constant:
    """A new initializer; 0-d values stay 0-d (QModel.add_constant's ascontiguousarray makes them 1-d,
    which com.microsoft QLinear ops refuse as scales)."""
    c = model.add_constant(name, np.asarray(value))
    c.values = np.array(value, copy=True)
    return c


def var(model: QModel, name: str, dtype=None) -> gs.Variable:
    return model.add_variable(name, dtype=dtype)


def quantizer_constants(model: QModel, q: Quantizer, base: str) -> tuple[gs.Constant, gs.Constant]:
    return const(model, f"{base}_scale", q.scale), const(model, f"{base}_zero_point", q.zero_point)


def clamp_bounds(site: Site) -> tuple[int, int] | None:
    """Integer bounds of the folded activation on the output grid, None when implicit."""
    lo, hi = site.clamp
    q = site.out_q
    qlo = q.qmin if lo == -np.inf else int(q.quantize(np.float32(lo)))
    qhi = q.qmax if hi == np.inf else int(q.quantize(np.float32(hi)))
    if qlo <= q.qmin and qhi >= q.qmax:
        return None
    return qlo, qhi


def finish_site(model: QModel, site: Site, build, clamped: bool = False) -> None:
    """Detach the site's QuantizeLinear, call ``build(out_tensor)`` to emit the lowered nodes
    writing ``out_tensor``, and add the Clip of a folded activation when it is not implicit —
    unless `clamped`: `build` clips to clamp_bounds(site) itself."""
    out = site.out
    site.quantize_node.outputs.clear()
    out.dtype = site.out_q.dtype
    bounds = clamp_bounds(site)
    if bounds is None or clamped:
        build(out)
        return
    raw = var(model, out.name + "_unclamped", site.out_q.dtype)
    build(raw)
    lo = const(model, out.name + "_min", np.array(bounds[0], site.out_q.dtype))
    hi = const(model, out.name + "_max", np.array(bounds[1], site.out_q.dtype))
    model.add_node("Clip", [raw, lo, hi], [out], site.node.name + "_clamp")
