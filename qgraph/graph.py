"""The graph that passes edit: a thin layer over onnx-graphsurgeon.

`QModel` holds a gs.Graph plus what the graph alone does not carry (opsets, metadata,
IR version). Passes edit `model.graph` through gs — never protobuf lists — and use the
helpers here for the questions every rewrite asks: who produces this tensor, who consumes
it, is it a constant, is this the only consumer. Analysis that needs graph algorithms
uses `nx_view()`, built once per call in O(nodes + edges).
"""

from __future__ import annotations

from collections import Counter

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qgraph.errors import PassError
from qgraph.model_io import MS_DOMAIN, OPSET, PROTOBUF_LIMIT

Node = gs.Node
Tensor = gs.Tensor
Constant = gs.Constant
Variable = gs.Variable


def _with_inferred_types(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ByteSize() >= PROTOBUF_LIMIT:
        return model  # inference needs one serialised message; such models keep their own types
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return model  # load_model already reported real errors; keep what the file says


def free_name(base: str, taken) -> str:
    """`base`, or the first of `base_1`, `base_2`, … that is not in `taken`."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


class QModel:
    """A model being rewritten: `graph` (gs.Graph) + `metadata` (str -> str) + opsets."""

    def __init__(self, graph: gs.Graph, metadata: dict[str, str] | None = None,
                 ir_version: int = 8, producer_name: str = "qgraph"):
        self.graph = graph
        self.metadata = dict(metadata or {})
        self.ir_version = ir_version
        self.producer_name = producer_name
        self._names = Counter(n.name for n in graph.nodes)
        self._tensor_names = set(graph.tensors())

    # -- conversion -------------------------------------------------------------------
    @classmethod
    def from_onnx(cls, model: onnx.ModelProto) -> "QModel":
        """Import with inferred types, so passes can tell float tensors from integer shape tensors
        (exporters such as torch.onnx write no types for intermediate tensors), in the working form
        (float32, the working opset: model_io.convert_to_working_opset, as load_model does for files)."""
        from qgraph.model_io import convert_to_working_opset
        model = convert_to_working_opset(model)
        graph = gs.import_onnx(_with_inferred_types(model))
        others = [d for d in (graph.import_domains or []) if d.domain not in ("", "ai.onnx")]
        graph.import_domains = [onnx.helper.make_opsetid("", OPSET), *others]
        metadata = {p.key: p.value for p in model.metadata_props}
        # IR 3 (onnx/models' Caffe2-era exports) lists every initializer among the graph's inputs;
        # graphsurgeon imports them as constants only, which IR 3 forbids: export at least at the
        # working opset's own IR version.
        ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", OPSET)]))
        return cls(graph, metadata, ir_version, model.producer_name or "qgraph")

    def to_onnx(self) -> onnx.ModelProto:
        """Export to a ModelProto (cleanup + toposort first)."""
        self.cleanup()
        self.graph.opset = OPSET
        model = gs.export_onnx(self.graph, do_type_check=False)
        imports = [imp for imp in model.opset_import if imp.domain not in ("", "ai.onnx")]
        del model.opset_import[:]
        model.opset_import.add(domain="", version=OPSET)
        model.opset_import.extend(imports)
        domains = {imp.domain for imp in model.opset_import}
        if any(n.domain == MS_DOMAIN for n in self.graph.nodes) and MS_DOMAIN not in domains:
            model.opset_import.add(domain=MS_DOMAIN, version=1)
        model.ir_version = self.ir_version
        model.producer_name = self.producer_name
        for key, value in sorted(self.metadata.items()):
            model.metadata_props.add(key=key, value=value)
        return model

    def copy(self) -> "QModel":
        return QModel.from_onnx(self.to_onnx())

    # -- queries ----------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        return self.graph.tensors()

    def tensor(self, name: str) -> Tensor:
        tensors = self.graph.tensors()
        if name not in tensors:
            raise PassError(f"tensor '{name}' is not in the graph")
        return tensors[name]

    def node(self, name: str) -> Node:
        for node in self.graph.nodes:
            if node.name == name:
                return node
        raise PassError(f"node '{name}' is not in the graph")

    @staticmethod
    def producer(tensor: Tensor) -> Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: Tensor) -> list[Node]:
        return list(tensor.outputs)

    def is_graph_output(self, tensor: Tensor) -> bool:
        return any(t is tensor for t in self.graph.outputs)

    def is_graph_input(self, tensor: Tensor) -> bool:
        return any(t is tensor for t in self.graph.inputs)

    def only_consumer(self, tensor: Tensor) -> Node | None:
        """The single node reading `tensor`, or None if it has 0 or 2+ readers or is a graph output."""
        if len(tensor.outputs) != 1 or self.is_graph_output(tensor):
            return None
        return tensor.outputs[0]

    @staticmethod
    def constant_value(tensor: Tensor) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is not None and producer.op == "Constant" and "value" in producer.attrs:
            value = producer.attrs["value"]
            return np.asarray(value.values if isinstance(value, gs.Constant) else value)
        return None

    # -- editing ----------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        """A node name not yet used in the graph, derived from `base`."""
        name, k = base, 1
        while self._names[name]:
            name, k = f"{base}_{k}", k + 1
        self._names[name] += 1
        return name

    def add_node(self, op: str, inputs: list, outputs: list, name: str, attrs: dict | None = None,
                 domain: str | None = None) -> Node:
        node = gs.Node(op=op, name=self.unique_name(name), attrs=attrs or {},
                       inputs=inputs, outputs=outputs, domain=domain)
        self.graph.nodes.append(node)
        return node

    def fresh_tensor_name(self, base: str) -> str:
        """A tensor name not yet used in the graph, derived from `base` (O(1) per call)."""
        name = free_name(base, self._tensor_names)
        self._tensor_names.add(name)
        return name

    def add_constant(self, name: str, value: np.ndarray) -> Constant:
        """A new initializer whose name is unique among tensors."""
        # np.array, not ascontiguousarray: the latter turns 0-d scalars into 1-d arrays
        return gs.Constant(self.fresh_tensor_name(name), np.array(value, order="C"))

    def add_variable(self, name: str, dtype=None, shape=None) -> Variable:
        return gs.Variable(self.fresh_tensor_name(name), dtype=dtype, shape=shape)

    def bypass(self, node: Node) -> None:
        """Remove a single-input, single-output node, wiring its consumers to its input.

        If the output is a graph output, the producer's tensor takes over the output's name
        when it has no other reader; otherwise the node stays (the report should say why).
        """
        src, dst = node.inputs[0], node.outputs[0]
        if self.is_graph_output(dst):
            if self.is_graph_input(src) or self.is_graph_output(src) or isinstance(src, gs.Constant) \
                    or len(src.outputs) != 1:
                raise PassError(f"node '{node.name}' feeds a graph output directly from a shared tensor")
            src.name, dst.name = dst.name, src.name + "__bypassed"
            self.graph.outputs = [src if t is dst else t for t in self.graph.outputs]
            src.dtype, src.shape = dst.dtype or src.dtype, dst.shape or src.shape
        for consumer in list(dst.outputs):
            consumer.inputs = [src if t is dst else t for t in consumer.inputs]
        node.inputs.clear()
        node.outputs.clear()

    def cleanup(self) -> None:
        self.graph.cleanup(remove_unused_graph_inputs=False)
        self.toposort()
        self._names = Counter(n.name for n in self.graph.nodes)
        self._tensor_names |= set(self.graph.tensors())

    def toposort(self) -> None:
        """Sort the nodes topologically in place, in gs.Graph.toposort's order (see toposort_nodes)."""
        toposort_nodes(self.graph)

    # -- analysis ---------------------------------------------------------------------
    def nx_view(self) -> nx.DiGraph:
        """Nodes by name; an edge a->b for every tensor a produces and b reads (edge attr `tensor`)."""
        view = nx.DiGraph()
        for node in self.graph.nodes:
            view.add_node(node.name, node=node)
        for node in self.graph.nodes:
            for tensor in node.outputs:
                for consumer in tensor.outputs:
                    view.add_edge(node.name, consumer.name, tensor=tensor.name)
        return view

    def op_histogram(self) -> dict[str, int]:
        return dict(Counter(n.op for n in self.graph.nodes).most_common())

    def initializer_size(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.graph.tensors().values() if isinstance(t, gs.Constant))


def toposort_nodes(graph: gs.Graph) -> None:
    """Sort `graph`'s nodes in place into the order gs.Graph.toposort gives, without recursion.

    gs computes each node's level (1 + the highest level of its producers, 0 without any) by a
    recursive depth-first search from every node in list order, and sorts stably by level, ties
    in the order the search finished the nodes. Its recursion goes as deep as the longest chain
    of nodes listed after their readers — a lowered model appends every new node at the end,
    and the integer target's requantization chains then passed Python's recursion limit on
    ddddocr's detector. This is the same search with an explicit stack. Graphs with subgraphs
    or functions (nested scopes, not written by qgraph) keep gs's own sort.
    """
    if graph.functions or any(next(node.subgraphs(), None) is not None for node in graph.nodes):
        graph.toposort()
        return
    members = {id(node) for node in graph.nodes}
    produced = {t.name for node in graph.nodes for t in node.outputs if not t.is_empty()}

    known: dict[int, list[gs.Node]] = {}

    def producers(node: gs.Node) -> list[gs.Node]:
        if id(node) in known:
            return known[id(node)]
        found: dict[int, gs.Node] = {}
        for tensor in node.inputs:
            if tensor.name in produced:
                for producer in tensor.inputs:
                    if id(producer) not in members:
                        raise PassError(f"node '{producer.name}' writes '{tensor.name}' but is not in the graph")
                    found.setdefault(id(producer), producer)
        known[id(node)] = list(found.values())
        return known[id(node)]

    level: dict[int, int] = {}          # insertion order: the order the search finished the nodes
    finished: list[gs.Node] = []
    for root in graph.nodes:
        if id(root) in level:
            continue
        path = {id(root)}
        stack = [(root, iter(producers(root)))]
        while stack:
            node, pending = stack[-1]
            for producer in pending:
                if id(producer) in level:
                    continue
                if id(producer) in path:
                    raise PassError(f"the graph has a cycle through node '{producer.name}'; "
                                    "are there tensors with duplicate names?")
                path.add(id(producer))
                stack.append((producer, iter(producers(producer))))
                break
            else:
                stack.pop()
                path.discard(id(node))
                level[id(node)] = 1 + max((level[id(p)] for p in producers(node)), default=-1)
                finished.append(node)
    graph.nodes = sorted(finished, key=lambda node: level[id(node)])
