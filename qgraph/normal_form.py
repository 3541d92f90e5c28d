"""Exporter idioms rewritten into qgraph's normal form (called by the canonicalize pass).

Exporters decompose what a deployment compiler wants as one operation. Each rewrite here is
a pattern (what to find), a check (Declined with the reason it does not apply) and a rewrite,
and each preserves the outputs up to float rounding:

- LayerNorm written as ``(x − mean(x)) / √(mean((x − mean(x))²) + ε) · γ + β`` (ReduceMean, Sub,
  Pow or Mul, ReduceMean, Add, Sqrt, Div, [Mul, Add]) becomes one LayerNormalization over the
  reduced trailing axes, with its Mean and InvStdDev outputs declared (ORT's trainer needs them
  to differentiate it);
- (not rewritten) LayerNorm in the moments form JAX exports write, ``(x − E[x]) ·
  (E[x²] − E[x]² + ε)^(−1/2)``, and in Keras' form ``x·s + (β − E[x]·s)``: :func:`written_out_layernorms`
  finds them (and torch-form ones left unfused) so insert_qdq keeps them float;
- Softmax written as ``e / ΣE``, ``e = exp(x [− max x])`` becomes Softmax on that axis;
- a per-channel (or scalar) ``Mul``/``Div``/``Add``/``Sub`` by a constant right after a Conv,
  ConvTranspose, Gemm or BatchNormalization whose output it alone reads (Paddle's learnable
  affine ``Conv → Mul(c) → Add(c)``) folds into that layer's weight and bias (BN: γ and β):

      y = (W * x + b) · c + d   =>   W' = W · c (per output channel),  b' = b · c + d.

- ``ReduceMean`` over every spatial axis of an (N, C, H, W[, D]) map (tf2onnx's Keras global average
  pooling) becomes GlobalAveragePool, followed by a Squeeze of those axes when keepdims=0, so
  it is quantized and lowered as the pool it is;
- DepthToSpace / SpaceToDepth (pixel shuffle) become the Reshape → Transpose → Reshape the spec
  defines them by, where the map's dims are static: the same elements moved, and ops ORT runs on
  8-bit codes (its DepthToSpace is float-only), so an integer region need not stop there;
- ``Sum`` of n >= 2 inputs (Caffe2-era exports write ResNet's residual additions so) becomes
  the chain ``((x1 + x2) + x3) + …`` of Adds, the order ONNX Runtime's Sum kernel adds in, so
  quantizers and lowering treat each as the residual Add it is; a one-input Sum is its input.

Unary elementwise idioms (HardSwish, SiLU, GELU, ...) are not rewritten: they stay as exported
(ONNX Runtime can train every piece) and idioms.unary_regions recognizes them where it matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qgraph.errors import PassError
from qgraph.graph import Node, QModel, Tensor
from qgraph.idioms import LAYERS, Declined, grouped_view, out_channels, skip


# -- helpers ----------------------------------------------------------------------------------

def _only(model: QModel, tensor: Tensor, op: str | tuple) -> Node:
    """The single consumer of `tensor`, which must be `op`; Declined otherwise."""
    ops = (op,) if isinstance(op, str) else op
    node = model.only_consumer(tensor)
    if node is None or node.op not in ops:
        raise Declined(f"'{tensor.name}' is not read by exactly one {'/'.join(ops)}")
    return node


def _scalar(model: QModel, tensor: Tensor) -> float:
    value = _scalar_or_none(model, tensor)
    if value is None:
        raise Declined(f"'{tensor.name}' is not a scalar constant")
    return value


def _scalar_or_none(model: QModel, tensor: Tensor) -> float | None:
    value = model.constant_value(tensor)
    return float(np.asarray(value).reshape(-1)[0]) if value is not None and np.asarray(value).size == 1 else None


def _other(node: Node, tensor: Tensor) -> Tensor:
    """The input of a binary node that is not `tensor`."""
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def _constant_axes(model: QModel, node: Node, rank: int) -> tuple[int, ...] | None:
    """Axes of a reduction (attribute, or input since opset 13/18), made non-negative and sorted;
    None when it names none (every axis); Declined when they are computed."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = model.constant_value(node.inputs[1])
        if axes is None:
            raise Declined(f"{node.op} '{node.name}' axes are computed")
    else:
        axes = node.attrs.get("axes")
    return None if axes is None else tuple(sorted(int(a) % rank for a in np.asarray(axes).reshape(-1)))


def _reduce_axes(model: QModel, node: Node, rank: int) -> tuple[int, ...]:
    """:func:`_constant_axes` of a reduction that keeps its dims; Declined when keepdims is off or
    it reduces every axis."""
    if not int(node.attrs.get("keepdims", 1)):
        raise Declined(f"{node.op} '{node.name}' drops the reduced axes (keepdims=0)")
    axes = _constant_axes(model, node, rank)
    if axes is None:
        raise Declined(f"{node.op} '{node.name}' reduces every axis")
    return axes


def _rank(tensor: Tensor) -> int:
    if tensor.shape is None:
        raise Declined(f"the rank of '{tensor.name}' is unknown; run shape inference first")
    return len(tensor.shape)


def _trailing(axes: tuple[int, ...], rank: int) -> int:
    """The first axis when `axes` are the trailing axes k..rank−1; Declined otherwise."""
    if not axes or axes != tuple(range(axes[0], rank)):
        raise Declined(f"axes {list(axes)} are not the trailing axes of a rank-{rank} tensor")
    return axes[0]


# -- LayerNorm ---------------------------------------------------------------------------------

@dataclass
class LayerNormMatch:
    x: Tensor
    axis: int
    epsilon: float
    gamma: np.ndarray | None
    beta: np.ndarray | None
    output: Tensor
    nodes: list[Node]
    normalized_shape: tuple


class Unfusable(Declined):
    """The whole idiom matched, yet its one-op form cannot express it: worth a line in the report.
    `nodes`: the idiom's nodes, left as they are."""

    def __init__(self, reason: str, nodes: list | None = None):
        super().__init__(reason)
        self.nodes = nodes or []


def match_layernorm(model: QModel, mean: Node) -> LayerNormMatch:
    """The decomposed LayerNorm that starts at ReduceMean `mean`."""
    x = mean.inputs[0]
    rank = _rank(x)
    axes = _reduce_axes(model, mean, rank)
    axis = _trailing(axes, rank)
    sub = _only(model, mean.outputs[0], "Sub")
    if sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        raise Declined(f"Sub '{sub.name}' is not x − mean(x)")
    centered = sub.outputs[0]
    readers = list(centered.outputs)
    if len(readers) != 2 or model.is_graph_output(centered):
        raise Declined(f"'{centered.name}' is not read exactly by the square and the division")
    square = next((n for n in readers if _squares(model, n, centered)), None)
    div = next((n for n in readers if n.op == "Div" and n.inputs[0] is centered), None)
    if square is None or div is None:
        raise Declined(f"'{centered.name}' is not squared and divided")
    var = _only(model, square.outputs[0], "ReduceMean")
    if _reduce_axes(model, var, rank) != axes:
        raise Declined(f"ReduceMean '{var.name}' reduces other axes than the mean")
    add_eps = _only(model, var.outputs[0], "Add")
    eps = _scalar(model, _other(add_eps, var.outputs[0]))
    sqrt = _only(model, add_eps.outputs[0], "Sqrt")
    if div.inputs[1] is not sqrt.outputs[0] or model.only_consumer(sqrt.outputs[0]) is not div:
        raise Declined(f"Div '{div.name}' does not divide by the standard deviation")
    nodes = [mean, sub, square, var, add_eps, sqrt, div]
    shape = tuple(x.shape[axis:]) if x.shape is not None else ()
    if not shape or any(not isinstance(d, (int, np.integer)) for d in shape):
        # LayerNormalization's scale and bias need the normalized axes' sizes
        raise Unfusable(f"LayerNorm kept decomposed: the normalized axes of '{x.name}' have no static size "
                        f"({shape or 'unknown'}); fix the input's shape to fuse it", nodes)
    output = div.outputs[0]
    gamma, output = _absorb_affine(model, output, "Mul", shape, nodes)
    beta, output = _absorb_affine(model, output, "Add", shape, nodes)
    for node in nodes[:-1]:
        if any(model.is_graph_output(t) for t in node.outputs):
            raise Declined(f"inner tensor of '{node.name}' is a graph output")
    return LayerNormMatch(x, axis, eps, gamma, beta, output, nodes, shape)


def _affine_constant(model: QModel, tensor: Tensor, shape: tuple) -> np.ndarray | None:
    """A γ/β constant that broadcasts only over the normalized axes, as an array of `shape`."""
    value = model.constant_value(tensor)
    if value is None or any(not isinstance(d, (int, np.integer)) for d in shape):
        return None
    value = np.asarray(value)
    trailing = value.reshape(value.shape[value.ndim - min(value.ndim, len(shape)):]) if value.ndim else value
    if value.ndim > len(shape) and any(d != 1 for d in value.shape[:value.ndim - len(shape)]):
        return None
    try:
        return np.broadcast_to(trailing, shape).astype(np.float32)
    except ValueError:
        return None


def _absorb_affine(model: QModel, output: Tensor, op: str, shape: tuple, nodes: list) -> tuple:
    """(γ or β, new output) when `output`'s only reader is `op` by a constant over the normalized
    axes (the reader joins `nodes`); (None, output) otherwise."""
    reader = model.only_consumer(output)
    if reader is None or reader.op != op:
        return None, output
    value = _affine_constant(model, _other(reader, output), shape)
    if value is None:
        return None, output
    nodes.append(reader)
    return value, reader.outputs[0]


def fuse_layernorm(model: QModel, m: LayerNormMatch) -> None:
    dtype = np.float32
    base = m.nodes[0].name or "layernorm"
    gamma = m.gamma if m.gamma is not None else np.ones(m.normalized_shape, dtype)
    beta = m.beta if m.beta is not None else np.zeros(m.normalized_shape, dtype)
    inputs = [m.x, model.add_constant(f"{base}.gamma", gamma), model.add_constant(f"{base}.beta", beta)]
    for node in m.nodes:
        node.outputs.clear()
    stats = [model.add_variable(f"{base}.mean", dtype), model.add_variable(f"{base}.inv_std_dev", dtype)]
    model.add_node("LayerNormalization", inputs, [m.output, *stats], f"{base}/LayerNormalization",
                   {"axis": m.axis, "epsilon": m.epsilon})


# -- LayerNorms left written out ----------------------------------------------------------------

def written_out_layernorms(model: QModel) -> list[list[Node]]:
    """The nodes of every LayerNorm still written op by op: the torch form canonicalize did not
    fuse (normalized axes of unknown size, or exporter_idioms off), Keras' form
    (:func:`match_keras_layernorm`) and its fused form as a BatchNormalization on batch statistics
    (:func:`match_batch_stats_layernorm`), and the moments form JAX exports write
    (:func:`match_moments_layernorm`), which are left written out on purpose — ONNX Runtime's
    LayerNormalization sums x and x² in one sequential float32 pass, so fusing it loses digits the
    export's pairwise ReduceSums keep (10⁻³ of Magika's output range). insert_qdq keeps these
    nodes float: quantized one by one, E[x²] − E[x]² cancels 8-bit noise into the variance."""
    found: list[list[Node]] = []
    for node in model.graph.nodes:
        if not node.outputs:
            continue
        for match in _WRITTEN_OUT.get(node.op, ()):
            try:
                nodes = match(model, node)
            except Unfusable as unfusable:          # the torch form, matched whole but not fusable
                nodes = unfusable.nodes
            except Declined:
                continue
            found.append(nodes)
            break
    return found


_BROADCASTS = ("Reshape", "Expand", "Unsqueeze")


def _torch_layernorm_nodes(model: QModel, mean: Node) -> list[Node]:
    return match_layernorm(model, mean).nodes


def match_moments_layernorm(model: QModel, reduce: Node) -> list[Node]:
    """The nodes of ``(x − E[x]) · (max(E[x²] − E[x]², 0) + ε)^(−1/2) [· γ] [+ β]`` starting at
    the reduction `reduce` of x, the moments form jax2tf/tf2onnx write for Flax's and Keras'
    LayerNorm (ReduceSum · 1/n or ReduceMean of x and of x·x, Sub, optional Max 0, Add ε, Sqrt,
    Reciprocal, γ on the reciprocal or after; the statistics may be Reshaped, Expanded or
    Unsqueezed back to x's rank, with 1 at the reduced axes), over any axes; Declined otherwise."""
    x = reduce.inputs[0]
    rank = _rank(x)
    axes = _constant_axes(model, reduce, rank)
    if axes is None:
        raise Declined(f"{reduce.op} '{reduce.name}' reduces every axis")
    keep = int(reduce.attrs.get("keepdims", 1))
    square = next((r for r in x.outputs if _squares(model, r, x)), None)
    if square is None:
        raise Declined(f"'{x.name}' is not squared beside its mean")
    sq_reduce = _only(model, square.outputs[0], ("ReduceSum", "ReduceMean"))
    if (sq_reduce.op != reduce.op or _constant_axes(model, sq_reduce, rank) != axes
            or int(sq_reduce.attrs.get("keepdims", 1)) != keep):
        raise Declined(f"'{sq_reduce.name}' does not reduce x·x as '{reduce.name}' reduces x")
    nodes = [reduce, square, sq_reduce]
    mean, scale = _moment(model, reduce, nodes)
    ex2, scale2 = _moment(model, sq_reduce, nodes)
    if scale != scale2:
        raise Declined(f"the two moments of '{x.name}' are scaled differently")
    mean_readers = _distinct(mean.outputs)
    mean_square = next((r for r in mean_readers if _squares(model, r, mean)), None)
    var = _only(model, ex2, "Sub")
    if mean_square is None or var.inputs[0] is not ex2 or var.inputs[1] is not mean_square.outputs[0] \
            or model.only_consumer(mean_square.outputs[0]) is not var:
        raise Declined(f"'{var.name}' is not E[x²] − E[x]²")
    nodes += [mean_square, var]
    t = var.outputs[0]
    clamp = model.only_consumer(t)
    if clamp is not None and clamp.op == "Max" and len(clamp.inputs) == 2 \
            and _scalar_or_none(model, _other(clamp, t)) == 0.0:
        nodes.append(clamp)
        t = clamp.outputs[0]
    t, add_eps = _follow_broadcasts(model, t, model.only_consumer(t), axes, rank, nodes)
    if add_eps is None or add_eps.op != "Add":
        raise Declined(f"the variance of '{x.name}' is not followed by + ε")
    _scalar(model, _other(add_eps, t))
    sqrt = _only(model, add_eps.outputs[0], "Sqrt")
    recip = _only(model, sqrt.outputs[0], "Reciprocal")
    nodes += [add_eps, sqrt, recip]
    inv, _ = _follow_broadcasts(model, recip.outputs[0], model.only_consumer(recip.outputs[0]), axes, rank, nodes)
    inv = _through_constant_ops(model, inv, ("Mul",), nodes)    # γ on the inverse deviation
    others = [r for r in mean_readers if r is not mean_square]
    if len(others) != 1:
        raise Declined(f"the mean of '{x.name}' is read outside the norm")
    centred_mean, sub = _follow_broadcasts(model, mean, others[0], axes, rank, nodes)
    if sub is None or sub.op != "Sub" or sub.inputs[0] is not x or sub.inputs[1] is not centred_mean:
        raise Declined(f"'{x.name}' is not centred on its mean")
    mul = _only(model, sub.outputs[0], "Mul")
    if _other(mul, sub.outputs[0]) is not inv or model.only_consumer(inv) is not mul:
        raise Declined(f"'{mul.name}' does not scale x − E[x] by the inverse deviation")
    nodes += [sub, mul]
    _through_constant_ops(model, mul.outputs[0], ("Mul", "Add"), nodes)    # γ, β after the normalization
    return nodes


def match_keras_layernorm(model: QModel, mean: Node) -> list[Node]:
    """The nodes of ``x · s + (β − E[x] · s)``, ``s = (E[(x − E[x])²] + ε)^(−1/2) [· γ]``, starting at
    the ReduceMean `mean` of x: Keras' LayerNormalization as tf2onnx writes it (TF's
    ``nn.batch_normalization`` of ``nn.moments``: SquaredDifference as Sub and Mul, Rsqrt as Sqrt and
    Reciprocal), over any axes; without β, ``x · s − E[x] · s``. Declined otherwise."""
    if mean.op != "ReduceMean":
        raise Declined(f"'{mean.name}' is no ReduceMean")
    x, m = mean.inputs[0], mean.outputs[0]
    rank = _rank(x)
    axes = _reduce_axes(model, mean, rank)
    readers = _distinct(m.outputs)
    centre = next((r for r in readers if r.op == "Sub" and r.inputs[0] is x and r.inputs[1] is m), None)
    if centre is None or len(readers) != 2 or model.is_graph_output(m):
        raise Declined(f"the mean of '{x.name}' is not read by x − E[x] and one more node")
    squares = _distinct(centre.outputs[0].outputs)
    if len(squares) != 1 or not _squares(model, squares[0], centre.outputs[0]) \
            or model.is_graph_output(centre.outputs[0]):
        raise Declined(f"x − E[x] of '{x.name}' is not squared alone")
    square = squares[0]
    var = _only(model, square.outputs[0], "ReduceMean")
    if _reduce_axes(model, var, rank) != axes:
        raise Declined(f"ReduceMean '{var.name}' reduces other axes than the mean")
    add_eps = _only(model, var.outputs[0], "Add")
    _scalar(model, _other(add_eps, var.outputs[0]))
    sqrt = _only(model, add_eps.outputs[0], "Sqrt")
    recip = _only(model, sqrt.outputs[0], "Reciprocal")
    nodes = [mean, centre, square, var, add_eps, sqrt, recip]
    s = _through_constant_ops(model, recip.outputs[0], ("Mul",), nodes)    # γ
    scaled = _distinct(s.outputs)
    x_scaled = next((r for r in scaled if r.op == "Mul" and _other(r, s) is x), None)
    mean_scaled = next((r for r in scaled if r.op == "Mul" and _other(r, s) is m), None)
    if len(scaled) != 2 or x_scaled is None or mean_scaled is None or model.is_graph_output(s):
        raise Declined(f"'{s.name}' does not scale both x and E[x]")
    nodes += [x_scaled, mean_scaled]
    shift = _only(model, mean_scaled.outputs[0], "Sub")
    nodes.append(shift)
    if shift.inputs[0] is x_scaled.outputs[0]:                 # no β: x·s − E[x]·s
        if model.only_consumer(x_scaled.outputs[0]) is not shift:
            raise Declined(f"'{x_scaled.name}' is read outside the norm")
        return nodes
    if model.constant_value(shift.inputs[0]) is None or shift.inputs[1] is not mean_scaled.outputs[0]:
        raise Declined(f"'{shift.name}' is not β − E[x]·s")
    add = _only(model, shift.outputs[0], "Add")
    if _other(add, shift.outputs[0]) is not x_scaled.outputs[0] or model.only_consumer(x_scaled.outputs[0]) is not add:
        raise Declined(f"'{add.name}' does not add x·s and β − E[x]·s")
    return nodes + [add]


def match_batch_stats_layernorm(model: QModel, bn: Node) -> list[Node]:
    """The nodes of a BatchNormalization fed its own input's statistics — mean and variance over
    every axis but 1, computed in the graph (Squeeze(ReduceMean(x)), ReduceSumSquare(x − mean) / n)
    — and of the Reshape, Mul γ, Add β after it: how tf2onnx writes Keras' fused LayerNorm (the
    samples laid along BN's channel axis, training-mode FusedBatchNormV3). Declined otherwise."""
    x = bn.inputs[0]
    if len(bn.inputs) < 5 or any(model.constant_value(bn.inputs[k]) is not None for k in (3, 4)):
        raise Declined(f"'{bn.name}' normalizes by stored statistics")
    rank = _rank(x)
    reduced = tuple(a for a in range(rank) if a != 1)
    nodes: list[Node] = []
    mean = _source_through(model, bn.inputs[3], ("Squeeze", "Reshape", "Identity"), nodes)
    if mean.op != "ReduceMean" or mean.inputs[0] is not x or _constant_axes(model, mean, rank) != reduced:
        raise Declined(f"the mean '{bn.inputs[3].name}' of '{bn.name}' is not its input's over all axes but 1")
    scaled = model.producer(bn.inputs[4])
    if scaled is None or scaled.op not in ("Div", "Mul") or model.only_consumer(scaled.outputs[0]) is not bn:
        raise Declined(f"the variance of '{bn.name}' is not a sum divided by a count")
    total = model.producer(scaled.inputs[0])
    centre = model.producer(total.inputs[0]) if total is not None and total.op == "ReduceSumSquare" else None
    if (centre is None or centre.op != "Sub" or centre.inputs[0] is not x or centre.inputs[1] is not mean.outputs[0]
            or _constant_axes(model, total, rank) != reduced or model.only_consumer(centre.outputs[0]) is not total):
        raise Declined(f"the variance of '{bn.name}' is not Σ(x − mean)² over all axes but 1")
    nodes += [mean, centre, total, scaled, bn]
    _through_constant_ops(model, bn.outputs[0], ("Reshape", "Mul", "Add"), nodes)   # back to x's layout, γ, β
    return nodes


def _through_constant_ops(model: QModel, t: Tensor, ops: tuple, nodes: list) -> Tensor:
    """`t` past its only reader for each of `ops` in turn where that reader takes a constant as its
    other operand (a γ Mul, a β Add) or, a Reshape, reads `t` as its data; they join `nodes`."""
    for op in ops:
        reader = model.only_consumer(t)
        if reader is None or reader.op != op:
            continue
        if (reader.inputs[0] is not t if op == "Reshape" else model.constant_value(_other(reader, t)) is None):
            continue
        nodes.append(reader)
        t = reader.outputs[0]
    return t


def _source_through(model: QModel, tensor: Tensor, ops: tuple, nodes: list) -> Node:
    """The producer of `tensor`, past single-reader `ops` (they join `nodes`)."""
    node = model.producer(tensor)
    while node is not None and node.op in ops and model.only_consumer(node.outputs[0]) is not None:
        nodes.append(node)
        node = model.producer(node.inputs[0])
    if node is None:
        raise Declined(f"'{tensor.name}' is a graph input or constant")
    return node


def _distinct(nodes) -> list[Node]:
    """`nodes` without repeats (a node reading a tensor twice is listed twice among its readers)."""
    seen: list[Node] = []
    for node in nodes:
        if not any(node is n for n in seen):
            seen.append(node)
    return seen


def _squares(model: QModel, node: Node, t: Tensor) -> bool:
    """Whether `node` is ``t·t`` or ``t^2``."""
    if node.op == "Mul":
        return node.inputs[0] is t and node.inputs[1] is t
    return node.op == "Pow" and node.inputs[0] is t and _scalar_or_none(model, node.inputs[1]) == 2.0


def _moment(model: QModel, reduce: Node, nodes: list) -> tuple[Tensor, float | None]:
    """(the mean, the constant a ReduceSum is scaled by — None for a ReduceMean): a ReduceSum
    must be multiplied by a scalar 1/n or divided by n (that node joins `nodes`)."""
    out = reduce.outputs[0]
    if reduce.op == "ReduceMean":
        return out, None
    node = _only(model, out, ("Mul", "Div"))
    c = _scalar_or_none(model, _other(node, out))
    if c is None or c == 0 or (node.op == "Div" and node.inputs[0] is not out):
        raise Declined(f"'{node.name}' does not turn the sum into a mean")
    nodes.append(node)
    return node.outputs[0], (c if node.op == "Mul" else 1.0 / c)


def _follow_broadcasts(model: QModel, t: Tensor, reader: Node | None, axes: tuple, rank: int, nodes: list):
    """From `t` and its `reader`, past Reshape/Expand/Unsqueeze that only bring a statistic to
    x's rank with 1 at the reduced axes (they join `nodes`): (the last tensor, its only reader)."""
    while reader is not None and reader.op in _BROADCASTS and reader.inputs[0] is t:
        if reader.op == "Unsqueeze":
            if _constant_axes(model, reader, rank) != axes:
                raise Declined(f"Unsqueeze '{reader.name}' does not restore the reduced axes")
        else:
            entries = _shape_entries(model, reader.inputs[1])
            if entries is None or len(entries) != rank or any(entries[a] != 1 for a in axes):
                raise Declined(f"{reader.op} '{reader.name}' does not keep the reduced axes at 1")
        nodes.append(reader)
        t = reader.outputs[0]
        reader = model.only_consumer(t)
    return t, reader


def _shape_entries(model: QModel, tensor: Tensor) -> list | None:
    """The entries of a 1-D shape tensor (None where computed at run time): a constant, or a Cast
    or Concat of constants and pieces of a known length; None when it cannot tell."""
    value = model.constant_value(tensor)
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)]
    node = model.producer(tensor)
    if node is None or node.op not in ("Cast", "Concat"):
        return None
    if node.op == "Cast":
        return _shape_entries(model, node.inputs[0])
    entries: list = []
    for piece in node.inputs:
        known = _shape_entries(model, piece)
        if known is None:
            if piece.shape is None or len(piece.shape) != 1 or not isinstance(piece.shape[0], (int, np.integer)):
                return None
            known = [None] * int(piece.shape[0])
        entries += known
    return entries


#: The written-out LayerNorm matchers tried on each op, in order (written_out_layernorms).
_WRITTEN_OUT = {"BatchNormalization": (match_batch_stats_layernorm,),
                "ReduceSum": (match_moments_layernorm,),
                "ReduceMean": (match_moments_layernorm, match_keras_layernorm, _torch_layernorm_nodes)}


# -- Softmax -----------------------------------------------------------------------------------

@dataclass
class SoftmaxMatch:
    x: Tensor
    axis: int
    output: Tensor
    nodes: list[Node]


def match_softmax(model: QModel, exp: Node) -> SoftmaxMatch:
    """``Exp(x [− ReduceMax(x)]) / ReduceSum(…)`` over one axis, starting at Exp `exp`."""
    e = exp.outputs[0]
    readers = list(e.outputs)
    total = next((n for n in readers if n.op == "ReduceSum"), None)
    div = next((n for n in readers if n.op == "Div" and n.inputs[0] is e), None)
    if len(readers) != 2 or total is None or div is None or model.is_graph_output(e):
        raise Declined(f"'{e.name}' is not read exactly by a ReduceSum and a Div")
    rank = _rank(e)
    axes = _reduce_axes(model, total, rank)
    if len(axes) != 1 or div.inputs[1] is not total.outputs[0] or model.only_consumer(total.outputs[0]) is not div:
        raise Declined(f"Div '{div.name}' does not divide by the sum over one axis")
    nodes, x = [exp, total, div], exp.inputs[0]
    sub = model.producer(x)
    if sub is not None and sub.op == "Sub" and model.only_consumer(x) is exp:
        top = model.producer(sub.inputs[1])
        if (top is not None and top.op == "ReduceMax" and top.inputs[0] is sub.inputs[0]
                and _reduce_axes(model, top, rank) == axes and model.only_consumer(top.outputs[0]) is sub):
            nodes = [top, sub, *nodes]
            x = sub.inputs[0]
    return SoftmaxMatch(x, axes[0], div.outputs[0], nodes)


def fuse_softmax(model: QModel, m: SoftmaxMatch) -> None:
    for node in m.nodes:
        node.outputs.clear()
    model.add_node("Softmax", [m.x], [m.output], f"{m.nodes[-1].name}/Softmax", {"axis": m.axis})


# -- global average pooling written as a mean --------------------------------------------------

def spatial_mean_as_global_pool(model: QModel, node: Node) -> None:
    """Replace a ReduceMean over axes 2..r−1 of a rank-r (r >= 4: a map) tensor by GlobalAveragePool
    (and a Squeeze of those axes for keepdims=0); Declined when the axes are others."""
    x = node.inputs[0]
    rank = _rank(x)
    keep = int(node.attrs.get("keepdims", 1))
    if rank < 4 or _constant_axes(model, node, rank) != tuple(range(2, rank)):
        raise Declined(f"ReduceMean '{node.name}' is not over the spatial axes of an (N, C, ...) map")
    y = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    if keep:
        model.add_node("GlobalAveragePool", [x], [y], f"{node.name}/pool")
        return
    pooled = model.add_variable(f"{y.name}_pooled", dtype=y.dtype)
    model.add_node("GlobalAveragePool", [x], [pooled], f"{node.name}/pool")
    axes_tensor = model.add_constant(f"{node.name}.axes", np.arange(2, rank, dtype=np.int64))
    model.add_node("Squeeze", [pooled, axes_tensor], [y], f"{node.name}/squeeze")


# -- pixel shuffle ------------------------------------------------------------------------------

def pixel_shuffle_as_transpose(model: QModel, node: Node) -> None:
    """Replace DepthToSpace (DCR or CRD) or SpaceToDepth on a static (N, C, H, W) map by the
    Reshape → Transpose → Reshape of their definitions; Declined for dynamic dims."""
    x = node.inputs[0]
    shape = x.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:]):
        raise Declined(f"{node.op} '{node.name}' needs a static (N, C, H, W) input to become Reshape/Transpose")
    c, h, w = (int(d) for d in shape[1:])
    b = int(node.attrs["blocksize"])
    if node.op == "DepthToSpace":
        if node.attrs.get("mode", "DCR") == "CRD":
            split, perm = [-1, c // (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3]
        else:
            split, perm = [-1, b, b, c // (b * b), h, w], [0, 3, 4, 1, 5, 2]
        final = [-1, c // (b * b), h * b, w * b]
    else:
        split, perm, final = [-1, c, h // b, b, w // b, b], [0, 3, 5, 1, 2, 4], [-1, c * b * b, h // b, w // b]
    y = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    blocks = model.add_variable(f"{y.name}_blocks", dtype=y.dtype)
    moved = model.add_variable(f"{y.name}_moved", dtype=y.dtype)
    model.add_node("Reshape", [x, model.add_constant(f"{node.name}.blocks", np.array(split, np.int64))], [blocks],
                   f"{node.name}/blocks")
    model.add_node("Transpose", [blocks], [moved], f"{node.name}/move", {"perm": perm})
    model.add_node("Reshape", [moved, model.add_constant(f"{node.name}.shape", np.array(final, np.int64))], [y],
                   f"{node.name}/shape")


# -- n-ary Sum ----------------------------------------------------------------------------------

def sum_as_adds(model: QModel, node: Node) -> None:
    """Replace the Sum `node` by Adds of its inputs in order (one input: the Sum is bypassed)."""
    terms = list(node.inputs)
    if len(terms) == 1:
        model.bypass(node)
        return
    out = node.outputs[0]
    node.outputs.clear()
    acc = terms[0]
    for k, term in enumerate(terms[1:], start=2):
        last = k == len(terms)
        target = out if last else model.add_variable(f"{out.name}_sum{k}", dtype=out.dtype, shape=out.shape)
        model.add_node("Add", [acc, term], [target], f"{node.name}/add{k}")
        acc = target
    node.inputs.clear()


# -- per-channel affine after a layer ------------------------------------------------------------

AFFINE_OPS = ("Mul", "Div", "Add", "Sub")
AFFINE_LAYERS = ("Conv", "ConvTranspose", "Gemm", "BatchNormalization")


def match_affine(model: QModel, layer: Node) -> tuple[Node, np.ndarray]:
    """The Mul/Div/Add/Sub that alone reads `layer`'s output with a constant per output channel
    (or scalar) on the other side, and that constant as one value per channel."""
    out = layer.outputs[0]
    if layer.op == "Gemm" and (layer.attrs.get("transA", 0) or float(layer.attrs.get("alpha", 1.0)) != 1.0
                               or float(layer.attrs.get("beta", 1.0)) != 1.0):
        raise Declined(f"Gemm '{layer.name}' has transA/alpha/beta")
    node = _only(model, out, AFFINE_OPS)
    if node.op in ("Div", "Sub") and node.inputs[0] is not out:
        raise Declined(f"{node.op} '{node.name}' takes the layer output as its second operand")
    value = model.constant_value(_other(node, out))
    if value is None:
        raise Declined(f"{node.op} '{node.name}' has no constant operand")
    channels = _layer_channels(model, layer)
    per_channel = _per_channel(np.asarray(value, np.float64), channels, _rank(out), layer.op)
    if node.op == "Div" and np.any(per_channel == 0):
        raise Declined(f"Div '{node.name}' divides by zero")
    return node, per_channel


def _layer_channels(model: QModel, layer: Node) -> int:
    if layer.op == "BatchNormalization":
        return int(np.asarray(model.constant_value(layer.inputs[1])).size)
    weight = model.constant_value(layer.inputs[1])
    if weight is None:
        raise Declined(f"{layer.op} '{layer.name}' weight is not a constant")
    return out_channels(layer, np.asarray(weight).shape)


def _per_channel(value: np.ndarray, channels: int, rank: int, op: str) -> np.ndarray:
    """`value` as one number per output channel, if it broadcasts along the channel axis only
    (axis 1 of a conv/BN output, the last axis of a Gemm output)."""
    axis = 1 if op != "Gemm" else rank - 1
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    if value.ndim > rank:
        raise Declined(f"constant of shape {list(value.shape)} has more axes than the output")
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] != channels:
        raise Declined(f"constant of shape {list(value.shape)} is not one value per output channel")
    return value.reshape(-1)


def fold_affine(model: QModel, layer: Node, node: Node, c: np.ndarray) -> None:
    """Fold ``layer(x) ∘ c`` into the layer's parameters and remove `node`."""
    if layer.op == "BatchNormalization":
        gamma, beta = layer.inputs[1], layer.inputs[2]
        if node.op in ("Mul", "Div"):
            factor = c if node.op == "Mul" else 1.0 / c
            _set(model, layer, 1, np.asarray(model.constant_value(gamma), np.float64) * factor)
            _set(model, layer, 2, np.asarray(model.constant_value(beta), np.float64) * factor)
        else:
            shift = c if node.op == "Add" else -c
            _set(model, layer, 2, np.asarray(model.constant_value(beta), np.float64) + shift)
    else:
        weight = np.asarray(model.constant_value(layer.inputs[1]))
        channels = out_channels(layer, weight.shape)
        has_bias = len(layer.inputs) > 2 and layer.inputs[2].name
        bias = np.asarray(model.constant_value(layer.inputs[2]), np.float64).reshape(-1) if has_bias \
            else np.zeros(channels)
        bias = np.broadcast_to(bias, (channels,)).astype(np.float64)
        if node.op in ("Mul", "Div"):
            factor = c if node.op == "Mul" else 1.0 / c
            view, scale_shape = grouped_view(layer, weight.shape)
            scaled = (weight.astype(np.float64).reshape(view) * factor.reshape(scale_shape)).reshape(weight.shape)
            _set(model, layer, 1, scaled, weight.dtype)
            bias = bias * factor
        else:
            bias = bias + (c if node.op == "Add" else -c)
        if has_bias:
            _set(model, layer, 2, bias, weight.dtype)
        else:
            layer.inputs.append(model.add_constant(f"{layer.name}.bias", bias.astype(weight.dtype)))
    out = node.outputs[0]
    node.outputs.clear()             # the affine node goes; the layer now writes its output
    layer.outputs[0] = out


def _set(model: QModel, layer: Node, index: int, value: np.ndarray, dtype=np.float32) -> None:
    """Input `index` of `layer` holds `value`: in place when only this layer reads it, else a copy."""
    tensor = layer.inputs[index]
    value = np.asarray(value).astype(dtype)
    if isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1 and not model.is_graph_output(tensor):
        tensor.values = value.reshape(tensor.values.shape)
        return
    old = np.asarray(model.constant_value(tensor))
    layer.inputs[index] = model.add_constant(f"{tensor.name}_folded", value.reshape(old.shape))


# -- driver --------------------------------------------------------------------------------------

def normalize_exporter_idioms(model: QModel) -> dict:
    """Apply every rewrite of this module until none applies; returns counts and skip entries."""
    counts = {"layernorm": 0, "softmax": 0, "affine": 0, "sum": 0, "global_pool": 0, "pixel_shuffle": 0}
    skipped: list[dict] = []

    def each(ops, rewrite, key, reported=(), label=""):
        """`rewrite(model, node)` on every node of `ops`; a `reported` exception is a skip entry,
        any other Declined (the node is no such idiom) passes quietly."""
        for node in list(model.graph.nodes):
            if node.op not in ops or not node.outputs:
                continue
            try:
                rewrite(model, node)
                counts[key] += 1
            except reported as exc:
                skipped.append(skip(node, f"{label}{getattr(exc, 'reason', exc)}"))
            except Declined:
                pass
        model.cleanup()

    each(("DepthToSpace", "SpaceToDepth"), pixel_shuffle_as_transpose, "pixel_shuffle", (Declined,))
    each(("Sum",), sum_as_adds, "sum", (PassError,), "Sum as Adds: ")
    each(("ReduceMean",), lambda m, n: fuse_layernorm(m, match_layernorm(m, n)), "layernorm", (Unfusable,))
    each(("ReduceMean",), spatial_mean_as_global_pool, "global_pool")
    each(("Exp",), lambda m, n: fuse_softmax(m, match_softmax(m, n)), "softmax")
    for layer in list(model.graph.nodes):
        if layer.op not in AFFINE_LAYERS or not layer.outputs:
            continue
        while True:
            try:
                node, c = match_affine(model, layer)
            except Declined as declined:
                if "exactly one" not in declined.reason and "no constant operand" not in declined.reason:
                    skipped.append(skip(layer, f"affine folding: {declined.reason}"))
                break
            fold_affine(model, layer, node, c)
            counts["affine"] += 1
    model.cleanup()
    return {"counts": counts, "skipped": skipped}


__all__ = ["normalize_exporter_idioms", "sum_as_adds", "spatial_mean_as_global_pool", "pixel_shuffle_as_transpose",
           "match_layernorm", "fuse_layernorm", "match_moments_layernorm", "match_keras_layernorm",
           "match_batch_stats_layernorm", "written_out_layernorms", "match_softmax", "fuse_softmax",
           "match_affine", "fold_affine", "LAYERS"]
