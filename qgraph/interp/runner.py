"""Graph evaluation: prune to what the requested outputs need, topologically sort, run one
kernel per node, and free every tensor after its last use."""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
import onnx
from onnx import numpy_helper

from qgraph.errors import InterpError
from qgraph.interp.registry import NodeContext, _norm_domain, lookup


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {_norm_domain(o.domain): o.version for o in model.opset_import}


def _needed_nodes(nodes, wanted: set[str]) -> list[int]:
    producer = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producer[o] = i
    keep, stack = set(), [producer[t] for t in wanted if t in producer]
    while stack:
        i = stack.pop()
        if i in keep:
            continue
        keep.add(i)
        stack.extend(producer[t] for t in nodes[i].input if t in producer)
    return sorted(keep)


def _toposort(nodes, idx: list[int], available: set[str]) -> list[int]:
    producer = {o: i for i in idx for o in nodes[i].output if o}
    deps = {i: {producer[t] for t in nodes[i].input if t in producer and t not in available} for i in idx}
    users = defaultdict(list)
    for i, ds in deps.items():
        for d in ds:
            users[d].append(i)
    ready = deque(i for i in idx if not deps[i])
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            deps[u].discard(i)
            if not deps[u]:
                ready.append(u)
    if len(order) != len(idx):
        raise InterpError("the graph has a cycle; run onnx.checker.check_model on it")
    return order


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
        outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Evaluate ``model`` on ``feeds`` and return the tensors named in ``outputs`` (default: the
    graph outputs); any intermediate tensor may be requested."""
    g = model.graph
    opsets = _opsets(model)
    wanted = list(outputs) if outputs is not None else [o.name for o in g.output]
    nodes = list(g.node)
    idx = _needed_nodes(nodes, set(wanted))
    for i in idx:
        n = nodes[i]
        if lookup(n.domain, n.op_type) is None:
            raise InterpError(f"unsupported op {n.op_type} (domain {n.domain or 'ai.onnx'!r}) "
                              f"at node {n.name!r}; the reference interpreter has no kernel for it")

    values: dict[str, np.ndarray] = {}
    for init in g.initializer:
        values[init.name] = numpy_helper.to_array(init)
    for name, arr in feeds.items():
        values[name] = np.asarray(arr)
    graph_inputs = {i.name for i in g.input}
    order = _toposort(nodes, idx, set(values))

    uses = defaultdict(int)
    for i in order:
        for t in nodes[i].input:
            if t:
                uses[t] += 1
    keep = set(wanted)
    for i in order:
        n = nodes[i]
        args = []
        for t in n.input:
            if not t:
                args.append(None)
            elif t in values:
                args.append(values[t])
            else:
                hint = "feed it" if t in graph_inputs else "no node or initializer produces it"
                raise InterpError(f"node {n.name!r} ({n.op_type}) needs tensor {t!r}: {hint}")
        ctx = NodeContext(n, opsets.get(_norm_domain(n.domain), 1))
        try:
            res = lookup(n.domain, n.op_type)(ctx, *args)
        except InterpError:
            raise
        except Exception as e:  # a kernel bug or a malformed node: say where
            raise InterpError(f"{ctx.where}: {type(e).__name__}: {e}") from e
        if not isinstance(res, tuple):
            res = (res,)
        for name, arr in zip(n.output, res):
            if name:
                values[name] = arr
        for t in n.input:
            if t:
                uses[t] -= 1
                if uses[t] == 0 and t not in keep:
                    values.pop(t, None)
    missing = [t for t in wanted if t not in values]
    if missing:
        raise InterpError(f"requested tensors {missing} are neither computed nor fed; check the names")
    return {t: values[t] for t in wanted}
