"""Unary functions of one quantized tensor as 256-entry lookup tables: exact by construction.

For an input grid with codes q ∈ [qmin, qmax] and an output grid Q_out,

    table[q − qmin] = Q_out(f(DQ_in(q)))          y_q = table[x_q − qmin]   (Cast, GatherElements)

where f is computed by ONNX Runtime's own float kernels on the subgraph that defines it — one
op (Tanh, HardSwish, ...) or a whole unary region as exported (idioms.unary_regions: HardSwish
as x·Clip(x+3, 0, 6)/6, SiLU as x·Sigmoid(x), GELU with Erf). The table reproduces exactly what
the QDQ model computes for every possible input code, so lowering adds no error at all.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from qgraph import quant
from qgraph.graph import QModel
from qgraph.idioms import Declined, UnaryRegion, evaluate_function
from qgraph.lowering.patterns import DEQUANTIZE, QUANTIZE, QInput, Quantizer, const, read_quantizer, var


def function_table(model: QModel, nodes: list[gs.Node], x: str, y: str, in_q: Quantizer,
                   out_q: Quantizer) -> np.ndarray:
    """``Q_out(f(DQ_in(q)))`` for every code q of `in_q`'s storage type, f being `nodes` (from
    tensor `x` to tensor `y`) run by ORT (idioms.evaluate_function)."""
    return out_q.quantize(evaluate_function(nodes, x, y, in_q.dequantize(quant.all_codes(in_q.dtype))))


def emit_table(model: QModel, x: QInput, table: np.ndarray, out: gs.Tensor, name: str,
               channels_last: bool = False) -> None:
    """``out = table[x − qmin]`` on the integer tensor of `x`: the codes as one int32 row, a
    GatherElements on the table as a [1, 256] row, reshaped back to x's shape (a constant one
    where shape inference knows every dim but the batch: reshape_back).

    Not Gather: ORT 1.19's Gather copies each element with its own memcpy (1.5 ms on a
    16×160×160 uint8 map, one thread), GatherElements runs a typed loop (0.45 ms with the Cast,
    Flatten and Reshape). Codes index the table directly, int8 ones as negative indices (which
    count from the end): the table is stored rotated so that index q mod 256 holds code q.

    ``channels_last`` (4-D maps): the lookup runs between a Transpose to NHWC and one back.
    An elementwise function does not care about the layout, and ORT, which runs QLinearConv in
    NHWC between Transposes of its own, cancels them against these: without, ORT could not move
    its Transposes across the Flatten and Reshape, and kept two around every convolution
    (YOLOv8n: 112 Transposes, and its MaxPools stayed NCHW, 50x slower than NhwcMaxPool)."""
    rotated = np.roll(np.asarray(table), x.quantizer.qmin)   # index q − qmin → q mod 256

    def lookup(codes: gs.Tensor) -> gs.Tensor:
        index = var(model, f"{name}_index", np.int32)
        model.add_node("Cast", [codes], [index], f"{name}_cast", {"to": TensorProto.INT32})
        looked_up = var(model, f"{name}_row", table.dtype)
        model.add_node("GatherElements", [const(model, f"{name}_table", rotated.reshape(1, -1)), index],
                       [looked_up], name, {"axis": 1})
        return looked_up

    emit_on_code_row(model, x, out, table.dtype, name, channels_last, lookup)


def emit_channel_tables(model: QModel, x: QInput, tables: np.ndarray, out: gs.Tensor, name: str) -> None:
    """``out[n, c, …] = tables[c, x[n, c, …] − qmin]`` on an NCHW-style map of codes: the codes as
    int32 plus ``256·c − qmin`` for their channel, one GatherElements on the tables as one
    [1, C·256] row, reshaped back (reshape_back; a per-channel function such as PRelu's)."""
    channels = tables.shape[0]
    rank = len(x.tensor.shape)
    offsets = (np.arange(channels, dtype=np.int32) * 256 - x.quantizer.qmin).reshape((1, channels) + (1,) * (rank - 2))
    wide = var(model, f"{name}_codes", np.int32)
    model.add_node("Cast", [x.tensor], [wide], f"{name}_cast", {"to": TensorProto.INT32})
    index = var(model, f"{name}_index", np.int32)
    model.add_node("Add", [wide, const(model, f"{name}_offsets", offsets)], [index], f"{name}_offset")
    flat = var(model, f"{name}_flat", np.int32)
    model.add_node("Flatten", [index], [flat], f"{name}_flatten", {"axis": 0})
    looked_up = var(model, f"{name}_row", tables.dtype)
    model.add_node("GatherElements", [const(model, f"{name}_tables", tables.reshape(1, -1)), flat], [looked_up],
                   name, {"axis": 1})
    reshape_back(model, looked_up, out, x.tensor.shape, x.tensor, name)


def emit_on_code_row(model: QModel, x: QInput, out: gs.Tensor, out_dtype, name: str, channels_last: bool,
                     row) -> None:
    """``out`` = an elementwise computation on `x`'s codes flattened to one row: ``row(codes)``
    emits it and returns its result row, which is reshaped back to x's shape (reshape_back).
    ``channels_last`` (4-D maps): between a Transpose to NHWC and one back, which ORT cancels
    against its NHWC QLinearConv's (emit_table); the Flatten and Reshape keep ORT's first pass
    from cancelling them earlier."""
    final, x_shape, codes_of = out, x.tensor.shape, x.tensor
    if channels_last:
        codes_of = var(model, f"{name}_nhwc", x.quantizer.dtype)
        model.add_node("Transpose", [x.tensor], [codes_of], f"{name}_to_nhwc", {"perm": [0, 2, 3, 1]})
        out = var(model, f"{name}_looked_up_nhwc", out_dtype)
        # the row holds the NHWC map
        x_shape = [x_shape[i] for i in (0, 2, 3, 1)] if x_shape is not None and len(x_shape) == 4 else None
    codes = var(model, f"{name}_codes", x.quantizer.dtype)
    model.add_node("Flatten", [codes_of], [codes], f"{name}_flat", {"axis": 0})
    reshape_back(model, row(codes), out, x_shape, codes_of, name)
    if channels_last:
        model.add_node("Transpose", [out], [final], f"{name}_to_nchw", {"perm": [0, 3, 1, 2]})


def emit_pair_table(model: QModel, a: QInput, b: QInput, table: np.ndarray, out: gs.Tensor, name: str) -> None:
    """``out = table[a, b]`` for two uint8 code tensors, broadcasting as an elementwise op does: the
    index ``256·a + b`` in int32, one GatherElements on the table as a [1, 65536] row, reshaped to
    the broadcast shape. The ×256 goes to the operand with fewer elements when the shapes say so
    (an SE block's per-channel scale). Exact by construction, like the 256-entry tables; a binary
    rule in five int32 passes where its arithmetic took nine or more, several of them int64."""
    table = np.asarray(table)
    if table.shape != (256, 256) or a.quantizer.dtype != np.uint8 or b.quantizer.dtype != np.uint8:
        raise ValueError("emit_pair_table: a 256×256 table of two uint8 code tensors")
    if _known_size(b.tensor) < _known_size(a.tensor):
        a, b, table = b, a, table.T
    wide = []
    for label, x in (("major", a), ("minor", b)):
        w = var(model, f"{name}_{label}", np.int32)
        model.add_node("Cast", [x.tensor], [w], f"{name}_{label}_cast", {"to": TensorProto.INT32})
        wide.append(w)
    major = var(model, f"{name}_major_256", np.int32)
    model.add_node("Mul", [wide[0], const(model, f"{name}_256", np.int32(256))], [major], f"{name}_major_256")
    index = var(model, f"{name}_index", np.int32)
    model.add_node("Add", [major, wide[1]], [index], f"{name}_index")
    row = var(model, f"{name}_index_row", np.int32)
    model.add_node("Reshape", [index, const(model, f"{name}_row_shape", np.array([1, -1], np.int64))], [row],
                   f"{name}_index_row")
    looked_up = var(model, f"{name}_row", table.dtype)
    model.add_node("GatherElements", [const(model, f"{name}_table", np.ascontiguousarray(table).reshape(1, -1)), row],
                   [looked_up], name, {"axis": 1})
    reshape_back(model, looked_up, out, _broadcast_shape(a.tensor.shape, b.tensor.shape), index, name)


def reshape_back(model: QModel, row: gs.Tensor, out: gs.Tensor, shape, like: gs.Tensor, name: str) -> None:
    """``out = Reshape(row)`` to `shape`, the looked-up tensor's inferred shape: a constant target
    where every dim but the first is known (the first as -1: any batch), else ``Shape(like)`` at
    run time. A constant saves ORT a node per table (pplcnet_textdir's 30 Shape nodes: 2-3% of
    its run time at batch 1 and 8, one thread)."""
    target = static_reshape_target(shape)
    if target is not None:
        model.add_node("Reshape", [row, const(model, f"{name}_shape", target)], [out], f"{name}_reshape")
        return
    dynamic = var(model, f"{name}_shape", np.int64)
    model.add_node("Shape", [like], [dynamic], f"{name}_shape")
    model.add_node("Reshape", [row, dynamic], [out], f"{name}_reshape")


def static_reshape_target(shape) -> np.ndarray | None:
    """`shape` as a Reshape target when every dim but the first is a known positive size: the first
    as itself when known, else -1 (Reshape infers it from the element count); None otherwise."""
    if shape is None or len(shape) == 0 or not all(_is_size(d) for d in shape[1:]):
        return None
    return np.array([int(shape[0]) if _is_size(shape[0]) else -1, *(int(d) for d in shape[1:])], np.int64)


def _is_size(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim > 0


def _broadcast_shape(a, b) -> list | None:
    """The shape two elementwise operands broadcast to, where the inferred shapes fix it: equal
    shapes (a named batch dim included: the same name is the same size), or known sizes; else None."""
    if a is None or b is None:
        return None
    if list(a) == list(b) and (len(a) == 0 or _is_size(a[0]) or isinstance(a[0], str)):
        return list(a)
    if all(_is_size(d) for d in (*a, *b)):
        try:
            return list(np.broadcast_shapes(tuple(a), tuple(b)))
        except ValueError:
            return None
    return None


def _known_size(tensor: gs.Tensor) -> float:
    """The element count of a statically shaped tensor, else infinity."""
    shape = tensor.shape
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return float("inf")
    return float(np.prod(shape))


def is_map(tensor: gs.Tensor) -> bool:
    """A tensor of rank 4 (N, C, H, W): where a channels-last table applies."""
    return tensor.shape is not None and len(tensor.shape) == 4


def lower_region(model: QModel, region: UnaryRegion, channels_last: bool = False, emit_other=None) -> str:
    """Replace ``DQ(x_q) → [region] → Q → y_q`` by one table on x_q (see emit_table for
    `channels_last`), or by the form ``emit_other(model, x, table, out_q, out, name, kind)`` emits
    when it returns a label (a target's faster form, exact for every code of the table); returns
    "table" or that label. Declined when the region is not between a per-tensor DequantizeLinear
    and a single per-tensor QuantizeLinear."""
    tensors = model.tensors()
    x, y = tensors[region.input], tensors[region.output]
    dq = model.producer(x)
    if dq is None or dq.op != DEQUANTIZE:
        raise Declined(f"the input '{x.name}' of the {region.kind} is not dequantized")
    in_q = read_quantizer(dq)
    readers = list(y.outputs)
    if model.is_graph_output(y) or len(readers) != 1 or readers[0].op != QUANTIZE:
        raise Declined(f"the output '{y.name}' of the {region.kind} is not read by exactly one QuantizeLinear")
    q = readers[0]
    out_q = read_quantizer(q)
    if in_q is None or out_q is None or in_q.per_channel or out_q.per_channel:
        raise Declined(f"the {region.kind} needs constant per-tensor quantizers on both sides")
    nodes = [n for n in model.graph.nodes if n.name in set(region.nodes)]
    table = function_table(model, nodes, x.name, y.name, in_q, out_q)
    out = q.outputs[0]
    q.outputs.clear()
    for node in nodes:
        node.outputs.clear()
    codes = QInput(dq.inputs[0], in_q)
    name = f"{region.nodes[-1]}_{region.kind}"
    label = emit_other(model, codes, table, out_q, out, name, region.kind) if emit_other is not None else None
    if label:
        return label
    emit_table(model, codes, table, out, f"{name}_table", channels_last and is_map(x))
    return "table"


#: ops that move codes without reading their values (a Shape reader reads none either)
CODE_MOVES = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Identity")


def table_behind(model: QModel, tensor: gs.Tensor) -> tuple[gs.Constant, list[gs.Tensor]] | None:
    """The 256-entry table constant whose lookup alone writes `tensor`'s codes (emit_table's
    GatherElements, then only CODE_MOVES), with the tensors from the lookup to `tensor`; None
    unless each of them is read by the next step alone (or by Shape) and is no graph output, so
    that rewriting the table's entries changes `tensor` and nothing else."""
    chain, t = [], tensor
    while True:
        if model.is_graph_output(t) or len([r for r in t.outputs if r.op != "Shape"]) != 1:
            return None
        chain.append(t)
        node = model.producer(t)
        if node is None or node.op not in CODE_MOVES + ("GatherElements",):
            return None
        if node.op == "GatherElements":
            table = node.inputs[0]
            if not isinstance(table, gs.Constant) or np.asarray(table.values).size != 256 or len(table.outputs) != 1:
                return None
            return table, chain
        t = node.inputs[0]
