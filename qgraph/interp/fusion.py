"""Plan-level fusion: node chains that a compiled plan runs as one step, because nobody sees their
intermediate tensors (each has one consumer inside the chain and is not requested). A fused step
computes exactly the chain's outputs, bit for bit; where its fast path does not apply (an input
type it was not written for) it runs the chain's own kernels one after the other.

Lowered lookup table (a unary activation on 8-bit codes, ``qlinear`` target):

    t = Transpose(x, p)   i = Cast(Flatten(t), int)   r = GatherElements(T, i)   (T: one row)
    y = Transpose(Reshape(r, Shape(t)), p⁻¹)

is ``y = T.ravel()[x]``: a lookup is elementwise, so it commutes with the layout changes, and
p⁻¹ undoes p. On 8-bit codes the lookup runs over pairs of codes, one uint16 index per two
bytes into a 65536-entry table of pairs (128 KiB, in L2): half the index conversions and reads
of a plain ``np.take``, and none of the chain's two transposes and int64 copy.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from qgraph.interp.registry import NodeContext


class Item(NamedTuple):
    """One step of a schedule before its frees are known: ``kernel(ctx, *inputs) -> outputs``."""
    kernel: Callable
    ctx: NodeContext
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def fuse(items: list[Item], wanted, call) -> list[Item]:
    """``items`` with every fusable chain replaced by one item; ``wanted`` tensors are never
    hidden inside a chain. ``call(kernel, ctx, args) -> tuple`` runs one kernel (the fallback)."""
    consumers: dict[str, list[int]] = {}
    for k, it in enumerate(items):
        for t in it.inputs:
            if t:
                consumers.setdefault(t, []).append(k)
    producer = {t: k for k, it in enumerate(items) for t in it.outputs if t}
    hidden = set(wanted)
    replaced: dict[int, Item | None] = {}
    for k, it in enumerate(items):
        if it.ctx.node.op_type == "GatherElements" and k not in replaced:
            chain = _lookup_chain(items, k, consumers, producer, hidden)
            if chain is not None:
                members, fused = chain
                if not any(m in replaced for m in members):
                    for m in members:
                        replaced[m] = None
                    replaced[members[-1]] = _lookup_item(items, members, fused, call)
    out = []
    for k, it in enumerate(items):
        if k not in replaced:
            out.append(it)
        elif replaced[k] is not None:
            out.append(replaced[k])
    return out


def _only_consumers(t: str, consumers, expected: set[int], hidden) -> bool:
    return t not in hidden and set(consumers.get(t, ())) == expected and len(consumers.get(t, ())) == len(expected)


def _lookup_chain(items, g, consumers, producer, hidden):
    """(member indices in schedule order, (x, table, y)) of the lookup chain around the
    GatherElements item ``g``, or None."""
    gather = items[g]
    table, index = gather.inputs[:2]
    if not gather.ctx.is_const(0) or len(gather.inputs) != 2:
        return None
    cast = items[producer[index]] if index in producer else None
    if cast is None or cast.ctx.node.op_type != "Cast" or cast.ctx.attr("to") not in (6, 7):  # int32, int64
        return None
    flat = items[producer[cast.inputs[0]]] if cast.inputs[0] in producer else None
    if flat is None or flat.ctx.node.op_type != "Flatten":
        return None
    first = items[producer[flat.inputs[0]]] if flat.inputs[0] in producer else None
    if first is None or first.ctx.node.op_type != "Transpose" or first.ctx.attr("perm") is None:
        return None
    users = consumers.get(gather.outputs[0], [])
    if len(users) != 1 or items[users[0]].ctx.node.op_type != "Reshape":
        return None
    reshape = items[users[0]]
    shape_item = items[producer[reshape.inputs[1]]] if reshape.inputs[1] in producer else None
    if (shape_item is None or shape_item.ctx.node.op_type != "Shape" or shape_item.inputs[0] != first.outputs[0]
            or shape_item.ctx.attrs.get("start") is not None or shape_item.ctx.attrs.get("end") is not None):
        return None
    users = consumers.get(reshape.outputs[0], [])
    if len(users) != 1 or items[users[0]].ctx.node.op_type != "Transpose":
        return None
    last = items[users[0]]
    p, q = list(first.ctx.attr("perm")), last.ctx.attr("perm")
    if q is None or len(q) != len(p) or any(p[q[i]] != i for i in range(len(p))):
        return None
    ix = {name: producer[name] for name in (first.outputs[0], flat.outputs[0], shape_item.outputs[0],
                                            cast.outputs[0], gather.outputs[0], reshape.outputs[0])}
    k_first, k_flat, k_shape, k_cast = (ix[first.outputs[0]], ix[flat.outputs[0]], ix[shape_item.outputs[0]],
                                        ix[cast.outputs[0]])
    k_reshape, k_last = ix[reshape.outputs[0]], users[0]
    checks = [(first.outputs[0], {k_flat, k_shape}), (flat.outputs[0], {k_cast}), (cast.outputs[0], {g}),
              (shape_item.outputs[0], {k_reshape}), (gather.outputs[0], {k_reshape}),
              (reshape.outputs[0], {k_last})]
    if not all(_only_consumers(t, consumers, ks, hidden) for t, ks in checks):
        return None
    members = sorted({k_first, k_flat, k_shape, k_cast, g, k_reshape, k_last})
    return members, (first.inputs[0], table, last.outputs[0])


def _lookup_item(items, members, fused, call) -> Item:
    x_name, table_name, y_name = fused
    chain = [items[m] for m in members]
    gather_ctx = next(it.ctx for it in chain if it.ctx.node.op_type == "GatherElements")

    def run_chain(x, table):
        values = {x_name: x, table_name: table}
        for it in chain:
            res = call(it.kernel, it.ctx, [values[t] if t else None for t in it.inputs])
            values.update(zip(it.outputs, res))
        return values[y_name]

    def lookup(ctx, x, table):
        if x.dtype.itemsize != 1 or x.dtype.kind not in "iu" or table.dtype.itemsize != 1:
            return run_chain(x, table)
        pairs = ctx.once(("pairs", x.dtype.str), lambda: _pair_table(table.reshape(-1), x.dtype), 0)
        if pairs is False or x.size % 2 or not x.flags.c_contiguous:
            return run_chain(x, table)
        return np.take(pairs, x.reshape(-1).view(np.uint16)).view(table.dtype).reshape(x.shape)

    return Item(lookup, gather_ctx, (x_name, table_name), (y_name,))


def _pair_table(table: np.ndarray, code_dtype) -> np.ndarray | bool:
    """The table of two codes at once: entry ``u`` (the uint16 whose bytes are codes a, b) holds
    the bytes ``table[a], table[b]``; False when some code of ``code_dtype`` is not a valid index
    (then the chain's own kernels run, and raise GatherElements' error if such a code occurs)."""
    codes = np.arange(256, dtype=np.uint8).view(code_dtype)
    n = table.size
    if codes.min() < -n or codes.max() >= n:
        return False
    single = np.take(table, codes.astype(np.int64))  # by code bits: single[b] = table[code with bits b]
    byte_pairs = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    return np.ascontiguousarray(single[byte_pairs]).view(np.uint16).reshape(-1)
