"""Plan-level fusion: node chains that a compiled plan runs as one step. A fused step computes
exactly the tensors the chain hands on (read by other nodes, or requested), bit for bit; where
its fast path does not apply (an input type it was not written for) it runs the chain's own
kernels one after the other.

Lowered lookup table (a unary activation on 8-bit codes, ``qlinear`` target), its intermediate
tensors read by the chain only:

    t = Transpose(x, p)   i = Cast(Flatten(t), int)   r = GatherElements(T, i)   (T: one row)
    y = Transpose(Reshape(r, Shape(t)), p⁻¹)        (or Reshape(r, S), S a constant t's shape resolves to)

is ``y = T.ravel()[x]``: a lookup is elementwise, so it commutes with the layout changes, and
p⁻¹ undoes p. On 8-bit codes the lookup runs over pairs of codes (:mod:`qgraph.interp.codes`),
without the chain's two transposes and int64 copy.

Elementwise region of codes (QDQ models): every tensor computed elementwise from one per-tensor
DequantizeLinear of 8-bit codes x and one-element constants is ``f(x)``, one of 256 values; the
region's ops run once on the 256 codes, by their own kernels, and each tensor the region hands
on is a lookup (:func:`_fuse_code_regions`).

Elementwise region of an integer tensor (a dynamically quantized model's conv epilogue
``Cast(acc + bias) · scale → Sigmoid → Mul``): every tensor computed elementwise from
``Cast(n)`` (n integer, at least 16-bit) and one-element tensors is ``f(n)``; when the values
present in n are few next to its size, the region's ops run once per distinct value, by their
own kernels, and each tensor it hands on is a lookup (:func:`_fuse_integer_regions`).

Float chain (an exported HardSwish ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``, a bias Add and
its Relu): each op after the first writes into the buffer the previous one allocated, the same
ufunc on the same operands in the same order (:func:`_fuse_inplace_chains`).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy as np

from qgraph.interp.codes import code_values, lookup_pairs, pair_table, pairs_apply
from qgraph.interp.registry import NodeContext


class Item(NamedTuple):
    """One step of a schedule before its frees are known: ``kernel(ctx, *inputs) -> outputs``."""
    kernel: Callable
    ctx: NodeContext
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def fuse(items: list[Item], wanted, call, constants: dict[str, np.ndarray]) -> list[Item]:
    """``items`` with every fusable chain replaced by one item; ``wanted`` tensors are never
    hidden inside a chain. ``call(kernel, ctx, args) -> tuple`` runs one kernel (the fallback);
    ``constants``: the plan's constant tensors (no feed overrides them)."""
    items = _fuse_code_regions(items, wanted, call, constants)
    items = _fuse_integer_regions(items, wanted, call, constants)
    items = _fuse_inplace_chains(items, wanted, call, constants)
    consumers = _readers(items)
    producer = {t: k for k, it in enumerate(items) for t in it.outputs if t}
    hidden = set(wanted)
    used: set[int] = set()
    fused_at: dict[int, Item] = {}
    for k, it in enumerate(items):
        if it.ctx.node.op_type == "GatherElements" and k not in used:
            chain = _lookup_chain(items, k, consumers, producer, hidden, constants)
            if chain is not None:
                members, fused = chain
                if not any(m in used for m in members):
                    used.update(members)
                    fused_at[members[-1]] = _lookup_item(items, members, fused, call)
    return _spliced(items, fused_at, used)


def _only_consumers(t: str, consumers, expected: set[int], hidden) -> bool:
    return t not in hidden and set(consumers.get(t, ())) == expected and len(consumers.get(t, ())) == len(expected)


def _lookup_chain(items, g, consumers, producer, hidden, constants):
    """(member indices in schedule order, (x, table, y, fixed dims of a constant Reshape target or
    None, that target by name)) of the lookup chain around the GatherElements item ``g``, or None."""
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
    p = list(first.ctx.attr("perm"))
    target = None          # a constant target: the (axis of x, size) it fixes, checked at run time
    if shape_item is None and reshape.inputs[1] in constants:
        if (target := _fixed_dims(constants[reshape.inputs[1]], p)) is None:
            return None
    elif (shape_item is None or shape_item.ctx.node.op_type != "Shape" or shape_item.inputs[0] != first.outputs[0]
            or shape_item.ctx.attrs.get("start") is not None or shape_item.ctx.attrs.get("end") is not None):
        return None
    users = consumers.get(reshape.outputs[0], [])
    if len(users) != 1 or items[users[0]].ctx.node.op_type != "Transpose":
        return None
    last = items[users[0]]
    q = last.ctx.attr("perm")
    if q is None or len(q) != len(p) or any(p[q[i]] != i for i in range(len(p))):
        return None
    k_first, k_flat, k_cast = (producer[t] for t in (first.outputs[0], flat.outputs[0], cast.outputs[0]))
    k_reshape, k_last = producer[reshape.outputs[0]], users[0]
    members = {k_first, k_flat, k_cast, g, k_reshape, k_last}
    checks = [(first.outputs[0], {k_flat}), (flat.outputs[0], {k_cast}), (cast.outputs[0], {g}),
              (gather.outputs[0], {k_reshape}), (reshape.outputs[0], {k_last})]
    if target is None:     # the Shape node is in the chain too
        k_shape = producer[shape_item.outputs[0]]
        members.add(k_shape)
        checks[0] = (first.outputs[0], {k_flat, k_shape})
        checks.append((shape_item.outputs[0], {k_reshape}))
    if not all(_only_consumers(t, consumers, ks, hidden) for t, ks in checks):
        return None
    given = {} if target is None else {reshape.inputs[1]: constants[reshape.inputs[1]]}
    return sorted(members), (first.inputs[0], table, last.outputs[0], target, given)


def _lookup_item(items, members, fused, call) -> Item:
    x_name, table_name, y_name, target, given = fused     # given: the constant Reshape target, for run_chain
    chain = [items[m] for m in members]
    gather_ctx = next(it.ctx for it in chain if it.ctx.node.op_type == "GatherElements")

    @functools.lru_cache(maxsize=8)
    def restores(shape: tuple[int, ...]) -> bool:
        return all(shape[axis] == size for axis, size in target)

    def run_chain(x, table):
        values = {x_name: x, table_name: table, **given}
        for it in chain:
            res = call(it.kernel, it.ctx, [values[t] if t else None for t in it.inputs])
            values.update(zip(it.outputs, res))
        return values[y_name]

    def lookup(ctx, x, table):
        if not pairs_apply(x) or table.dtype.itemsize not in (1, 2, 4) or \
                (target is not None and not restores(x.shape)):
            return run_chain(x, table)
        pairs = ctx.once(("pairs", x.dtype.str), lambda: _pairs_of(table.reshape(-1), x.dtype), 0)
        if pairs is None:
            return run_chain(x, table)
        return lookup_pairs(pairs, x, table.dtype)

    return Item(lookup, gather_ctx, (x_name, table_name), (y_name,))


def _fixed_dims(target, perm: list[int]) -> list[tuple[int, int]] | None:
    """For a Reshape to the constant `target` after a Transpose by `perm`: the (axis of x, size)
    pairs it fixes, its one -1 left out (it then infers that dim itself); None when the target
    is not such a shape (a 0 that copies a dim, several -1): the chain is then not fused."""
    target = np.asarray(target)
    if target.ndim != 1 or len(target) != len(perm) or np.any(target == 0) or np.count_nonzero(target == -1) > 1:
        return None
    return [(perm[i], int(t)) for i, t in enumerate(target.tolist()) if t != -1]


def _pairs_of(table: np.ndarray, code_dtype) -> np.ndarray | None:
    """The pair table of ``table`` read at every code of ``code_dtype``; None when some code is
    not a valid index (then the chain's own kernels run, and raise GatherElements' error if such
    a code occurs)."""
    codes = code_values(code_dtype)
    n = table.size
    if codes.min() < -n or codes.max() >= n:
        return None
    return pair_table(np.take(table, codes.astype(np.int64)))


#: Ops computing each output element from the same-position elements of their inputs alone.
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Neg", "Abs", "Reciprocal", "Sqrt", "Exp", "Log",
               "Floor", "Ceil", "Round", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Erf",
               "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Gelu",
               "Cast", "Identity", "QuantizeLinear", "DequantizeLinear"}


def _fuse_code_regions(items, wanted, call, constants) -> list[Item]:
    """Each elementwise region of 8-bit codes as one lookup per tensor it hands on: from a
    per-tensor DequantizeLinear of codes x, every later op of :data:`ELEMENTWISE` whose inputs are
    the region's tensors or one-element constants computes ``f(x)`` elementwise, one of 256
    values. A QDQ model's GELU (DequantizeLinear, Div, Erf, Add, Mul, Mul, QuantizeLinear) or
    SiLU so becomes one lookup of its output codes, the float ops evaluated once on the 256 codes
    by their own kernels (bit for bit what they compute on the tensor: each output element
    depends on its own input element only). The region's tensors that other nodes read, or that
    are requested, are its outputs; it runs where its DequantizeLinear ran, its only input being
    ready there."""
    readers = _readers(items)
    used: set[int] = set()
    fused_at: dict[int, Item] = {}
    for k, it in enumerate(items):
        if k in used or it.ctx.node.op_type != "DequantizeLinear" or not _scalar_const(it.inputs[1:], constants):
            continue
        members, tensors = [k], set(it.outputs[:1])
        for j in range(k + 1, len(items)):
            other = items[j]
            if j in used or other.ctx.node.op_type not in ELEMENTWISE or not other.inputs:
                continue
            ins = [t for t in other.inputs if t]
            if any(t in tensors for t in ins) and all(t in tensors or _scalar_const((t,), constants) for t in ins):
                members.append(j)
                tensors.update(t for t in other.outputs if t)
        if len(members) < 2:
            continue
        inside = set(members)
        exits = [t for t in _ordered_outputs(items, members) if t in wanted or set(readers.get(t, ())) - inside]
        if not exits:
            continue
        used.update(members)
        fused_at[k] = _region_item(items, members, it.inputs[0], exits, constants, call)
    return _spliced(items, fused_at, used)


def _readers(items) -> dict[str, list[int]]:
    """Tensor name → the indices of the items that read it, in plan order."""
    readers: dict[str, list[int]] = {}
    for k, it in enumerate(items):
        for t in it.inputs:
            if t:
                readers.setdefault(t, []).append(k)
    return readers


def _spliced(items, fused_at: dict, used: set[int]) -> list:
    """The plan with each fused step at its index in `fused_at` and the items it absorbed (`used`) dropped."""
    return [fused_at[k] if k in fused_at else it for k, it in enumerate(items) if k in fused_at or k not in used]


def _scalar_const(names, constants) -> bool:
    """Whether every non-empty name is a one-element plan constant."""
    return all(not t or (t in constants and np.size(constants[t]) == 1) for t in names)


def _ordered_outputs(items, members) -> list[str]:
    return [t for m in members for t in items[m].outputs if t]


def _region_item(items, members, root: str, exits: list[str], constants, call) -> Item:
    region = [items[m] for m in members]
    tables: dict = {}

    def run_region(x):
        values = {root: x}
        for it in region:
            args = [None if not t else values[t] if t in values else constants[t] for t in it.inputs]
            values.update(zip(it.outputs, call(it.kernel, it.ctx, args)))
        return values

    def build(dtype):
        with np.errstate(all="ignore"):
            values = run_region(code_values(dtype))
        out = []
        for t in exits:
            v = np.asarray(values[t])
            if v.size != 256:
                return None
            table = np.ascontiguousarray(v.reshape(-1))
            out.append((table, pair_table(table) if table.dtype.itemsize in (1, 2, 4) else None, v.ndim))
        return out

    def lookup(ctx, x):
        if x.dtype.itemsize != 1 or x.dtype.kind not in "iu":
            return tuple(run_region(x)[t] for t in exits)
        if x.dtype.str not in tables:
            tables[x.dtype.str] = build(x.dtype)
        built = tables[x.dtype.str]
        if built is None:
            return tuple(run_region(x)[t] for t in exits)
        res = []
        for table, pairs, ndim in built:
            shape = (1,) * (ndim - x.ndim) + x.shape
            if pairs is not None and pairs_apply(x):
                res.append(lookup_pairs(pairs, x, table.dtype).reshape(shape))
            else:
                res.append(np.take(table, x.view(np.uint8)).reshape(shape))
        return tuple(res)

    return Item(lookup, region[0].ctx, (root,), tuple(exits))


#: Region ops whose cost per element dwarfs a table lookup (MLAS rational approximations, libm
#: calls); a region without one is cheaper run directly than through a table.
COSTLY = {"Sigmoid", "Tanh", "Erf", "Exp", "Log", "Pow", "Softplus", "Mish", "Gelu", "Elu", "Selu", "Celu"}
#: Integer regions run through a table only on tensors of at least this many elements, whose value
#: span is at most _SPAN_PER_ELEMENT times their size (the occupancy array stays small).
_TABLE_MIN_SIZE, _SPAN_PER_ELEMENT = 4096, 4


def _scalar_tensors(items, constants) -> set[str]:
    """Names of the tensors known before running to hold one element: one-element constants, a
    DynamicQuantizeLinear's scale and zero point, and elementwise results of those."""
    scalars = {t for t, a in constants.items() if np.size(a) == 1}
    for it in items:
        op = it.ctx.node.op_type
        if op == "DynamicQuantizeLinear":
            scalars.update(t for t in it.outputs[1:] if t)
        elif op in ELEMENTWISE and it.inputs and all(t in scalars for t in it.inputs if t):
            scalars.update(t for t in it.outputs if t)
    return scalars


def _fuse_integer_regions(items, wanted, call, constants) -> list[Item]:
    """Each elementwise region that starts with a Cast of a (non-scalar) tensor and holds a
    :data:`COSTLY` op, as one step: from the Cast, every later op of :data:`ELEMENTWISE` that reads
    a non-scalar tensor of the region and otherwise only region tensors or one-element tensors
    joins, and so does a DynamicQuantizeLinear of a region tensor (its codes are elementwise once
    its scale and zero point are known, and those depend only on the set of values present). The
    step runs where the region's last op ran (its one-element inputs are ready there), provided
    nothing outside reads a region tensor earlier; at run time it goes through a table when the
    Cast's input is an integer tensor with few distinct values (:func:`_integer_region_item`),
    else it runs the ops one by one."""
    scalars = _scalar_tensors(items, constants)
    readers = _readers(items)
    used: set[int] = set()
    fused_at: dict[int, Item] = {}
    for k, it in enumerate(items):
        if k in used or it.ctx.node.op_type != "Cast" or not it.inputs or it.inputs[0] in scalars:
            continue
        members, tensors = [k], {it.outputs[0]}
        for j in range(k + 1, len(items)):
            if j not in used and _joins_region(items[j], tensors, scalars):
                members.append(j)
                tensors.update(t for t in items[j].outputs if t)
        if not any(items[m].ctx.node.op_type in COSTLY for m in members):
            continue
        inside, last = set(members), members[-1]
        exits = [t for t in _ordered_outputs(items, members) if t in wanted or set(readers.get(t, ())) - inside]
        early = any(r <= last for t in tensors for r in readers.get(t, ()) if r not in inside)
        if not exits or early:
            continue
        outer = sorted({t for m in members for t in items[m].inputs if t and t in scalars and t not in tensors})
        used.update(members)
        fused_at[last] = _integer_region_item(items, members, it.inputs[0], outer, exits, scalars, call)
    return _spliced(items, fused_at, used)


def _joins_region(item, tensors, scalars) -> bool:
    """Whether ``item`` computes its outputs per element of the region's tensors (see
    :func:`_fuse_integer_regions`)."""
    op = item.ctx.node.op_type
    ins = [t for t in item.inputs if t]
    if op == "DynamicQuantizeLinear":
        return bool(ins) and ins[0] in tensors and ins[0] not in scalars
    return (op in ELEMENTWISE and any(t in tensors and t not in scalars for t in ins)
            and all(t in tensors or t in scalars for t in ins))


def _integer_region_item(items, members, root: str, outer: list[str], exits: list[str], scalars, call) -> Item:
    region = [items[m] for m in members]

    def run_region(x, outer_values):
        values = dict(zip(outer, outer_values))
        values[root] = x
        for it in region:
            values.update(zip(it.outputs, call(it.kernel, it.ctx, [values[t] if t else None for t in it.inputs])))
        return values

    def step(ctx, n, *outer_values):
        if (n.dtype.kind in "iu" and n.dtype.itemsize >= 2 and n.size >= _TABLE_MIN_SIZE
                and all(np.size(v) == 1 for v in outer_values)):
            done = _through_distinct_values(n, lambda v: run_region(v, outer_values), exits, scalars)
            if done is not None:
                return done
        values = run_region(n, outer_values)
        return tuple(values[t] for t in exits)

    return Item(step, region[0].ctx, (root, *outer), tuple(exits))


def _through_distinct_values(n, evaluate, exits, scalars):
    """The region's exits with ``evaluate`` (the region) run on the distinct values of ``n`` only:
    each per-element exit is a lookup of its table over n's value span, each one-element exit
    (a DynamicQuantizeLinear's scale: min and max over the values present are those over the
    tensor) is passed on. None when the span is too wide for n's size, or the region does not map
    a 1-D array elementwise."""
    lo, hi = int(n.min()), int(n.max())
    span = hi - lo + 1
    if span > _SPAN_PER_ELEMENT * n.size:
        return None
    index = np.subtract(n, lo, dtype=np.intp, casting="unsafe").reshape(-1)
    seen = np.zeros(span, bool)
    seen[index] = True
    present = np.flatnonzero(seen)
    with np.errstate(all="ignore"):  # the direct run warns (or not) on the tensor itself
        values = evaluate((present + lo).astype(n.dtype))
    out = []
    for t in exits:
        v = np.asarray(values[t])
        if t in scalars:
            out.append(values[t])
            continue
        if v.size != present.size:
            return None
        table = np.empty(span, v.dtype)
        table[present] = v.reshape(-1)
        out.append(np.take(table, index).reshape((1,) * (v.ndim - n.ndim) + n.shape))
    return tuple(out)


#: Ops a float chain can apply in place: the kernel is one NumPy ufunc per bound (Clip, Relu) or
#: on its two operands (arithmetic), whose ``out=`` form gives the same values.
INPLACE = {"Add", "Sub", "Mul", "Div", "Clip", "Relu"}
_BINARY_UFUNCS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _fuse_inplace_chains(items, wanted, call, constants) -> list[Item]:
    """Each chain of :data:`INPLACE` ops in which every op after the first reads the previous op's
    output (its only reader, not requested) and otherwise only the first op's one non-constant
    input or plan constants (all of them floats), as one step where its last op ran
    (:func:`_inplace_chain_item`)."""
    readers = _readers(items)
    used: set[int] = set()
    fused_at: dict[int, Item] = {}
    for k, it in enumerate(items):
        if k in used or it.ctx.node.op_type not in INPLACE:
            continue
        live = [t for t in it.inputs if t and t not in constants]
        if len(live) != 1 or len(it.outputs) != 1:
            continue
        root, members, current = live[0], [k], it.outputs[0]
        while current not in wanted and len(readers.get(current, ())) == 1:
            j = readers[current][0]
            nxt = items[j]
            if (j in used or nxt.ctx.node.op_type not in INPLACE or len(nxt.outputs) != 1
                    or not all(not t or t in (current, root) or t in constants for t in nxt.inputs)):
                break
            members.append(j)
            current = nxt.outputs[0]
        kinds = {constants[t].dtype.kind for m in members for t in items[m].inputs if t in constants}
        if len(members) < 2 or kinds != {"f"}:
            # float constants mark a float chain; an integer chain (a requantization's Mul, Add,
            # Div, Clip) never runs in place and is faster as separate steps, which free its
            # input as soon as it is read
            continue
        used.update(members)
        fused_at[members[-1]] = _inplace_chain_item(items, members, root, constants, call)
    return _spliced(items, fused_at, used)


def _inplace_chain_item(items, members, root: str, constants, call) -> Item:
    chain = [items[m] for m in members]
    outer = tuple(dict.fromkeys(t for it in chain for t in it.inputs if t and (t == root or t in constants)))
    positions = [[None if not t else outer.index(t) if t in outer else -1 for t in it.inputs] for it in chain]
    decided: dict = {}  # input shape and type -> which ops ran in place (checked on the first run)
    at_root = outer.index(root)

    def step(ctx, *args):
        x = args[at_root]
        key = (x.shape, x.dtype.num)  # the other inputs are plan constants
        plan = decided.get(key)
        buf, owned, done = None, False, []
        for k, (it, pos) in enumerate(zip(chain, positions)):
            ins = [None if p is None else buf if p < 0 else args[p] for p in pos]
            if plan is not None:  # the same shapes and types as the checked run: its decisions hold
                inplace = plan[k]
                if inplace:
                    _apply_inplace(it, ins, buf, check=False)
            else:
                inplace = owned and _apply_inplace(it, ins, buf, check=True)
            if not inplace:
                buf = call(it.kernel, it.ctx, ins)[0]
                owned = plan is None and (isinstance(buf, np.ndarray) and buf.dtype.kind == "f"
                                          and buf.flags.writeable and not any(np.may_share_memory(buf, a) for a in args))
            done.append(inplace)
        if plan is None:
            decided[key] = done
        return buf

    return Item(step, chain[0].ctx, outer, (chain[-1].outputs[0],))


def _apply_inplace(item, ins, buf, check: bool) -> bool:
    """Apply ``item`` (whose chain input is ``buf``) into ``buf`` with the ufunc and dtype its
    kernel uses. With ``check``: False (nothing done) when the result would not have buf's shape
    and dtype; without, the caller knows it has (same shapes and types as a checked run)."""
    op = item.ctx.node.op_type
    if op in _BINARY_UFUNCS:
        if check:
            if len(ins) != 2 or any(a is None for a in ins):
                return False
            a, b = ins
            # both of buf's type: the kernels' dtype (result_type, or A's for Div) is then buf's
            if not (a.dtype == b.dtype == buf.dtype and _broadcasts_to(a.shape, buf.shape)
                    and _broadcasts_to(b.shape, buf.shape)):
                return False
        _BINARY_UFUNCS[op](ins[0], ins[1], out=buf, dtype=buf.dtype)
        return True
    if check and ins[0] is not buf:
        return False
    if op == "Relu":
        np.maximum(buf, np.zeros((), buf.dtype), out=buf)
        return True
    lo, hi = (item.ctx.attr("min"), item.ctx.attr("max")) if item.ctx.opset < 11 else (list(ins[1:]) + [None, None])[:2]
    lo, hi = (None if v is None else np.asarray(v, dtype=buf.dtype) for v in (lo, hi))
    if check and not all(v is None or _broadcasts_to(v.shape, buf.shape) for v in (lo, hi)):
        return False
    if lo is not None:
        np.maximum(buf, lo, out=buf)
    if hi is not None:
        np.minimum(buf, hi, out=buf)
    return True


def _broadcasts_to(shape, target) -> bool:
    """Whether an operand of ``shape`` broadcasts to ``target`` without growing it."""
    return len(shape) <= len(target) and all(d == 1 or d == t for d, t in zip(shape[::-1], target[::-1]))
