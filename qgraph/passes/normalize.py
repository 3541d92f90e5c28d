"""normalize: linger's float-stage constraints (normalize_layers), as a graph rewrite.

For each chosen node with bounds (Nw, Nb, Na):
    W ← clip(W, −Nw, Nw)      b ← clip(b, −Nb, Nb)      y ← Clip(y, −Na, Na)
Constant weights and biases are clamped in place (a shared constant gets a private clamped
copy); a weight or bias computed in the graph by fuse_conv_bn's forward mode gets a Clip node
on it, so training sees the clamped folded weight as linger's NormalizeConvBN2d does. Output
bounds insert a Clip after the node; the Clip takes over the output's name, so consumers,
graph outputs and annotations still refer to the (now bounded) tensor. The weight/bias of
Conv/ConvTranspose/Gemm are inputs 1/2, of MatMul its constant input, of BatchNormalization
its scale/B; other op types only get the output bound.

Invariant: none — outputs change on purpose, so the float model trains into ±N, a range
that fixed point represents well. Running it twice changes nothing more.
"""

from __future__ import annotations

from typing import Annotated
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qgraph.annotations import FORWARD_FUSED_BN, get_annotation
from qgraph.errors import ConfigError, PassError
from qgraph.graph import Node, QModel, Tensor
from qgraph.idioms import Declined, first_match, name_patterns
from qgraph.idioms import skip as skip_entry  # `skip` is also this pass's parameter
from qgraph.pipeline import PassContext, register_pass
from qgraph.schema import Range

Bound = Annotated[float, Range(0.0, lo_open=True)]   # a clamp bound N of ±N

_ROLES = ("weight", "bias", "activation")


@register_pass("normalize", preserves_outputs=False)
def normalize(model: QModel, ctx: PassContext, *, weight: Bound | None = 8.0, bias: Bound | None = 8.0,
              activation: Bound | None = 8.0, skip: list[str] = (),
              op_types: list[str] = ("Conv", "ConvTranspose", "Gemm", "MatMul"),
              overrides: dict | None = None) -> dict:
    """Clamp weights/biases to ±N in place and bound outputs with Clip(−N, N) (linger's normalize_layers)."""
    defaults = {"weight": _bound(weight, "weight"), "bias": _bound(bias, "bias"),
                "activation": _bound(activation, "activation")}
    skip_rules = NameRules({str(s): True for s in skip}, "skip")
    override_rules = NameRules(_check_overrides(overrides), "overrides")
    op_types = set(op_types)
    editor = ClipEditor(model)
    skipped, chosen = [], 0
    for node in list(model.graph.nodes):
        if node.op not in op_types:
            continue
        if skip_rules.match(node.name) is not None:
            skipped.append(skip_entry(node, f"in skip list ('{skip_rules.last_key}')"))
            continue
        chosen += 1
        bounds = {**defaults, **(override_rules.match(node.name) or {})}
        skipped += editor.normalize_node(node, bounds)
    if editor.changed:
        model.cleanup()
    warnings = skip_rules.unused() + override_rules.unused()
    total = sum(editor.clipped.values())
    summary = (f"{total} values clipped in {sum(v > 0 for v in editor.clipped.values())} of "
               f"{len(editor.clipped)} tensors, {editor.activation_clips} output Clip(s) and "
               f"{editor.weight_clips} weight/bias Clip(s) inserted on {chosen} node(s)")
    if not chosen:
        summary = f"nothing to do: no {'/'.join(sorted(op_types)) or 'node'} left to normalize"
    return {"changed": editor.changed, "summary": summary, "values_clipped": total,
            "clipped": editor.clipped, "clips_inserted": editor.activation_clips + editor.weight_clips,
            "activation_clips": editor.activation_clips, "weight_clips": editor.weight_clips,
            "skipped": skipped, "warnings": warnings}


# -- parameters ---------------------------------------------------------------------------

def _bound(value, role: str, where: str = "normalize") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{where}: {role} bound must be a positive number or null, got {value!r}")
    return float(value)


def _check_overrides(overrides) -> dict:
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"normalize: overrides must be a mapping name-or-regex -> {{weight, bias, activation}}, "
                          f"got {overrides!r}")
    checked = {}
    for key, spec in overrides.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"normalize: overrides['{key}'] must be a mapping with keys weight/bias/activation")
        unknown = set(spec) - set(_ROLES)
        if unknown:
            raise ConfigError(f"normalize: overrides['{key}'] has unknown key '{sorted(unknown)[0]}'; "
                              f"valid: {', '.join(_ROLES)}")
        checked[str(key)] = {role: _bound(v, role, f"normalize overrides['{key}']") for role, v in spec.items()}
    return checked


class NameRules:
    """Node-name keys that are exact names or regexes (full match); an exact name wins."""

    def __init__(self, rules: dict, what: str):
        self.rules, self.what, self.used, self.last_key = rules, what, set(), None
        self.patterns = name_patterns(rules, f"normalize {what}")

    def match(self, name: str):
        key = first_match(self.patterns, name)
        if key is None:
            return None
        self.used.add(key)
        self.last_key = key
        return self.rules[key]

    def unused(self) -> list[str]:
        return [f"{self.what} entry '{key}' matched no node" for key in self.rules if key not in self.used]


# -- rewriting ----------------------------------------------------------------------------

class ClipEditor:
    """Clamps constants and inserts Clip nodes; counts what it did."""

    def __init__(self, model: QModel):
        self.model = model
        fused = get_annotation(model, FORWARD_FUSED_BN, {}) or {}
        self.fused = {e[k] for e in fused.values() for k in ("folded_weight", "folded_bias") if k in e}
        self.clipped: dict[str, int] = {}
        self.activation_clips = self.weight_clips = self.changed = 0
        self._bounds: dict[float, tuple[gs.Constant, gs.Constant]] = {}
        self._copies: dict[tuple[str, float], gs.Constant] = {}

    def normalize_node(self, node: Node, bounds: dict) -> list[dict]:
        skipped = []
        for role, index in param_slots(node):
            if bounds[role] is None or index is None or index >= len(node.inputs) or not node.inputs[index].name:
                continue
            try:
                self.clamp_input(node, index, bounds[role])
            except Declined as declined:
                skipped.append(skip_entry(node, f"{role}: {declined.reason}"))
        if bounds["activation"] is not None and node.outputs:
            try:
                self.bound_output(node, bounds["activation"])
            except Declined as declined:
                skipped.append(skip_entry(node, f"activation: {declined.reason}"))
        return skipped

    def clamp_input(self, node: Node, index: int, bound: float) -> None:
        tensor = node.inputs[index]
        if self.model.is_graph_input(tensor):
            raise Declined(f"'{tensor.name}' is a graph input, not an initializer")
        if tensor.name in self.fused:
            if self._is_clip(tensor.inputs[0] if tensor.inputs else None, bound):
                return
            self.insert_clip(tensor, bound)
            self.weight_clips += 1
            return
        if not isinstance(tensor, gs.Constant):
            raise Declined(f"'{tensor.name}' is computed in the graph, not a constant")
        values = np.asarray(tensor.values)
        if values.dtype.kind != "f":
            raise Declined(f"'{tensor.name}' is {values.dtype}, not float")
        if not np.all(np.isfinite(values)):
            raise PassError(f"normalize: tensor '{tensor.name}' (used by '{node.name}') contains NaN or Inf; "
                            "fix the model's weights first")
        count = int(np.count_nonzero(np.abs(values) > bound))
        self.clipped[tensor.name] = self.clipped.get(tensor.name, 0) + count
        if count == 0:
            return
        clamped = np.clip(values, -bound, bound).astype(values.dtype)
        if len(tensor.outputs) > 1:  # shared: only this node's copy is clamped
            key = (tensor.name, bound)
            if key not in self._copies:
                self._copies[key] = gs.Constant(self.model.fresh_tensor_name(f"{tensor.name}_normalized"), clamped)
            node.inputs[index] = self._copies[key]
        else:
            tensor.values = clamped
        self.changed += 1

    def bound_output(self, node: Node, bound: float) -> None:
        out = node.outputs[0]
        if _np_dtype(out.dtype).kind != "f":
            raise Declined(f"output '{out.name}' is {_np_dtype(out.dtype)}, not float")
        if len(out.outputs) == 1 and self._is_clip(out.outputs[0], bound) and not self.model.is_graph_output(out):
            return  # normalized before
        self.insert_clip(out, bound)
        self.activation_clips += 1

    def insert_clip(self, tensor: Tensor, bound: float) -> None:
        """`tensor`'s producer now writes a fresh tensor; Clip(fresh, −N, N) writes `tensor`."""
        producer = tensor.inputs[0]
        raw = gs.Variable(self.model.fresh_tensor_name(f"{tensor.name}_unclipped"), dtype=tensor.dtype, shape=tensor.shape)
        producer.outputs[producer.outputs.index(tensor)] = raw
        low, high = self._bound_constants(bound, tensor.dtype)
        self.model.add_node("Clip", [raw, low, high], [tensor], f"{producer.name}/normalize_clip")
        self.changed += 1

    def _bound_constants(self, bound: float, dtype) -> tuple[gs.Constant, gs.Constant]:
        if bound not in self._bounds:
            dtype = _np_dtype(dtype)
            tag = f"{bound:g}".replace(".", "p")
            self._bounds[bound] = (gs.Constant(self.model.fresh_tensor_name(f"normalize.min_{tag}"), np.array(-bound, dtype)),
                                   gs.Constant(self.model.fresh_tensor_name(f"normalize.max_{tag}"), np.array(bound, dtype)))
        return self._bounds[bound]

    @staticmethod
    def _is_clip(node: Node | None, bound: float) -> bool:
        if node is None or node.op != "Clip" or len(node.inputs) < 3:
            return False
        low, high = (QModel.constant_value(t) for t in node.inputs[1:3])
        return low is not None and high is not None and float(low) == -bound and float(high) == bound


def param_slots(node: Node) -> list[tuple[str, int | None]]:
    """(role, input index) of the weight and bias a node has."""
    if node.op in ("Conv", "ConvTranspose", "Gemm", "BatchNormalization"):
        return [("weight", 1), ("bias", 2)]
    if node.op == "MatMul":
        constant = [i for i, t in enumerate(node.inputs[:2]) if isinstance(t, gs.Constant)]
        return [("weight", constant[-1] if constant else 1)]
    return []


def _np_dtype(dtype) -> np.dtype:
    """A tensor's numpy dtype; float32 when gs does not know it."""
    if dtype is None:
        return np.dtype(np.float32)
    if isinstance(dtype, int):  # an onnx TensorProto enum
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
    return np.dtype(dtype)
