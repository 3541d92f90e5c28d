"""`qgraph profile`: where ONNX Runtime spends a model's time, and what qgraph could change.

For one model, or two side by side (a float model and its lowered form): ORT latency at batch 1
and at a chosen batch (median and the 10th–90th percentile spread of repeated runs, after
warm-up), and ORT's own per-node profile (``SessionOptions.enable_profiling``; its JSON is
written to a temporary folder and removed) grouped by op type, with the top nodes.

Each profiled node is put in a role from qgraph's knowledge of the *model* graph — quantizer
boundary, a float island between a DequantizeLinear and a QuantizeLinear, constant weights
dequantized on every run, a layout Transpose, a lookup table (Cast + GatherElements), integer
requantization done by generic ops, float compute left in a quantized model, or a node ORT
made itself (layout conversions, fused kernels) — and each op type's row says what qgraph could
change about the roles that cost the most. Design decisions:

- ORT's optimizer renames, fuses and inserts nodes; a profiled node whose name is not a node
  of the model is ORT's own ("ORT: …"), never guessed back to a model node.
- Latency uses ORT's default graph optimizations and the given thread count, the way a
  deployment would run; the profiling session is a separate session (profiling costs time).
- A model whose batch is fixed runs at that batch in both columns.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from qgraph.data import check_data
from qgraph.errors import DataError, ModelError
from qgraph.runner import Runner

__all__ = ["profile_models", "ProfileReport", "ModelProfile", "Latency", "OpCost", "NodeCost", "node_roles"]

# -- roles of model nodes --------------------------------------------------------------------------

#: role -> what qgraph could change about nodes in it (empty: the work itself)
ROLE_HINTS = {
    "boundary quantizer": "the model's float<->int8 boundary: feed and read int8 to drop it",
    "weight Q/DQ": "constant weights quantized or dequantized on every run (ORT did not fuse this QDQ "
                   "group): `qgraph lower --target qlinear` stores them as integers once",
    "QDQ float op": "the op of a QDQ group ORT did not fuse runs in float on dequantized inputs: "
                    "`qgraph lower --target qlinear` makes it an integer kernel",
    "activation quantizer": "activation Q/DQ of a QDQ model: `qgraph lower` turns each group into one integer op",
    "float island": "a detour DequantizeLinear -> (float ops) -> QuantizeLinear: `qgraph lower -v` says why "
                    "its ops stayed float; an integer op or requantization would replace the pair",
    "float activation": "a unary activation run in float between DequantizeLinear and QuantizeLinear, the "
                        "qlinear lowering's choice where ORT runs it faster than a 256-entry table and it "
                        "writes the table's codes (HardSwish, HardSigmoid; qgraph/lowering/qlinear.py)",
    "float compute in quantized model": "left float in a quantized model: check the insert_qdq rules and "
                                        "`qgraph lower -v`",
    "lookup table": "a unary activation as a 256-entry table (Cast + GatherElements, the lowering's table "
                    "form; a plain Gather copies byte by byte, 3x slower): ORT has no integer lookup op for "
                    "arbitrary tables; a SiLU's runs as ORT's QLinearSigmoid -> QLinearMul once its sigmoid is "
                    "quantized as ORT does (insert_qdq `split_regions: [silu]`: one more 8-bit rounding)",
    "integer requantization": "integer-target requantization as generic int ops (meant for integer engines; on "
                              "ORT the qlinear target does it inside QLinear* kernels)",
    "integer clamp": "a Clip on integer codes after an integer op: when its bound is the grid's end the "
                     "lowered output range already clamps",
    "constant transpose": "transposes a constant on every run: fold it (canonicalize folds constants)",
    "layout": "layout/shape movement (Transpose, Reshape, …): cancelling pairs or folding into "
              "neighbouring weights removes it",
    "dynamic quantization": "measures a range on every run: static, calibrated quantizers "
                            "(`qgraph passes run --pipeline ptq`) remove it",
    "integer compute": "",
    "depthwise off-block": "a depthwise QLinearConv whose channel count is off a multiple of 16: ORT's kernel runs "
                           "16 channels a step and the rest at up to half speed; `qgraph lower --target qlinear` "
                           "pads such convs to whole blocks (the neighbouring convs compute and ignore the extra "
                           "channels; a Pad and a Slice only where they cannot)",
    "float compute": "quantizing it (ptq, then `qgraph lower`) moves it to integer kernels",
    "other": "",
    "ORT layout": "layout conversions ORT inserted for its NCHWc/NHWC kernels: not in the model",
    "ORT fused": "a kernel ORT fused from several model nodes",
}

_INTEGER_COMPUTE = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat",
                    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
                    "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                    "DynamicQuantizeLSTM", "QGemm"}
_FLOAT_COMPUTE = {"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Einsum", "Softmax",
                  "LayerNormalization", "BatchNormalization", "InstanceNormalization", "AveragePool",
                  "GlobalAveragePool", "Sigmoid", "Tanh", "Exp", "Erf", "Gelu", "HardSwish", "HardSigmoid",
                  "Resize", "MaxPool", "ReduceMean", "ReduceSum", "Mul", "Add", "Sub", "Div", "Relu", "Clip",
                  "LeakyRelu", "Pow", "Sqrt"}
_LAYOUT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Expand",
           "Identity", "Tile", "Pad", "Gather", "Shape"}
_INT_ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Mod", "Cast", "BitShift", "Round", "ReduceSum", "Max", "Min"}
_ORT_LAYOUT = {"ReorderInput", "ReorderOutput", "Transpose"}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types only refine the roles
        typed = model
    g = typed.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


_TABLE_OPS = ("Gather", "GatherElements")      # a constant table indexed by integer codes
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def node_roles(model: onnx.ModelProto) -> dict[str, str]:
    """node name -> role (a key of ROLE_HINTS) of every named node of ``model``."""
    from qgraph.describe import float_activation_nodes, integer_ops, qdq_pairs
    from qgraph.idioms import constant_tensors

    g = model.graph
    constants = constant_tensors(model)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in g.node:
        for t in n.input:
            consumers[t].append(n)
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    types = _elem_types(model)
    lowered = integer_ops(model) > 0
    quantized = lowered or bool(qdq_pairs(model))

    def is_float(t):
        return types.get(t, onnx.TensorProto.FLOAT) in _FLOAT_TYPES

    island = _float_islands(g, producer, consumers) if lowered else set()
    activations = float_activation_nodes(model) if lowered else set()
    shapes = {i.name: tuple(i.dims) for i in g.initializer}
    roles = {}
    for n in g.node:
        op = n.op_type
        if n.name and n.name in activations:
            role = "float activation"
        elif op == "QuantizeLinear":
            role = ("boundary quantizer" if n.input[0] in graph_inputs
                    else "float island" if n.name in island else "activation quantizer")
            if n.input[0] in constants:
                role = "weight Q/DQ"
        elif op == "DequantizeLinear":
            if n.input[0] in constants or producer.get(n.input[0], n).op_type == "QuantizeLinear" \
                    and producer[n.input[0]].input[0] in constants:
                role = "weight Q/DQ"
            elif n.output[0] in graph_outputs:
                role = "boundary quantizer"
            else:
                role = "float island" if n.name in island else "activation quantizer"
        elif op == "DynamicQuantizeLinear":
            role = "dynamic quantization"
        elif op == "QLinearConv" and _off_block_depthwise(n, shapes):
            role = "depthwise off-block"
        elif op in _INTEGER_COMPUTE:
            role = "integer compute"
        elif op in _TABLE_OPS and lowered and n.input[0] in constants and not is_float(n.input[1]):
            role = "lookup table"   # its codes come from a Cast, or straight from a requantization's int32
        elif op == "Cast" and any(c.op_type in _TABLE_OPS and c.input[0] in constants and c.input[1] == n.output[0]
                                  for c in consumers[n.output[0]]):
            role = "lookup table"
        elif op == "Transpose" and n.input[0] in constants:
            role = "constant transpose"
        elif op == "Clip" and lowered and not is_float(n.input[0]):
            role = "integer clamp"
        elif op in _INT_ARITHMETIC and lowered and not all(is_float(t) for t in n.input if t):
            role = "integer requantization"
        elif op in _LAYOUT:
            role = "layout"
        elif op in _FLOAT_COMPUTE and n.input and not is_float(n.input[0]):
            role = "integer compute"        # MaxPool, Resize, ... moved onto the codes
        elif op in _FLOAT_COMPUTE:
            if not quantized:
                role = "float compute"
            elif lowered:
                role = "float island" if n.name in island else "float compute in quantized model"
            else:
                role = "QDQ float op" if any(producer.get(t) is not None and producer[t].op_type == "DequantizeLinear"
                                             for t in n.input) else "float compute in quantized model"
        else:
            role = "other"
        if n.name:
            roles[n.name] = role
    return roles


def _off_block_depthwise(node: onnx.NodeProto, shapes: dict[str, tuple]) -> bool:
    """A QLinearConv that qgraph's qlinear lowering would pad (qlinear.depthwise_padded_channels)."""
    from qgraph.lowering.qlinear import depthwise_padded_channels
    weight = shapes.get(node.input[3]) if len(node.input) > 3 else None
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return weight is not None and len(weight) > 2 and depthwise_padded_channels(group, weight) is not None


def _float_islands(g, producer, consumers) -> set[str]:
    """Names of the DequantizeLinear nodes of activations that reach a QuantizeLinear through
    float ops only (or directly: a requantization through float), those QuantizeLinear nodes and
    the float ops on the way."""
    names = set()
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in producer:
            continue
        seen, stack, path = set(), list(consumers[n.output[0]]), []
        reached_q = False
        while stack:
            c = stack.pop()
            if id(c) in seen:
                continue
            seen.add(id(c))
            if c.op_type == "QuantizeLinear":
                reached_q = True
                names.add(c.name)
                continue
            if c.op_type in ("DequantizeLinear",):
                continue
            path.append(c)
            for o in c.output:
                stack.extend(consumers.get(o, []))
        if reached_q:
            names.add(n.name)
            names.update(c.name for c in path)
    return names


# -- measurement ---------------------------------------------------------------------------------

@dataclass
class Latency:
    batch: int
    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float

    def as_dict(self) -> dict:
        return {"batch": self.batch, "runs": self.runs, "median_ms": self.median_ms, "p10_ms": self.p10_ms,
                "p90_ms": self.p90_ms}


@dataclass
class OpCost:
    op: str
    ms: float          # per run
    share: float       # of all profiled node time
    nodes: int         # kernels of this op type per run
    roles: dict        # role -> ms per run
    hint: str = ""

    def as_dict(self) -> dict:
        return {"op": self.op, "ms_per_run": self.ms, "share": self.share, "nodes": self.nodes,
                "roles": self.roles, "hint": self.hint}


@dataclass
class NodeCost:
    name: str
    op: str
    ms: float
    share: float
    role: str

    def as_dict(self) -> dict:
        return {"node": self.name, "op": self.op, "ms_per_run": self.ms, "share": self.share, "role": self.role}


@dataclass
class ModelProfile:
    label: str
    latency: list[Latency]
    ops: list[OpCost]
    top: list[NodeCost]
    profiled_batch: int
    profiled_runs: int
    threads: int

    def as_dict(self) -> dict:
        return {"model": self.label, "threads": self.threads, "latency": [x.as_dict() for x in self.latency],
                "profile": {"batch": self.profiled_batch, "runs": self.profiled_runs,
                            "ops": [o.as_dict() for o in self.ops], "top_nodes": [t.as_dict() for t in self.top]}}


@dataclass
class ProfileReport:
    models: list[ModelProfile] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"models": [m.as_dict() for m in self.models]}

    def format_table(self, top: int = 5) -> str:
        first = self.models[0]
        threads = "ORT's default threads" if first.threads == 0 else f"{first.threads} thread(s)"
        lines = [f"latency: ORT, {threads}; median [10th-90th percentile] ms per run"]
        width = max(len(m.label) for m in self.models) + 2
        batches = [x.batch for x in first.latency]
        lines.append(f"  {'model':<{width}}" + "".join(f"{'batch ' + str(b):>28}" for b in batches))
        for m in self.models:
            cells = []
            for i, x in enumerate(m.latency):
                ratio = ""
                if m is not first and i < len(first.latency) and first.latency[i].median_ms > 0:
                    ratio = f" {x.median_ms / first.latency[i].median_ms:.2f}x"
                cells.append(f"{x.median_ms:.3f} [{x.p10_ms:.3f}-{x.p90_ms:.3f}]{ratio}".rjust(28))
            lines.append(f"  {m.label:<{width}}" + "".join(cells))
        lines.append("")
        lines.append(f"ORT per-op profile at batch {first.profiled_batch} ({first.profiled_runs} runs; "
                     "ms per run and share of node time)")
        ops = list(dict.fromkeys(o.op for m in self.models for o in m.ops))
        by_model = [{o.op: o for o in m.ops} for m in self.models]
        ops.sort(key=lambda op: -max(b[op].ms if op in b else 0 for b in by_model))
        head = f"  {'op type':<26}" + "".join(f"{_short(m.label, 22):>22}" for m in self.models)
        lines.append(head + "  what qgraph could change")
        for op in ops:
            cells = "".join((f"{b[op].ms:9.3f} {100 * b[op].share:5.1f}% x{b[op].nodes:<4}" if op in b
                             else f"{'-':>9} {'':6} {'':5}").rjust(22) for b in by_model)
            costliest = max((b[op] for b in by_model if op in b), key=lambda o: o.ms)
            hint = costliest.hint if len(by_model) == 1 else \
                f"({_short(self.models[by_model.index(next(b for b in by_model if b.get(op) is costliest))].label, 24)}) " \
                f"{costliest.hint}" if costliest.hint else ""
            lines.append(f"  {op:<26}{cells}  {hint}")
        for m in self.models:
            lines.append("")
            lines.append(f"top nodes of {m.label}:")
            for k, t in enumerate(m.top[:top], 1):
                lines.append(f"  {k}. {t.name} ({t.op}, {t.role}): {t.ms:.3f} ms, {100 * t.share:.1f}%")
        return "\n".join(lines)


def _short(label: str, width: int) -> str:
    name = os.path.basename(label)
    return name if len(name) < width - 1 else "…" + name[-(width - 3):]


def _feeds(plan, batch: int) -> tuple[dict, int]:
    """The first run of ``batch`` samples (or the model's fixed batch) and its size."""
    size = plan.run_size(batch)
    if size > plan.samples and plan.samples != 1:
        raise DataError(f"{plan.origin}: holds {plan.samples} samples; a batch of {size} needs at least {size} "
                        f"(give more data or a smaller --batch-size)")
    for feeds, count in plan.batches(batch, limit=size):
        return feeds, count
    raise DataError(f"{plan.origin}: no samples to run")


def _latency(runner, feeds: dict, batch: int, repeats: int, warmup: int) -> Latency:
    for _ in range(warmup):
        runner.run(feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(feeds)
        times.append(1e3 * (time.perf_counter() - start))
    q = np.percentile(times, [10, 90])
    return Latency(batch, repeats, statistics.median(times), float(q[0]), float(q[1]))


def _ort_profile(model: onnx.ModelProto, feeds: dict, threads: int, runs: int) -> list[dict]:
    """ORT's per-node events ("cat": "Node", "*_kernel_time") of ``runs`` runs; the profile file
    lives in a temporary folder that is removed before returning."""
    with tempfile.TemporaryDirectory(prefix="qgraph-profile-") as tmp:
        runner = Runner(model, threads=threads, profile_prefix=os.path.join(tmp, "ort"))
        try:
            runner.run(feeds)  # warm-up run, profiled too: dropped below
            for _ in range(runs):
                runner.run(feeds)
        finally:
            path = runner.session.end_profiling()
            del runner
        try:
            with open(path) as handle:
                events = json.load(handle)
        except (OSError, ValueError) as exc:
            raise ModelError(f"ONNX Runtime's profile could not be read ({exc})") from None
    nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 1) if runs + 1 else 0
    return nodes[per_run:]  # drop the warm-up run


#: the ops ORT inlines a HardSwish node into (its ONNX function body)
_INLINED_HARDSWISH = ("HardSigmoid", "Mul")
_ORT_SUFFIX = re.compile(r"(_nchwc|_token_\d+|_quant|_fused|_nhwc)+$")


def _ort_role(name: str, op: str, roles: dict[str, str], model_ops: dict[str, str], kind: str,
              inlined_hardswish: bool = False) -> str:
    """The role of a profiled node: its model node's (also when ORT only suffixed its name or
    fused an activation into it), else by op type for the kernels ORT made itself; ``kind`` is
    "float", "qdq" or "lowered"; `inlined_hardswish`: the model runs a HardSwish as a float
    activation, whose function body ORT runs under new names."""
    if name in roles and model_ops.get(name) == op:
        return roles[name]
    base = _ORT_SUFFIX.sub("", name)
    if base in roles and model_ops.get(base) == op:
        return roles[base]
    if op in _ORT_LAYOUT and base not in roles:
        return "ORT layout"
    if op in _INLINED_HARDSWISH and base not in roles and inlined_hardswish:
        return "float activation"
    if op in _INTEGER_COMPUTE:
        return "integer compute"
    if op.startswith("Fused") or op in _FLOAT_COMPUTE:
        return {"float": "float compute", "qdq": "QDQ float op"}.get(kind, "float compute in quantized model")
    return "ORT fused"


def _aggregate(model: onnx.ModelProto, events: list[dict], runs: int) -> tuple[list[OpCost], list[NodeCost]]:
    """Per node the median of its per-run durations (one slow run — a thread waking up — does not
    make a node look expensive), summed per op type."""
    from qgraph.describe import integer_ops, qdq_pairs
    roles = node_roles(model)
    model_ops = {n.name: n.op_type for n in model.graph.node if n.name}
    kind = "lowered" if integer_ops(model) else "qdq" if qdq_pairs(model) else "float"
    inlined_hardswish = any(model_ops.get(node) == "HardSwish" and role == "float activation"
                            for node, role in roles.items())
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e in events:
        durations[(e["name"][:-len("_kernel_time")], e.get("args", {}).get("op_name", "?"))].append(
            float(e.get("dur", 0)))
    nodes = []
    for (name, op), durs in durations.items():
        per_run = len(durs) / max(runs, 1)   # a node ORT runs several times per run (loops) counts each
        nodes.append(NodeCost(name, op, statistics.median(durs) * per_run / 1e3, 0.0,
                              _ort_role(name, op, roles, model_ops, kind, inlined_hardswish)))
    total = sum(n.ms for n in nodes) or 1.0
    by_op: dict[str, list[NodeCost]] = defaultdict(list)
    for n in nodes:
        n.share = n.ms / total
        by_op[n.op].append(n)
    ops = []
    for op, members in by_op.items():
        role_ms = Counter()
        for n in members:
            role_ms[n.role] += n.ms
        ops.append(OpCost(op, sum(n.ms for n in members), sum(n.share for n in members), len(members),
                          dict(role_ms.most_common()), _hint(op, role_ms)))
    ops.sort(key=lambda o: -o.ms)
    nodes.sort(key=lambda n: -n.ms)
    return ops, nodes


def _hint(op: str, roles: Counter) -> str:
    """The hint of the costliest role with one, named with its share of the op's time."""
    total = sum(roles.values()) or 1.0
    for role, us in roles.most_common():
        text = ROLE_HINTS.get(role, "")
        if text:
            share = f"{100 * us / total:.0f}% " if len(roles) > 1 else ""
            return f"{share}{role}: {text}"
    return ""


def profile_models(models: list[tuple[onnx.ModelProto, str]], data: dict, *, batch_size: int = 8,
                   repeats: int = 20, warmup: int = 3, threads: int = 0, profile_runs: int = 10) -> ProfileReport:
    """Latency at batch 1 and ``batch_size`` and ORT's per-op profile at ``batch_size`` of each
    model (the first is the reference of the latency ratios), fed from ``data``."""
    report = ProfileReport()
    for model, label in models:
        plan = check_data(data, model, origin="--data")
        runs = {}   # samples per run -> feeds (a model fed whole, or at a fixed batch, has one size)
        for b in (1, batch_size):
            feeds, count = _feeds(plan, plan.run_size(b))
            runs.setdefault(count, feeds)
        runner = Runner(model, threads=threads)
        latency = [_latency(runner, feeds, count, repeats, warmup) for count, feeds in runs.items()]
        del runner
        count, feeds = list(runs.items())[-1]
        events = _ort_profile(model, feeds, threads, profile_runs)
        ops, nodes = _aggregate(model, events, profile_runs)
        report.models.append(ModelProfile(label, latency, ops, nodes, count, profile_runs, threads))
    return report
