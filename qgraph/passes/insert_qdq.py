"""insert_qdq: QuantizeLinear→DequantizeLinear pairs on weights and activations.

    y = DQ(Q(x)) = (clamp(round_half_even(x / s) + z, qmin, qmax) − z) · s

Weights of Conv/ConvTranspose/Gemm/MatMul (and constant operands of Add/Mul/Concat) get a
pair on the constant weight — or on the folded weight computed in-graph by fuse_conv_bn's
forward mode, which is any weight input computed from constants only — per channel
(`axis` on the output channel) or per tensor, int8 storage, scales from the weight's own
range right away. Biases stay float (lowering quantizes them to int32 with s_in · s_w).

Activations: every float input and output of a quantizable op (Conv, ConvTranspose, Gemm,
MatMul, Add, Mul, Concat, AveragePool, GlobalAveragePool, Relu, Clip, Sigmoid, Resize),
graph inputs included, gets one pair per *tensor*, shared by all its readers. A tensor is
quantized when its producer asks (`quantize_output`) or any reader asks (`quantize_input`);
the producer's config wins. Range-preserving ops (idioms.RANGE_PRESERVING: data movement,
MaxPool, nearest Resize), and Relu/Clip reading a tensor marked non-negative by ahead_relu, get
no quantizer of their own: the pair sits on their input and the op stays between it and the
next pair (ORT's QDQ layout); the annotation `qgraph.quant_aliases` maps such an op's
output to the quantized tensor whose grid it stays on. Nodes a rule skips read the float
tensor.

Storage: weights int8; activations uint8 when asymmetric, int8 when symmetric; tensors marked
non-negative cover [0, max] (`nonnegative_storage`: uint8 with zp 0, or int8 with the
negative half unused). Bits 2–7 keep int8/uint8 storage with a narrower [qmin, qmax]; since
QuantizeLinear saturates only at the storage bounds, a sub-8-bit activation pair is preceded
by Clip(x, (qmin−z)·s, (qmax−z)·s); sub-8-bit weights need no Clip (their scale comes from
their own range; a trainer must respect qmin/qmax from the annotation).

Until `calibrate` runs, activation ranges default to [-1, 1] ([0, 1] for non-negative
tensors, `fixed_range` where configured) and `qgraph.calibrated` is false. Every quantizer
is described in `qgraph.quantizers`: {float tensor: annotations.QuantizerRecord}.

Invariant: changes outputs (quantization).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import onnx_graphsurgeon as gs

from qgraph import quant
from qgraph.annotations import (CALIBRATED, NONNEGATIVE, QUANT_ALIASES, QuantizerRecord, get_annotation,
                                set_annotation, write_quantizers)
from qgraph.errors import PassError
from qgraph.graph import Node, QModel, Tensor
from qgraph.idioms import clip_bounds_or_none, constant_tensors, is_range_preserving, skip
from qgraph.pipeline import PassContext, register_pass
from qgraph.qconfig import ActivationSpec, NodeConfig, QConfigResolver, WeightSpec
from qgraph.qparams import activation_qparams, constant_input_values, weight_qparams

QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool",
               "GlobalAveragePool", "Relu", "Clip", "Sigmoid", "Resize")
DEFAULT_RANGE = (-1.0, 1.0)             # activation range before calibration
DEFAULT_NONNEGATIVE_RANGE = (0.0, 1.0)
_FLOAT_TYPES = (np.float32, np.float16, np.float64)


@register_pass("insert_qdq", preserves_outputs=False)
def insert_qdq(model: QModel, ctx: PassContext, *, weights: dict = asdict(WeightSpec()),
               activations: dict = asdict(ActivationSpec()), rules: list = []) -> dict:  # noqa: B006
    """Insert QuantizeLinear/DequantizeLinear on weights and activations by rules (HAT priority)."""
    resolver = QConfigResolver(weights, activations, rules)
    existing = [n.name for n in model.graph.nodes if n.op == "QuantizeLinear"]
    if existing:
        raise PassError(f"insert_qdq: the model already has {len(existing)} QuantizeLinear nodes "
                        f"(e.g. '{existing[0]}'); run it once, on a float model")
    model.cleanup()
    plan = QuantPlan(model, resolver, set(get_annotation(model, NONNEGATIVE, []) or []))
    plan.collect()
    weight_values = constant_input_values(model, [t for t, *_ in plan.weights.values()])
    records: dict[str, QuantizerRecord] = {}
    for name, (tensor, spec, axis, node) in plan.weights.items():
        records[tensor.name] = add_weight_quantizer(model, tensor, spec, axis, node, weight_values[name],
                                                    plan.skipped_nodes)
    for name, (tensor, spec, node) in plan.activations.items():
        nonneg = name in plan.nonnegative
        record = add_activation_quantizer(model, tensor, spec, node, nonneg, plan.range_cap(tensor),
                                          plan.skipped_nodes)
        records[record.tensor] = record
    model.cleanup()
    write_quantizers(model, records)
    set_annotation(model, QUANT_ALIASES, plan.aliases or None)
    set_annotation(model, CALIBRATED, False)
    n_w = sum(r.kind == "weight" for r in records.values())
    n_a = len(records) - n_w
    warnings = resolver.unmatched_warnings() + plan.warnings
    summary = (f"{n_w} weight + {n_a} activation quantizers, {len(plan.aliases)} range-preserving ops share one; "
               f"uncalibrated (activation ranges default to [-1, 1], [0, 1] if non-negative): run calibrate")
    return {"changed": len(records), "summary": summary, "weights": n_w, "activations": n_a,
            "aliases": len(plan.aliases), "calibrated": False, "skipped": plan.skipped, "warnings": warnings}


# -- pattern: which tensors get which quantizer ----------------------------------------------

class QuantPlan:
    """Decides the quantized tensors (one quantizer each) before the graph is touched."""

    def __init__(self, model: QModel, resolver: QConfigResolver, nonnegative: set[str]):
        self.model = model
        self.resolver = resolver
        self.nonnegative = nonnegative
        self.configs: dict[str, NodeConfig] = {n.name: resolver.resolve(n) for n in model.graph.nodes}
        self.weights: dict[str, tuple[Tensor, WeightSpec, int | None, Node]] = {}
        self.activations: dict[str, tuple[Tensor, ActivationSpec, Node]] = {}
        self.aliases: dict[str, str] = {}
        self.skipped: list[dict] = []
        self.warnings: list[str] = []
        self.skipped_nodes: set[str] = {name for name, c in self.configs.items() if c.skip}
        self.constant = constant_tensors(model)

    def collect(self) -> None:
        nodes = list(self.model.graph.nodes)
        quantized = []
        for node in nodes:
            if node.op not in QUANTIZABLE or self.is_pass_through(node):
                continue
            if all(self.is_constant(t) for t in node.inputs if t.name):
                continue  # part of a weight computed in-graph (forward-fused BN), not an activation
            if self.configs[node.name].skip:
                self.skipped.append(skip(node, "a rule says skip: true"))
                continue
            roles = self.roles(node)
            if roles is None:
                continue
            quantized.append((node, roles))
        for node, (weights, _) in quantized:      # weights
            for index, axis in weights:
                self.request_weight(node, node.inputs[index], axis)
        for node, _ in quantized:                 # producers ask first, so their config wins
            cfg = self.configs[node.name]
            if cfg.quantize_output and node.outputs and self.is_float(node.outputs[0]):
                self.request_activation(node.outputs[0], cfg.activations, node)
        for node, (_, inputs) in quantized:
            cfg = self.configs[node.name]
            if cfg.quantize_input:
                for index in inputs:
                    self.request_activation(self.root(node.inputs[index]), cfg.activations, node)
        for node in nodes:
            if self.is_pass_through(node) and node.outputs:
                root = self.root(node.inputs[0])
                if root.name in self.activations:
                    self.aliases[node.outputs[0].name] = root.name

    # -- node roles --------------------------------------------------------------------
    def roles(self, node: Node) -> tuple[list[tuple[int, int | None]], list[int]] | None:
        """(weight inputs with their channel axis, activation inputs) of a quantizable node,
        or None (with a skipped entry) when its weight is not a constant."""
        op, ins = node.op, node.inputs
        if op in ("Conv", "ConvTranspose", "Gemm"):
            if len(ins) < 2 or not self.is_constant(ins[1]):
                self.skipped.append(skip(node, "its weight is not a constant (graph input?)"))
                return None
            return [(1, self.weight_axis(node))], [0]
        if op in ("MatMul", "Add", "Mul", "Concat"):
            weights, acts = [], []
            for i, t in enumerate(ins):
                if self.is_constant(t):
                    if self.is_float(t):
                        weights.append((i, self.weight_axis(node) if op == "MatMul" and i == 1 else None))
                elif self.is_float(t):
                    acts.append(i)
            return weights, acts
        return [], [0] if ins and self.is_float(ins[0]) else []

    def weight_axis(self, node: Node) -> int | None:
        """The output-channel axis of the weight, or None where per-channel does not apply."""
        w = node.inputs[1]
        ndim = len(w.shape) if w.shape is not None else None
        if node.op == "Conv":
            return 0
        if node.op == "ConvTranspose":
            return 1 if int(node.attrs.get("group", 1)) == 1 else None
        if node.op == "Gemm":
            return 0 if int(node.attrs.get("transB", 0)) else 1
        if node.op == "MatMul" and ndim == 2:
            return 1
        return None

    def is_pass_through(self, node: Node) -> bool:
        """Range-preserving ops (idioms.RANGE_PRESERVING) and Relu/Clip(0, ·) of a tensor already
        quantized over [0, max] keep their input's grid: no quantizer of their own."""
        if self.configs[node.name].skip or not node.inputs:
            return False
        if is_range_preserving(node):
            return True
        return node.op in ("Relu", "Clip") and node.inputs[0].name in self.nonnegative

    def root(self, tensor: Tensor) -> Tensor:
        """Walk back through range-preserving ops to the tensor that carries the quantizer."""
        seen = 0
        while tensor.inputs and self.is_pass_through(tensor.inputs[0]) and seen < 10_000:
            tensor = tensor.inputs[0].inputs[0]
            seen += 1
        return tensor

    def is_constant(self, tensor: Tensor) -> bool:
        """A constant, or computed from constants only (e.g. a forward-fused BN weight)."""
        return tensor.name in self.constant

    @staticmethod
    def is_float(tensor: Tensor) -> bool:
        dtype = tensor.dtype
        if isinstance(tensor, gs.Constant):
            dtype = tensor.values.dtype
        return dtype is None or np.dtype(dtype).type in _FLOAT_TYPES

    # -- requests ------------------------------------------------------------------------
    def request_weight(self, node: Node, tensor: Tensor, axis: int | None) -> None:
        spec = self.configs[node.name].weights
        if tensor.name in self.weights:
            if self.weights[tensor.name][1] != spec:
                self.warnings.append(f"weight '{tensor.name}' is shared by '{self.weights[tensor.name][3].name}' "
                                     f"and '{node.name}' with different configs; the first one is used")
            return
        self.weights[tensor.name] = (tensor, spec, axis if spec.per_channel else None, node)

    def request_activation(self, tensor: Tensor, spec: ActivationSpec, node: Node) -> None:
        if tensor.name in self.activations or tensor.name in self.weights or isinstance(tensor, gs.Constant):
            return
        self.activations[tensor.name] = (tensor, spec, node)

    def range_cap(self, tensor: Tensor) -> float | None:
        """Upper bound of a non-negative tensor read only by Clip(0, m) nodes: max m."""
        if tensor.name not in self.nonnegative or not tensor.outputs:
            return None
        caps = []
        for reader in tensor.outputs:
            bounds = clip_bounds_or_none(reader) if reader.op == "Clip" else None
            if bounds is None or not np.isfinite(bounds[1]):
                return None
            caps.append(bounds[1])
        return max(caps)


# -- rewrite: building the pairs ---------------------------------------------------------

def add_weight_quantizer(model: QModel, tensor: Tensor, spec: WeightSpec, axis: int | None, node: Node,
                         value: np.ndarray, skipped_nodes: set[str]) -> QuantizerRecord:
    qmin, qmax = quant.qrange(spec.bits, True, spec.narrow_range)
    record = QuantizerRecord(kind="weight", tensor=tensor.name, node=node.name, bits=spec.bits, signed=True,
                             symmetric=spec.symmetric, narrow_range=spec.narrow_range, pow2=spec.pow2,
                             per_channel=axis is not None, axis=axis, qmin=qmin, qmax=qmax,
                             observer=spec.observer, nonnegative=False)
    scale, zp = weight_qparams(value, record)
    _build_pair(model, tensor, record, scale, zp, skipped_nodes)
    return record


def add_activation_quantizer(model: QModel, tensor: Tensor, spec: ActivationSpec, node: Node, nonnegative: bool,
                             range_cap: float | None, skipped_nodes: set[str]) -> QuantizerRecord:
    signed = spec.storage_signed(nonnegative)
    qmin, qmax = quant.qrange(spec.bits, signed, spec.narrow_range)
    record = QuantizerRecord(
        kind="activation", tensor=tensor.name, node=node.name, bits=spec.bits, signed=signed,
        symmetric=spec.symmetric or nonnegative, narrow_range=spec.narrow_range, pow2=spec.pow2,
        per_channel=False, axis=None, qmin=qmin, qmax=qmax, observer=spec.observer, nonnegative=nonnegative,
        averaging_constant=spec.averaging_constant, percentile=spec.percentile, bins=spec.bins,
        fixed_range=list(map(float, spec.fixed_range)) if spec.fixed_range is not None else None,
        range_cap=range_cap)
    if record.fixed_range is not None:
        lo, hi = record.fixed_range
    else:
        lo, hi = DEFAULT_NONNEGATIVE_RANGE if nonnegative else DEFAULT_RANGE
    scale, zp = activation_qparams(lo, hi, record)
    graph_output = model.is_graph_output(tensor)
    _build_pair(model, tensor, record, scale, zp, skipped_nodes)
    if graph_output:
        record.tensor = tensor.name  # renamed: the graph output is now the DQ output
    return record


def _build_pair(model: QModel, tensor: Tensor, record: QuantizerRecord, scale: np.ndarray, zp: np.ndarray,
                skipped_nodes: set[str]) -> None:
    """x [→ Clip] → QuantizeLinear → DequantizeLinear, readers (but skipped nodes) moved to the DQ."""
    base = tensor.name
    readers = [n for n in tensor.outputs if n.name not in skipped_nodes]
    graph_output = model.is_graph_output(tensor)
    storage = quant.storage_dtype(record.signed)
    s = _constant(model, f"{base}_scale", np.asarray(scale, np.float32))
    z = _constant(model, f"{base}_zero_point", np.asarray(zp).astype(storage))
    attrs = {"axis": int(record.axis)} if record.axis is not None else {}
    source = tensor
    record.clip = None
    if record.kind == "activation" and record.bits < 8:
        lo, hi = quant.grid_bounds(scale, zp, record.qmin, record.qmax)
        clipped = model.add_variable(f"{base}_clipped", np.float32, tensor.shape)
        clip = model.add_node("Clip", [tensor, _constant(model, f"{base}_clip_min", lo),
                                       _constant(model, f"{base}_clip_max", hi)], [clipped], f"{base}_Clip")
        record.clip = clip.name
        source = clipped
    q_out = model.add_variable(f"{base}_quantized", storage, tensor.shape)
    dq_out = model.add_variable(f"{base}_dequantized", np.float32, tensor.shape)
    q = model.add_node("QuantizeLinear", [source, s, z], [q_out], f"{base}_QuantizeLinear", attrs)
    dq = model.add_node("DequantizeLinear", [q_out, s, z], [dq_out], f"{base}_DequantizeLinear", attrs)
    record.quantize, record.dequantize, record.scale, record.zero_point = q.name, dq.name, s.name, z.name
    for reader in readers:
        reader.inputs = [dq_out if t is tensor else t for t in reader.inputs]
    if graph_output:  # the graph output keeps its name and now carries the quantized value
        dq_out.dtype, dq_out.shape = tensor.dtype or np.float32, tensor.shape
        model.graph.outputs = [dq_out if t is tensor else t for t in model.graph.outputs]
        name = tensor.name
        tensor.name = model.add_variable(f"{name}_float").name
        dq_out.name = name


def _constant(model: QModel, name: str, value: np.ndarray) -> gs.Constant:
    """An initializer keeping a 0-d value 0-d (per-tensor scales and zero points must be scalars)."""
    const = model.add_constant(name, value)
    const.values = np.asarray(value)
    return const
