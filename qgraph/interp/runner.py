"""Graph evaluation. :func:`compile_model` does the per-model work once — initializers decoded
(read-only), nodes topologically sorted, kernels looked up, one :class:`NodeContext` per node
(attributes decoded once, weight-derived constants memoized by the kernels) — and returns a
:class:`Plan`; ``Plan.run`` prunes to what the requested outputs need (a schedule cached per
output list), runs one kernel per node and frees every tensor after its last use.
:func:`run` is the one-call form; it keeps the plans of the last few models it saw."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections import OrderedDict, defaultdict, deque
from typing import Callable, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from qgraph.errors import InterpError
from qgraph.interp.fusion import Item, fuse
from qgraph.interp.registry import NodeContext, _norm_domain, lookup, outer_names, subgraphs


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {_norm_domain(o.domain): o.version for o in model.opset_import}


def _needed_nodes(inputs_of, producer: dict[str, int], wanted) -> set[int]:
    keep, stack = set(), [producer[t] for t in wanted if t in producer]
    while stack:
        i = stack.pop()
        if i in keep:
            continue
        keep.add(i)
        stack.extend(producer[t] for t in inputs_of[i] if t in producer)
    return keep


def _toposort(nodes, inputs_of, available: set[str]) -> list[int]:
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = {i: {producer[t] for t in inputs_of[i] if t in producer and t not in available}
            for i in range(len(nodes))}
    users = defaultdict(list)
    for i, ds in deps.items():
        for d in ds:
            users[d].append(i)
    ready = deque(i for i in range(len(nodes)) if not deps[i])
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            deps[u].discard(i)
            if not deps[u]:
                ready.append(u)
    if len(order) != len(nodes):
        raise InterpError("the graph has a cycle; run onnx.checker.check_model on it")
    return order


class _Step(NamedTuple):
    kernel: Callable
    ctx: NodeContext
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    free: tuple[str, ...]  # tensors whose last use is this step


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_heap_tuned = False


def recycle_large_arrays() -> None:
    """Once per process, on glibc: serve arrays up to 32 MiB from the heap and keep up to 256 MiB
    of freed heap. By default each large temporary is a fresh mmap, page-faulted in 4 KiB at a
    time on every run and unmapped when freed; a plan allocates the same sizes run after run, so
    recycling them removes most of its kernel time (measured: a third of a batch-64 run).
    This changes the whole process's allocator, so the library never calls it by itself: the
    qgraph CLI (diff, demo) and the benchmark do; an embedding application may."""
    global _heap_tuned
    if _heap_tuned or not sys.platform.startswith("linux"):
        return
    _heap_tuned = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        pass


#: Thread-count entry points of the OpenBLAS builds NumPy ships with (scipy-openblas for NumPy 2,
#: the 64-bit-integer build before it, a system OpenBLAS), as (set, get) symbol names.
_OPENBLAS_SYMBOLS = [("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                     ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                     ("openblas_set_num_threads", "openblas_get_num_threads")]


def _openblas_thread_calls():
    """(set, get) ctypes functions of the OpenBLAS loaded into this process, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _OPENBLAS_SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                return setter, getter
    return None


def set_blas_threads(threads: int) -> int | None:
    """Set the thread count of NumPy's OpenBLAS for the whole process and return the previous
    count (None when NumPy's BLAS is not an OpenBLAS this can reach). The interpreter's GEMMs are
    many and small: on a busy machine, BLAS threads waiting for a core cost more than they save
    (measured here: a YOLOv8n run 10x slower with two threads than with one while other processes
    held the cores; 5-9x on the zoo models at load 8). Like :func:`recycle_large_arrays` this is
    process-wide, so the library never calls it by itself: `qgraph diff` sets one thread
    (``--threads``), the benchmarks time the interpreter with one thread next to ORT's one."""
    calls = _openblas_thread_calls()
    if calls is None:
        return None
    setter, getter = calls
    previous = int(getter())
    setter(int(threads))
    return previous


class Plan:
    """A model compiled for repeated evaluation: ``plan.run(feeds, outputs=None)``.

    Initializers are shared, read-only arrays; kernels never write into their inputs. A feed
    that overrides an initializer switches that run to fresh node contexts (nothing memoized)."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        opsets = _opsets(model)
        self.nodes = list(g.node)
        self.consts: dict[str, np.ndarray] = {}
        for init in g.initializer:
            arr = numpy_helper.to_array(init)
            arr.flags.writeable = False
            self.consts[init.name] = arr
        self.graph_inputs = {i.name for i in g.input}
        self.output_names = [o.name for o in g.output]
        # a node's inputs, then the enclosing-scope tensors its subgraphs read (If, Loop)
        outer = [outer_names(n) for n in self.nodes]
        self.inputs_of = [(*n.input, *o) for n, o in zip(self.nodes, outer)]
        self.order = _toposort(self.nodes, self.inputs_of, set(self.consts) | self.graph_inputs)
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        fixed = set(self.consts) - self.graph_inputs  # an initializer listed as input may be fed
        self._fixed = fixed
        self._folded: dict[str, np.ndarray] = {}  # outputs of nodes computed from constants only
        self._opset_of = [opsets.get(_norm_domain(n.domain), 1) for n in self.nodes]
        self.contexts = [NodeContext(n, self._opset_of[i], tuple(not t or t in fixed for t in n.input), outer[i],
                                     opsets if subgraphs(n) else None)
                         for i, n in enumerate(self.nodes)]
        self._schedules: dict[tuple[tuple[str, ...], bool], list[_Step]] = {}

    def _schedule(self, wanted: tuple[str, ...], fused: bool = True) -> list[_Step]:
        sched = self._schedules.get((wanted, fused))
        if sched is not None:
            return sched
        needed = _needed_nodes(self.inputs_of, self.producer, wanted)
        order = [i for i in self.order if i in needed]
        kernels = {}
        for i in order:
            n = self.nodes[i]
            kernels[i] = lookup(n.domain, n.op_type)
            if kernels[i] is None:
                raise InterpError(f"unsupported op {n.op_type} (domain {n.domain or 'ai.onnx'!r}) "
                                  f"at node {n.name!r}; the reference interpreter has no kernel for it")
        items = [Item(kernels[i], self.contexts[i], self.inputs_of[i], tuple(self.nodes[i].output))
                 for i in order]
        if fused:
            items = self._fold_constants(items)
            items = fuse(items, wanted, _call, {t: a for t, a in (*self.consts.items(), *self._folded.items())
                                                if t in self._fixed or t in self._folded})
        last_use = {}
        for k, it in enumerate(items):
            for t in it.inputs:
                if t:
                    last_use[t] = k
        frees = defaultdict(list)
        for t, k in last_use.items():
            if t not in wanted:
                frees[k].append(t)
        sched = [_Step(*it, tuple(frees[k])) for k, it in enumerate(items)]
        self._schedules[(wanted, fused)] = sched
        return sched

    def _fold_constants(self, items: list[Item]) -> list[Item]:
        """``items`` without the nodes whose inputs are all plan constants (a QDQ model's weight
        DequantizeLinear, shape arithmetic on initializers): each runs once, here, and its outputs
        join the plan's read-only constants of the fused schedules (unfused runs, whose feeds
        override an initializer, use fresh node contexts and none of this)."""
        kept = []
        for it in items:
            if not all(not t or t in self._folded or t in self._fixed for t in it.inputs):
                kept.append(it)
            elif not all(t in self._folded for t in it.outputs if t):
                args = [None if not t else self._folded.get(t, self.consts.get(t)) for t in it.inputs]
                for name, arr in zip(it.outputs, _call(it.kernel, it.ctx, args)):
                    if name:
                        arr = np.asarray(arr)
                        arr.flags.writeable = False
                        self._folded[name] = arr
        for it in kept:  # kernels may memoize what they derive from folded inputs (a Conv's weights)
            it.ctx.const = tuple(not t or t in self._fixed or t in self._folded for t in it.inputs)
        return kept

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Evaluate on ``feeds`` and return the tensors named in ``outputs`` (default: the graph
        outputs); any intermediate tensor may be requested."""
        wanted = tuple(outputs) if outputs is not None else tuple(self.output_names)
        fresh = any(name in self.consts for name in feeds)
        sched = self._schedule(wanted, fused=not fresh)  # fused steps memoize constants
        values = dict(self.consts)
        if not fresh:
            values.update(self._folded)
        for name, arr in feeds.items():
            values[name] = np.asarray(arr)
        for step in sched:
            try:
                args = [values[t] if t else None for t in step.inputs]
            except KeyError:
                raise self._missing(step, values) from None
            ctx = step.ctx
            if fresh:
                ctx = ctx.with_const(())
            res = _call(step.kernel, ctx, args)
            for name, arr in zip(step.outputs, res):
                if name:
                    values[name] = arr
            for t in step.free:
                values.pop(t, None)
        missing = [t for t in wanted if t not in values]
        if missing:
            raise InterpError(f"requested tensors {missing} are neither computed nor fed; check the names")
        return {t: values[t] if values[t].flags.writeable else values[t].copy() for t in wanted}

    def run_node(self, index: int, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Node ``index`` (of the model's node list) alone, its inputs read from ``values`` (by
        name) or the plan's initializers: ``{output name: array}``. `qgraph diff` uses it to re-run
        one op on the inputs ONNX Runtime computed."""
        node, ctx = self.nodes[index], self.contexts[index]
        kernel = lookup(node.domain, node.op_type)
        if kernel is None:
            raise InterpError(f"unsupported op {node.op_type} (domain {node.domain or 'ai.onnx'!r}) "
                              f"at node {node.name!r}; the reference interpreter has no kernel for it")
        args = []
        for t in self.inputs_of[index]:
            if not t:
                args.append(None)
            elif t in values:
                args.append(np.asarray(values[t]))
            elif t in self.consts:
                args.append(self.consts[t])
            else:
                raise InterpError(f"node {node.name!r} ({node.op_type}) needs tensor {t!r}: give its value")
        res = _call(kernel, ctx, args)
        return {name: arr for name, arr in zip(node.output, res) if name}

    def _missing(self, step: _Step, values) -> InterpError:
        n = step.ctx.node
        t = next(t for t in step.inputs if t and t not in values)
        hint = "feed it" if t in self.graph_inputs else "no node or initializer produces it"
        return InterpError(f"node {n.name!r} ({n.op_type}) needs tensor {t!r}: {hint}")


def compile_model(model: onnx.ModelProto) -> Plan:
    """Compile ``model`` once for many runs (``plan.run(feeds, outputs)``); the plan does not
    see later edits of ``model``."""
    return Plan(model)


_PLANS: OrderedDict[int, tuple[onnx.ModelProto, bytes, Plan]] = OrderedDict()
_PLAN_CACHE_SIZE = 4


def _plan_for(model: onnx.ModelProto) -> Plan:
    """The cached plan of ``model``: same object and same serialized bytes (edits recompile)."""
    data = model.SerializeToString()
    hit = _PLANS.get(id(model))
    if hit is not None and hit[0] is model and hit[1] == data:
        _PLANS.move_to_end(id(model))
        return hit[2]
    plan = Plan(model)
    _PLANS[id(model)] = (model, data, plan)
    while len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
        outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Evaluate ``model`` on ``feeds`` and return the tensors named in ``outputs`` (default: the
    graph outputs); any intermediate tensor may be requested. Reuses the compiled plan of a
    model seen in one of the last few calls; for many batches prefer :func:`compile_model`."""
    return _plan_for(model).run(feeds, outputs)


def _call(kernel, ctx, args: list) -> tuple:
    """The kernel's outputs as a tuple; an exception other than InterpError (a kernel bug or a
    malformed node) becomes an InterpError that says which node."""
    try:
        res = kernel(ctx, *args)
    except InterpError:
        raise
    except Exception as e:
        raise InterpError(f"{ctx.where}: {type(e).__name__}: {e}") from e
    return res if type(res) is tuple else (res,)
