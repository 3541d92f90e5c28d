"""insert_qdq: QuantizeLinear→DequantizeLinear pairs where a deployment compiler puts them.

    y = DQ(Q(x)) = (clamp(round_half_even(x / s) + z, qmin, qmax) − z) · s

Placement (the integer region grows backwards from the compute ops):

1. Compute ops — Conv, ConvTranspose, Gemm, MatMul — read integers: their activation inputs
   and their weights are quantized.
2. A tensor that an integer op reads is quantized, and its producer then runs on integers too
   when it can (`INTEGER_OPS`: Add/Sub/Mul, Div by a constant, Concat, pools, Resize, Pad, a PRelu
   with one slope per channel (a per-channel table; one shared slope makes it a unary region), the
   clamps Relu/Clip, and unary regions — idioms.unary_regions: HardSwish, SiLU, GELU or a
   Sigmoid as exported count as one activation), so its inputs are quantized in turn.
3. Nothing else is: not the tensors inside a unary region (HardSwish's Add/Clip/Mul/Div
   intermediates), not index computation (idioms.index_tensors: Shape, anchor grids, Range),
   not tensors read only by float ops (LayerNormalization, Softmax, post-processing; a LayerNorm
   written out op by op counts as one — normal_form.written_out_layernorms; a unary region that
   first takes the Log, Sqrt or Reciprocal of its input — `STEEP_AT_ZERO`) or only
   by the graph output — a compute op whose output no integer op reads writes float (its
   lowering dequantizes the int32 accumulator).
4. Range-preserving ops (idioms.RANGE_PRESERVING) and Relu/Clip reading a tensor marked
   non-negative by ahead_relu share their input's quantizer: the pair sits on the input,
   `qgraph.quant_aliases` maps their output to it.

`split_regions` (e.g. `[silu]`) lists kinds of unary region (idioms.REGION_KINDS) to place op by
op instead, as ONNX Runtime's quantize_static does (idioms.split_region): SiLU ``x·σ(x)`` gets a
quantizer on σ(x), so the qlinear target runs it as ORT's QLinearSigmoid → QLinearMul — a byte
lookup and a multiply, faster in ORT than the exact 256-entry table of the whole SiLU — at the
cost of rounding σ to 8 bits, which the one-activation placement does not.

Rules (HAT priority, qgraph.qconfig) set bits and grids per node; `skip: true` keeps a node
float, `quantize_input: false` keeps its inputs float, `quantize_output: false` its output.
The report's `placement` says for every float activation why it is or is not quantized.

Weights: per channel (`axis` on the output channel) or per tensor, int8 storage, scales from
the weight's own range right away; a weight computed in-graph from constants (fuse_conv_bn's
forward mode) is a weight too. Constant operands of integer Add/Mul/Sub/Concat are per-tensor
weights. Biases stay float (lowering quantizes them to int32 with s_in · s_w).

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
from qgraph.annotations import (CALIBRATED, NONNEGATIVE, QUANT_ALIASES, RANGE_BOUNDS, QuantizerRecord, get_annotation,
                                set_annotation, write_quantizers)
from qgraph.errors import ConfigError, PassError
from qgraph.graph import Node, QModel, Tensor
from qgraph.idioms import (CLAMPS, RANGE_PRESERVING, REGION_KINDS, clip_bounds_or_none, constant_tensors, index_tensors,
                           is_range_preserving, skip, split_region, unary_regions)
from qgraph.normal_form import written_out_layernorms
from qgraph.pipeline import PassContext, register_pass
from qgraph.qconfig import POSITIONS, ActivationSpec, NodeConfig, QConfigResolver, WeightSpec
from qgraph.qparams import activation_qparams, constant_input_values, weight_qparams

#: A unary region that applies one of these to its input first runs float, its input unquantized:
#: log, √ and 1/x are steepest near zero, where a linear 8-bit grid is coarsest, and the tensors
#: models take them of are wide-ranged (STFT power in audio front ends: Silero VAD's speech
#: decisions on 48 chunks 90-98% -> 98-100%, DNSMOS's MOS error 0.93 -> 0.13 with its log-power
#: region float).
STEEP_AT_ZERO = ("Log", "Sqrt", "Reciprocal")

#: Compute ops: their inputs are always integers.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Ops that run on integers when their output is quantized (besides unary regions and clamps).
INTEGER_OPS = ("Add", "Sub", "Mul", "Div", "Concat", "AveragePool", "GlobalAveragePool", "MaxPool", "Resize",
               "Pad", "PRelu")
DEFAULT_RANGE = (-1.0, 1.0)             # activation range before calibration
DEFAULT_NONNEGATIVE_RANGE = (0.0, 1.0)
_FLOAT_TYPES = (np.float32, np.float16, np.float64)


@register_pass("insert_qdq", preserves_outputs=False)
def insert_qdq(model: QModel, ctx: PassContext, *, weights: dict = asdict(WeightSpec()),
               activations: dict = asdict(ActivationSpec()), rules: list = [],  # noqa: B006
               split_regions: list = []) -> dict:  # noqa: B006
    """Insert QuantizeLinear/DequantizeLinear on weights and activations by rules (HAT priority).
    `split_regions` lists kinds of exported activation (idioms.REGION_KINDS) quantized op by op."""
    resolver = QConfigResolver(weights, activations, rules)
    unknown = sorted(set(split_regions) - set(REGION_KINDS))
    if unknown:
        raise ConfigError(f"pass 'insert_qdq' parameter 'split_regions': unknown kind(s) {', '.join(unknown)}; "
                          f"choose from: {', '.join(REGION_KINDS)}")
    existing = [n.name for n in model.graph.nodes if n.op == "QuantizeLinear"]
    if existing:
        raise PassError(f"insert_qdq: the model already has {len(existing)} QuantizeLinear nodes "
                        f"(e.g. '{existing[0]}'); run it once, on a float model")
    model.cleanup()
    plan = QuantPlan(model, resolver, set(get_annotation(model, NONNEGATIVE, []) or []), set(split_regions),
                     get_annotation(model, RANGE_BOUNDS, {}) or {})
    plan.collect()
    weight_values = constant_input_values(model, [t for t, *_ in plan.weights.values()])
    records: dict[str, QuantizerRecord] = {}
    for name, (tensor, spec, axis, node) in plan.weights.items():
        records[tensor.name] = add_weight_quantizer(model, tensor, spec, axis, node, weight_values[name],
                                                    plan.skipped_nodes)
    for name, (tensor, spec, node) in plan.activations.items():
        nonneg = name in plan.nonnegative
        record = add_activation_quantizer(model, tensor, spec, node, nonneg, plan.range_bounds(tensor),
                                          plan.skipped_nodes)
        records[record.tensor] = record
    model.cleanup()
    write_quantizers(model, records)
    set_annotation(model, QUANT_ALIASES, plan.aliases or None)
    set_annotation(model, CALIBRATED, False)
    n_w = sum(r.kind == "weight" for r in records.values())
    n_a = len(records) - n_w
    warnings = resolver.unmatched_warnings() + plan.warnings
    regions = {}
    for region in plan.regions:
        regions[region.kind] = regions.get(region.kind, 0) + 1
    summary = (f"{n_w} weight + {n_a} activation quantizers, {len(plan.aliases)} range-preserving ops share one, "
               f"{len(plan.regions)} unary regions as one activation each; uncalibrated (activation ranges "
               f"default to [-1, 1], [0, 1] if non-negative): run calibrate")
    return {"changed": len(records), "summary": summary, "weights": n_w, "activations": n_a,
            "aliases": len(plan.aliases), "unary_regions": regions, "calibrated": False,
            "placement": dict(sorted(plan.placement.items())), "skipped": plan.skipped, "warnings": warnings,
            "positions": {place: sorted(name for name, places in plan.positions.items() if place in places)
                          for place in POSITIONS}}


# -- pattern: which tensors get which quantizer ----------------------------------------------

def weighted_positions(model: QModel, constant: set[str]) -> dict[str, frozenset[str]]:
    """The places (qconfig.POSITIONS) of each weighted node — a Conv/ConvTranspose/Gemm with a
    constant weight, a MatMul with one constant operand, reading some non-constant tensor:
    `first` when no weighted node feeds it, directly or through any other ops (a stem, a patch
    embedding; one per input branch), `last` when it feeds no weighted node (a classifier, each
    head of a detector). A model with one weighted node has it in both. The nodes are in
    topological order (cleanup sorts them), so one pass each way decides."""
    def weighted(node: Node) -> bool:
        names = [t.name for t in node.inputs if t.name]
        if node.op not in COMPUTE_OPS or all(n in constant for n in names):
            return False
        if node.op == "MatMul":
            return any(n in constant for n in names[:2])
        return len(names) > 1 and node.inputs[1].name in constant

    nodes = list(model.graph.nodes)
    is_weighted = {n.name for n in nodes if weighted(n)}
    places: dict[str, set[str]] = {name: set() for name in is_weighted}
    for order, read, write, place in ((nodes, "inputs", "outputs", "first"),
                                      (nodes[::-1], "outputs", "inputs", "last")):
        reached: set[str] = set()    # tensors downstream (upstream) of a weighted node
        for node in order:
            touched = any(t.name in reached for t in getattr(node, read) if t.name)
            if node.name in is_weighted and not touched:
                places[node.name].add(place)
            if touched or node.name in is_weighted:
                reached.update(t.name for t in getattr(node, write) if t.name and t.name not in constant)
    return {name: frozenset(p) for name, p in places.items()}


class QuantPlan:
    """Decides the quantized tensors (one quantizer each) before the graph is touched."""

    def __init__(self, model: QModel, resolver: QConfigResolver, nonnegative: set[str],
                 split_kinds: set[str] = frozenset(), bounded: dict | None = None):
        self.model = model
        self.resolver = resolver
        self.nonnegative = nonnegative
        self.bounded = {name: tuple(b) for name, b in (bounded or {}).items()}
        self.constant = constant_tensors(model)
        self.positions = weighted_positions(model, self.constant)
        self.configs: dict[str, NodeConfig] = {n.name: resolver.resolve(n, self.positions.get(n.name, frozenset()))
                                               for n in model.graph.nodes}
        self.weights: dict[str, tuple[Tensor, WeightSpec, int | None, Node]] = {}
        self.activations: dict[str, tuple[Tensor, ActivationSpec, Node]] = {}
        self.aliases: dict[str, str] = {}
        self.skipped: list[dict] = []
        self.warnings: list[str] = []
        self.placement: dict[str, str] = {}      # float activation -> why it is (not) quantized
        self.skipped_nodes: set[str] = {name for name, c in self.configs.items() if c.skip}
        self.index = index_tensors(model)
        self.layernorm_nodes = {n.name for nodes in written_out_layernorms(model) for n in nodes}
        self.regions = []
        for region in unary_regions(model):
            if region.input in self.index:
                continue
            if region.kind in split_kinds:
                self.regions += split_region(model, region, INTEGER_OPS)
            else:
                self.regions.append(region)
        self.region_by_output = {r.output: r for r in self.regions}
        self.region_of_node = {name: r for r in self.regions for name in r.nodes}
        self.nodes = {n.name: n for n in model.graph.nodes}
        #: regions that first take the Log/Sqrt/Reciprocal of their input: output -> that op
        self.steep = {r.output: op for r in self.regions if (op := self._first_function(r)) in STEEP_AT_ZERO}
        self.integer: set[str] = set()          # units (node names; a region by its last node) on integers

    # -- the integer region -------------------------------------------------------------
    def collect(self) -> None:
        requests: dict[str, tuple[Tensor, Node, str]] = {}
        work: list[Tensor] = []

        def request(tensor: Tensor, reader: Node, why: str) -> None:
            tensor = self.root(tensor)
            if tensor.name in requests or not self.is_activation(tensor):
                return
            producer = self.producer_unit(tensor)
            if producer is not None and not self.configs[producer.name].quantize_output:
                self.placement.setdefault(tensor.name, f"not quantized: rule quantize_output: false on "
                                                       f"'{producer.name}'")
                return
            requests[tensor.name] = (tensor, reader, why)
            work.append(tensor)

        for node in self.model.graph.nodes:
            if node.op not in COMPUTE_OPS or node.name in self.region_of_node:
                continue
            if all(self._read_only_by_steep_regions(t) for t in node.outputs if t.name):
                self.skipped.append(skip(node, "runs in float: only a Log/Sqrt/Reciprocal of its output is read "
                                               "(a power spectrum's mel filterbank), which needs the small values "
                                               "an 8-bit grid would round away"))
                continue
            roles = self.roles(node)
            if roles is None:
                continue
            cfg = self.configs[node.name]
            self.integer.add(node.name)
            for index, axis in roles[0]:
                self.request_weight(node, node.inputs[index], axis)
            if cfg.quantize_input:
                for index in roles[1]:
                    request(node.inputs[index], node, f"input of {node.op} '{node.name}'")
        while work:
            tensor = work.pop()
            unit = self.producer_unit(tensor)
            if unit is None or unit.name in self.integer:
                continue
            reason = self.integer_reason(unit)
            if reason:
                if unit.name not in self.skipped_nodes:
                    self.skipped.append(skip(unit, f"runs in float: {reason}"))
                continue
            self.integer.add(unit.name)
            weights, acts = self.unit_roles(unit)
            for index, axis in weights:
                self.request_weight(unit, unit.inputs[index], axis)
            for t in acts:
                request(t, unit, f"input of {self.describe(unit)}, which runs on integers")
        for name, (tensor, reader, why) in requests.items():
            producer = self.producer_unit(tensor)
            owner = producer if producer is not None and producer.name in self.integer else reader
            self.activations[name] = (tensor, self.configs[owner.name].activations, owner)
            self.placement[name] = "quantized: " + why
        for node in self.model.graph.nodes:
            if self.is_pass_through(node) and node.outputs:
                root = self.root(node.inputs[0])
                if root.name in self.activations:
                    self.aliases.update({out.name: root.name for out in node.outputs if out.name})
        self.explain_float_tensors()

    def producer_unit(self, tensor: Tensor) -> Node | None:
        """The node (or the last node of the unary region) that writes `tensor`."""
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None:
            return None
        region = self.region_by_output.get(tensor.name)
        return self.nodes[region.nodes[-1]] if region is not None else producer

    def integer_reason(self, unit: Node) -> str | None:
        """None when `unit` can run on integers, else why not."""
        if unit.name in self.skipped_nodes:
            return "a rule says skip: true"
        if not self.configs[unit.name].quantize_input:
            return "a rule says quantize_input: false"
        if unit.name in self.layernorm_nodes:
            return ("part of a LayerNorm written out op by op (kept float: its 8-bit pieces would cancel "
                    "E[x²] − E[x]² into noise)")
        if unit.name in self.region_of_node:
            first = self.steep.get(self.region_of_node[unit.name].output)
            if first is not None:
                return (f"it takes the {first} of its input first, steepest near zero where an 8-bit grid is "
                        "coarsest (a power spectrum's decades): kept float")
            return None
        if unit.op in COMPUTE_OPS or unit.op in CLAMPS or unit.op in RANGE_PRESERVING:
            return None
        if unit.op not in INTEGER_OPS:
            return f"{unit.op} has no integer form"
        if unit.op == "Div" and unit.inputs[1].name not in self.constant:
            return "Div by a tensor has no integer form (only division by a constant)"
        if unit.op == "PRelu" and unit.inputs[1].name not in self.constant:
            return "PRelu with a computed slope has no integer form"
        if all(t.name in self.constant for t in unit.inputs if t.name):
            return "computed from constants only"
        return None

    def _read_only_by_steep_regions(self, tensor: Tensor) -> bool:
        """Whether every reader of `tensor` is a region that first takes its Log/Sqrt/Reciprocal
        (STEEP_AT_ZERO), so a layer writing it — openwakeword's mel filterbank MatMul on the power
        spectrum, before Clip → Log — keeps the same small values float."""
        readers = list(tensor.outputs)
        if not readers or self.model.is_graph_output(tensor):
            return False
        for reader in readers:
            region = self.region_of_node.get(reader.name)
            if region is None or region.input != tensor.name or region.output not in self.steep:
                return False
        return True

    def _first_function(self, region) -> str:
        """The op of a region's first node past floors and clamps (Max/Min by a constant, Relu, Clip):
        ``Log(Max(p, ε))`` takes the Log of p."""
        for name in region.nodes:
            node = self.nodes[name]
            bounded = node.op in ("Max", "Min") and any(t.name in self.constant for t in node.inputs)
            if node.op not in CLAMPS and not bounded:
                return node.op
        return ""

    def unit_roles(self, unit: Node) -> tuple[list[tuple[int, int | None]], list[Tensor]]:
        """(constant weight inputs with their channel axis, activation input tensors) of a unit."""
        region = self.region_of_node.get(unit.name)
        if region is not None:
            return [], [self.model.tensor(region.input)]
        if unit.op in COMPUTE_OPS:
            roles = self.roles(unit)
            return (roles[0], [unit.inputs[i] for i in roles[1]]) if roles else ([], [])
        if unit.op in ("Add", "Sub", "Mul", "Concat"):
            weights = [(i, None) for i, t in enumerate(unit.inputs)
                       if t.name in self.constant and self.is_float(t) and t.name not in self.index]
            return weights, [t for t in unit.inputs if self.is_activation(t)]
        return [], [unit.inputs[0]] if unit.inputs and self.is_activation(unit.inputs[0]) else []

    def describe(self, unit: Node) -> str:
        region = self.region_of_node.get(unit.name)
        if region is not None:
            return f"{region.kind} '{region.output}'"
        return f"{unit.op} '{unit.name}'"

    def explain_float_tensors(self) -> None:
        """Why each float activation that got no quantizer has none."""
        for node in self.model.graph.nodes:
            for tensor in node.outputs:
                name = tensor.name
                if not name or name in self.placement or name in self.aliases or not self.is_float(tensor):
                    continue
                if name in self.constant:
                    continue
                if name in self.index:
                    self.placement[name] = "not quantized: index computation (computed from shapes)"
                elif node.name in self.region_of_node and self.region_of_node[node.name].output != name:
                    region = self.region_of_node[node.name]
                    self.placement[name] = f"not quantized: inside the {region.kind} computed as one activation " \
                                           f"of '{region.input}'"
                else:
                    readers = sorted({f"{c.op} '{c.name}'" for c in tensor.outputs})
                    where = ", ".join(readers[:3]) + (" ..." if len(readers) > 3 else "")
                    if self.model.is_graph_output(tensor) and not readers:
                        self.placement[name] = "not quantized: a graph output no integer op reads"
                    else:
                        self.placement[name] = f"not quantized: read only by float ops ({where})"

    # -- node roles --------------------------------------------------------------------
    def roles(self, node: Node) -> tuple[list[tuple[int, int | None]], list[int]] | None:
        """(weight inputs with their channel axis, activation inputs) of a compute op, or None
        (with a skipped entry) when its weight is not a constant."""
        op, ins = node.op, node.inputs
        if self.configs[node.name].skip:
            self.skipped.append(skip(node, "a rule says skip: true"))
            return None
        if all(t.name in self.constant for t in ins if t.name):
            return None  # part of a weight computed in-graph (forward-fused BN), not an activation
        if op in ("Conv", "ConvTranspose", "Gemm"):
            if len(ins) < 2 or not self.is_constant(ins[1]):
                self.skipped.append(skip(node, "its weight is not a constant (graph input?)"))
                return None
            return [(1, self.weight_axis(node))], [0] if self.is_activation(ins[0]) else []
        weights, acts = [], []
        for i, t in enumerate(ins[:2]):
            if self.is_constant(t):
                if self.is_float(t):
                    weights.append((i, self.weight_axis(node) if i == 1 else None))
            elif self.is_activation(t):
                acts.append(i)
        return weights, acts

    def is_activation(self, tensor: Tensor) -> bool:
        """A float tensor computed from the inputs: not constant, not index computation."""
        return bool(tensor.name) and tensor.name not in self.constant and tensor.name not in self.index \
            and self.is_float(tensor)

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
        if is_range_preserving(node, self.index):
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
        spec = self.configs[node.name].weights if node.op in COMPUTE_OPS else self.configs[node.name].activations
        if tensor.name in self.weights:
            if self.weights[tensor.name][1] != spec:
                self.warnings.append(f"weight '{tensor.name}' is shared by '{self.weights[tensor.name][3].name}' "
                                     f"and '{node.name}' with different configs; the first one is used")
            return
        self.weights[tensor.name] = (tensor, spec, axis if getattr(spec, "per_channel", False) else None, node)

    def range_bounds(self, tensor: Tensor) -> tuple[float | None, float | None]:
        """(floor, cap) of the values of `tensor` that its readers tell apart (None: unbounded):
        a non-negative tensor read only by Clip(0, m) nodes, (None, max m) — its grid starts at 0
        anyway; a tensor ahead_relu bounded (`qgraph.range_bounds`: the input of a HardSwish or
        HardSigmoid, flat beyond them), those bounds."""
        if tensor.name in self.nonnegative:
            if not tensor.outputs:
                return None, None
            caps = []
            for reader in tensor.outputs:
                bounds = clip_bounds_or_none(reader) if reader.op == "Clip" else None
                if bounds is None or not np.isfinite(bounds[1]):
                    return None, None
                caps.append(bounds[1])
            return None, max(caps)
        return self.bounded.get(tensor.name, (None, None))


# -- rewrite: building the pairs ---------------------------------------------------------

def add_weight_quantizer(model: QModel, tensor: Tensor, spec: WeightSpec | ActivationSpec, axis: int | None,
                         node: Node, value: np.ndarray, skipped_nodes: set[str]) -> QuantizerRecord:
    """A compute op's weight (WeightSpec: signed), or an elementwise op's constant operand
    quantized on the activations' grid (ActivationSpec), from the constant's own range."""
    if isinstance(spec, WeightSpec):
        signed, observer = True, spec.observer
    else:
        signed, observer, axis = spec.storage_signed(False), "minmax", None
    qmin, qmax = quant.qrange(spec.bits, signed, spec.narrow_range)
    record = QuantizerRecord(kind="weight", tensor=tensor.name, node=node.name, bits=spec.bits, signed=signed,
                             symmetric=spec.symmetric, narrow_range=spec.narrow_range, pow2=spec.pow2,
                             per_channel=axis is not None, axis=axis, qmin=qmin, qmax=qmax,
                             observer=observer, nonnegative=False)
    scale, zp = weight_qparams(value, record)
    _build_pair(model, tensor, record, scale, zp, skipped_nodes)
    return record


def add_activation_quantizer(model: QModel, tensor: Tensor, spec: ActivationSpec, node: Node, nonnegative: bool,
                             bounds: tuple[float | None, float | None], skipped_nodes: set[str]) -> QuantizerRecord:
    signed = spec.storage_signed(nonnegative)
    qmin, qmax = quant.qrange(spec.bits, signed, spec.narrow_range)
    record = QuantizerRecord(
        kind="activation", tensor=tensor.name, node=node.name, bits=spec.bits, signed=signed,
        symmetric=spec.symmetric or nonnegative, narrow_range=spec.narrow_range, pow2=spec.pow2,
        per_channel=False, axis=None, qmin=qmin, qmax=qmax, observer=spec.observer, nonnegative=nonnegative,
        averaging_constant=spec.averaging_constant, percentile=spec.percentile, bins=spec.bins,
        fixed_range=list(map(float, spec.fixed_range)) if spec.fixed_range is not None else None,
        range_floor=bounds[0], range_cap=bounds[1])
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
