"""The op registry of the reference interpreter: one function per (domain, op type).

An op function takes a :class:`NodeContext` and the node's input arrays (``None`` for an
omitted optional input) and returns one array or a tuple of arrays (the node's outputs).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from qgraph.errors import InterpError

MS_DOMAIN = "com.microsoft"

#: (domain, op_type) -> kernel. The default ONNX domain is "".
OPS: dict[tuple[str, str], Callable] = {}


def register(op_type: str, domain: str = "", *more_domains: str):
    """Register the decorated function as the kernel of ``op_type`` in ``domain`` (and in any
    ``more_domains``, for ops that ORT also exposes under com.microsoft)."""

    def deco(fn):
        for d in (domain, *more_domains):
            OPS[(d, op_type)] = fn
        return fn

    return deco


def lookup(domain: str, op_type: str) -> Callable | None:
    return OPS.get((_norm_domain(domain), op_type))


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


class NodeContext:
    """What a kernel may ask about its node: attributes (with defaults, decoded once), the opset
    version of the node's domain, and a name for error messages. A compiled plan keeps one
    context per node across runs, so a kernel may memoize work that depends only on constant
    inputs (weights, scales, zero points) with :meth:`once`."""

    __slots__ = ("node", "opset", "attrs", "const", "outer", "opsets", "_decoded", "_memo")

    def __init__(self, node: onnx.NodeProto, opset: int, const: tuple[bool, ...] = (),
                 outer: tuple[str, ...] = (), opsets: dict[str, int] | None = None):
        self.node = node
        self.opset = opset
        self.attrs = {a.name: a for a in node.attribute}
        self.const = const
        # a node with subgraphs (If, Loop): the enclosing scope's tensors its bodies read, which
        # the plan passes after the node's own inputs, and the model's opsets for the bodies
        self.outer = outer
        self.opsets = opsets or {}
        self._decoded: dict = {}
        self._memo: dict = {}

    def with_const(self, const: tuple[bool, ...]) -> "NodeContext":
        """A fresh context of the same node and scope (nothing memoized) with `const`."""
        return NodeContext(self.node, self.opset, const, self.outer, self.opsets)

    def attr(self, name: str, default=None):
        if name in self._decoded:
            v = self._decoded[name]
            return default if v is None else v
        a = self.attrs.get(name)
        if a is None:
            v = None
        elif a.type == onnx.AttributeProto.TENSOR:
            v = onnx.numpy_helper.to_array(a.t)
            v.flags.writeable = False
        elif a.type == onnx.AttributeProto.GRAPH:
            v = a.g
        else:
            v = helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, list):
                v = [x.decode() if isinstance(x, bytes) else x for x in v]
        self._decoded[name] = v
        return default if v is None else v

    def once(self, key, compute: Callable, *inputs: int):
        """``compute()``, memoized under ``key`` when the node inputs at positions ``inputs`` are
        all plan constants (initializers no feed overrides, or omitted); recomputed on every call
        otherwise, and always outside a compiled plan (empty ``const``)."""
        memo = self._memo
        if key in memo:  # only ever filled when the inputs are constants of the plan
            return memo[key]
        if not self.const or not all(i >= len(self.const) or self.const[i] for i in inputs):
            return compute()
        value = memo[key] = compute()
        return value

    def is_const(self, i: int) -> bool:
        """Whether node input ``i`` is a plan constant (or omitted); False outside a plan."""
        return bool(self.const) and (i >= len(self.const) or self.const[i])

    @property
    def where(self) -> str:
        n = self.node
        return f"{n.op_type} (domain {n.domain or 'ai.onnx'!r}) node {n.name!r}"

    def error(self, what: str) -> InterpError:
        return InterpError(f"{self.where}: {what}")


def np_dtype(onnx_type: int) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(onnx_type)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The node's graph attributes (an If's branches, a Loop's or Scan's body)."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def ops_in_bodies(node: onnx.NodeProto) -> Counter:
    """The op types inside a node's subgraphs, nested ones included (empty for a node without)."""
    found: Counter = Counter()
    for graph in subgraphs(node):
        for inner in graph.node:
            found[inner.op_type] += 1
            found.update(ops_in_bodies(inner))
    return found


def outer_names(node: onnx.NodeProto, reads=None) -> tuple[str, ...]:
    """The enclosing scope's tensors the node's subgraphs read, in order: what ``reads(n)`` names
    for each node n of a body (default: its inputs and, for a node with bodies, their own outer
    names, so nested bodies count), and the bodies' outputs, less what a body defines."""
    reads = reads or (lambda n: (*n.input, *outer_names(n)))
    found: dict[str, None] = {}
    for graph in subgraphs(node):
        defined = ({i.name for i in graph.input} | {t.name for t in graph.initializer}
                   | {o for n in graph.node for o in n.output if o})
        names = [t for n in graph.node for t in reads(n)] + [o.name for o in graph.output]
        found.update(dict.fromkeys(t for t in names if t and t not in defined))
    return tuple(found)
