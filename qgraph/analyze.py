"""`qgraph analyze`: where a quantized model loses its accuracy, tensor by tensor and quantizer by
quantizer, against its float source.

    SNR(t) = 10·log10(Σ t_float² / Σ (t_quant − t_float)²)        cosine(t) = ⟨t_float, t_quant⟩ / (‖·‖‖·‖)

- *cumulative*: every tensor the float and the quantized model share (by name), with the whole
  model quantized; a quantized tensor is read after its Q→DQ pair (what its readers see);
- *local*: each quantizer alone. Per tensor, the error the quantizer adds to the float tensor
  (DQ(Q(x_float)) against x_float); per quantizer (or per layer: every quantizer a layer
  reads), the model outputs with only it enabled and everything else float.
- range use: the share of float values more than half a step outside the grid (clipped) and the
  share of codes no value ever lands on (unused levels; per channel for weights, averaged).

Quantizers are found in any QDQ model: a QuantizeLinear with its DequantizeLinear readers, or a
DequantizeLinear of a constant integer weight (ORT's quantize_static) whose float original the
float model holds under the same name (without `_quantized`). One *switchboard* model serves
every local run: each quantizer's readers read ``Where(switches[i], DQ(Q(x)), x)``, with the
bool vector `switches` a graph input. A variant runs as the switchboard with its switches set
(`materialize`: the Wheres resolved, the pairs switched off dropped), in its own ORT session, at
the speed of the plain model; variants are tasks for qgraph.parallel (local processes or Ray).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qgraph import quant
from qgraph.annotations import read_quantizers, rescale_between
from qgraph.data import LABELS, check_data
from qgraph.diff import TensorStats
from qgraph.errors import DataError, ModelError
from qgraph.graph import QModel
from qgraph.idioms import CLAMPS, clip_bounds_or_none, constant_tensors, is_range_preserving, skip, unary_regions
from qgraph.lowering.patterns import Quantizer, read_quantizer
from qgraph.observers import StreamingHistogram
from qgraph.parallel import Evaluator

SWITCHES = "qgraph_switches"
ALTERNATES = "qgraph_alternates"
GRANULARITIES = ("quantizer", "layer")
HISTOGRAM_BINS = 512
MAX_COUNTED_LEVELS = 1 << 16


@dataclass
class QuantizerSite:
    """One quantizer of a QDQ model: the float tensor it reads (`source`), the DQ outputs its
    readers read (`outputs`), its grid and the layers reading it."""
    name: str
    kind: str                       # weight | activation
    source: str
    outputs: list[str]
    grid: Quantizer
    qmin: int
    qmax: int
    bits: int
    layers: list[str] = field(default_factory=list)
    weight: np.ndarray | None = None   # float value of a weight (from either model)
    view: tuple[float, float] | None = None   # the range the readers tell apart (Relu/Clip, a bounded HardSwish)
    producer: str = ""                 # the op computing an activation ("Conv", "Concat", graph input: "")

    def seen(self, x: np.ndarray) -> np.ndarray:
        """What the readers see of `x`: a tensor read only by Relu/Clip is compared after the clamp
        (ahead-ReLU quantizers cover [0, max] on purpose; the negative half never reaches anyone),
        one ahead_relu bounded (a HardSwish input) within its bounds."""
        return x if self.view is None else np.clip(x, self.view[0], self.view[1])

    @property
    def axis(self) -> int | None:
        return self.grid.axis if self.grid.per_channel else None

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        return quant.fake_quantize(x, self.grid.scale, self.grid.zero_point, self.qmin, self.qmax, axis=self.axis)

    def codes(self, x: np.ndarray) -> np.ndarray:
        return quant.quantize(x, self.grid.scale, self.grid.zero_point, self.qmin, self.qmax, axis=self.axis,
                              dtype=np.int64)

    def describe(self) -> dict:
        scale = np.asarray(self.grid.scale, np.float64).reshape(-1)
        return {"name": self.name, "kind": self.kind, "producer": self.producer, "bits": self.bits, "storage": self.grid.dtype.name,
                "per_channel": self.grid.per_channel, "scale": float(scale[0]) if scale.size == 1 else
                [float(scale.min()), float(scale.max())], "layers": self.layers}


def find_quantizers(quant_model: onnx.ModelProto, float_model: onnx.ModelProto | None = None
                    ) -> tuple[QModel, list[QuantizerSite], list[dict]]:
    """The quantizers of a QDQ model (see the module docstring), and why any pair was passed over."""
    model = QModel.from_onnx(quant_model)
    records = {r.quantize: r for r in read_quantizers(model).values()}
    constant = constant_tensors(model)
    hardswish = {r.output for r in unary_regions(model) if r.kind == "hardswish"}   # exported ones
    float_weights = {t.name: t for t in float_model.graph.initializer} if float_model is not None else {}
    sites: dict[str, QuantizerSite] = {}
    skipped = []
    for node in model.graph.nodes:
        if node.op != "DequantizeLinear":
            continue
        inp = node.inputs[0]
        producer = inp.inputs[0] if inp.inputs else None
        grid = read_quantizer(node, any_storage=True)
        if grid is None:
            skipped.append(skip(node, "its scale or zero point is computed, not a constant"))
            continue
        if producer is not None and producer.op == "QuantizeLinear":
            record = records.get(producer.name)
            source = producer.inputs[0]
            if record is not None and record.clip and source.inputs and source.inputs[0].name == record.clip:
                source = source.inputs[0].inputs[0]
            key = record.tensor if record is not None else source.name
            if key in sites:
                sites[key].outputs.append(node.outputs[0].name)
                continue
            kind = "weight" if source.name in constant else "activation"
            qmin, qmax = (record.qmin, record.qmax) if record else (grid.qmin, grid.qmax)
            bits = record.bits if record else 8 * grid.dtype.itemsize
            sites[key] = QuantizerSite(key, kind, source.name, [node.outputs[0].name], grid, qmin, qmax, bits,
                                       producer=_producer_op(source, hardswish) if kind == "activation" else "",
                                       view=record.reader_bounds if record is not None else None)
        elif isinstance(inp, gs.Constant) and np.asarray(inp.values).dtype.kind in "iu":
            name = inp.name[:-len("_quantized")] if inp.name.endswith("_quantized") else inp.name
            original = float_weights.get(name)
            if original is None or tuple(original.dims) != tuple(np.shape(inp.values)):
                skipped.append(skip(node, f"weight '{inp.name}' is stored quantized and the float model has no "
                                          f"'{name}' of its shape: it stays quantized in every local run"))
                continue
            value = onnx.numpy_helper.to_array(original).astype(np.float32)
            sites[name] = QuantizerSite(name, "weight", name, [node.outputs[0].name], grid, grid.qmin, grid.qmax,
                                        8 * grid.dtype.itemsize, weight=value)
    tensors = model.tensors()
    for site in sites.values():
        site.layers = _layers_reading([tensors[out] for out in site.outputs])
        site.view = _clamp_view([n for out in site.outputs for n in tensors[out].outputs]) or site.view
        if site.kind == "weight" and site.weight is None:
            value = QModel.constant_value(tensors[site.source])
            if value is not None:
                site.weight = np.asarray(value, np.float32)
    if not sites:
        raise ModelError("the quantized model holds no QuantizeLinear/DequantizeLinear pairs to analyze; "
                         "give a QDQ model (qgraph passes run ... --pipeline ptq, or ORT quantize_static)")
    return model, list(sites.values()), skipped


def _alternate_pair(board: QModel, site: QuantizerSite, source, alt_input, i: int, scale, zero_point, axis):
    """Q→DQ of the source on another grid (com.microsoft for 16 bits), and its selection flag."""
    name = f"{site.name}_qgraph_alt"
    s = board.add_constant(f"{name}_scale", np.asarray(scale, np.float32))
    z = board.add_constant(f"{name}_zero_point", np.asarray(zero_point))
    s.values, z.values = np.asarray(scale, np.float32), np.asarray(zero_point)
    attrs = {"axis": int(axis)} if axis is not None else {}
    domain = quant.qdq_domain(np.asarray(zero_point).dtype)
    q = board.add_variable(f"{name}_quantized", np.asarray(zero_point).dtype, None)
    dq = board.add_variable(f"{name}_dequantized", np.float32, None)
    board.add_node("QuantizeLinear", [source, s, z], [q], f"{name}_QuantizeLinear", attrs, domain=domain)
    board.add_node("DequantizeLinear", [q, s, z], [dq], f"{name}_DequantizeLinear", attrs, domain=domain)
    index = board.add_constant(f"{ALTERNATES}_{i}_index", np.array(i, np.int64))
    flag = board.add_variable(f"{ALTERNATES}_{i}", np.bool_, [])
    board.add_node("Gather", [alt_input, index], [flag], f"{ALTERNATES}_{i}_Gather")
    return flag, dq


def _layers_reading(tensors) -> list[str]:
    """The compute nodes that read these tensors, looking through range-preserving ops and clamps
    (a quantizer ahead of a ReLU belongs to the layer after the ReLU)."""
    layers, todo, seen = [], list(tensors), set()
    while todo:
        tensor = todo.pop(0)
        for reader in tensor.outputs:
            if reader.name in seen:
                continue
            seen.add(reader.name)
            if (reader.op in CLAMPS or is_range_preserving(reader)) and reader.outputs:
                todo.append(reader.outputs[0])
            else:
                layers.append(reader.name)
    return list(dict.fromkeys(layers))


def _clamp_view(readers) -> tuple[float, float] | None:
    """The widest [lo, hi] the readers let through when every reader is a Relu or constant Clip."""
    if not readers or any(r.op not in CLAMPS for r in readers):
        return None
    bounds = [clip_bounds_or_none(r) for r in readers]
    if any(b is None for b in bounds):
        return None
    return min(b[0] for b in bounds), max(b[1] for b in bounds)


def switchboard(model: QModel, sites: list[QuantizerSite],
                alternates: dict[int, list[tuple]] | None = None) -> onnx.ModelProto:
    """The QDQ model with a bool input `qgraph_switches` [len(sites)]: quantizer i is applied where
    switches[i] is true, and its readers read the float source where it is false. With
    `alternates` ({site index: [(scale, zero point in its storage type, axis[, (qmin, qmax)]), ...]}),
    a second input `qgraph_alternates` selects, per quantizer, another grid instead of the model's:
    0 its own, k the k-th of its alternates (the graph holds one alternate per activation; a
    weight may have several).

    Weights stored as float constants are not switched in the graph: their readers read the
    constant, and `values` ({site index: (initializer, fake-quantized value, [its value on each
    alternate grid])}) lets the runner swap it per variant. Returns (model, values)."""
    board = model.copy()
    tensors = board.tensors()
    switches = gs.Variable(SWITCHES, np.bool_, [len(sites)])
    board.graph.inputs.append(switches)
    alt_input = None
    if alternates:
        alt_input = gs.Variable(ALTERNATES, np.bool_, [len(sites)])
        board.graph.inputs.append(alt_input)
    weights = {}
    for i, site in enumerate(sites):
        source = tensors.get(site.source)
        if source is None:  # a weight stored quantized: its float original comes from the float model
            source = board.add_constant(f"{site.name}_qgraph_float", site.weight)
        if site.kind == "weight" and isinstance(source, gs.Constant) and site.weight is not None:
            # a switched weight is a constant per variant (swapped by the runner): ORT keeps
            # prepacking it, where a Where on the weight would make every Conv dynamic (4x slower)
            for out_name in site.outputs:
                quantized = tensors[out_name]
                for reader in list(quantized.outputs):
                    reader.inputs = [source if t is quantized else t for t in reader.inputs]
            weights[i] = source.name
            continue
        index = board.add_constant(f"{SWITCHES}_{i}_index", np.array(i, np.int64))
        flag = board.add_variable(f"{SWITCHES}_{i}", np.bool_, [])
        board.add_node("Gather", [switches, index], [flag], f"{SWITCHES}_{i}_Gather")
        alt = None
        if alternates and alternates.get(i):
            if len(alternates[i]) > 1:
                raise ValueError(f"switchboard: activation quantizer '{site.name}' can have one alternate grid, "
                                 f"got {len(alternates[i])}")
            alt = _alternate_pair(board, site, source, alt_input, i, *alternates[i][0][:3])
        for out_name in site.outputs:
            quantized = tensors[out_name]
            if alt is not None:
                chosen = board.add_variable(f"{out_name}_qgraph_chosen", np.float32, quantized.shape)
                board.add_node("Where", [alt[0], alt[1], quantized], [chosen], f"{out_name}_qgraph_alternate")
                quantized = chosen
            switched = gs.Variable(out_name, quantized.dtype or np.float32, quantized.shape)
            original = tensors[out_name]
            original.name = f"{out_name}_qgraph_on"
            for reader in list(original.outputs):
                if reader.op != "Where" or not reader.name.endswith("_qgraph_alternate"):
                    reader.inputs = [switched if t is original else t for t in reader.inputs]
            board.graph.outputs = [switched if t is original else t for t in board.graph.outputs]
            board.add_node("Where", [flag, quantized, source], [switched], f"{out_name}_qgraph_switch")
    proto = board.to_onnx()
    values = {}
    for i, name in weights.items():
        site = sites[i]
        alts = [quant.fake_quantize(site.weight, grid[0], grid[1], *_alt_range(site, grid), axis=grid[2])
                for grid in (alternates or {}).get(i, [])]
        values[i] = (name, site.fake_quantize(site.weight), alts)
    return proto, values


def _alt_range(site: QuantizerSite, alternate) -> tuple[int, int]:
    """[qmin, qmax] of a weight's other grid: its fourth entry, else the site's own."""
    return alternate[3] if len(alternate) > 3 else (site.qmin, site.qmax)


# -- the tasks that run in workers ----------------------------------------------------------------

def materialize(board: onnx.ModelProto, switches: np.ndarray, alternates: np.ndarray | None = None,
                weights: dict | None = None) -> onnx.ModelProto:
    """The switchboard with its switches set: each switch Where becomes an Identity of the input it
    selects, nodes no output needs are dropped (the pairs switched off, the flags), and switched
    weights take their `weights` values. The same numbers as running the switchboard with these
    switches, at the speed of the plain model: the Where nodes, run for every variant, keep ORT from
    fusing Conv with its activation and cost ~5x a float run on ResNet-50."""
    model = onnx.ModelProto()
    model.CopyFrom(board)
    graph = model.graph
    flags = {f"{SWITCHES}_{i}": bool(v) for i, v in enumerate(switches)}
    if alternates is not None:
        flags.update({f"{ALTERNATES}_{i}": bool(v) for i, v in enumerate(alternates)})
    nodes = []
    for node in graph.node:
        if node.op_type == "Where" and node.input[0] in flags:
            chosen = node.input[1] if flags[node.input[0]] else node.input[2]
            node = onnx.helper.make_node("Identity", [chosen], list(node.output), node.name)
        elif node.op_type == "Where" and node.input[0].startswith(f"{ALTERNATES}_"):
            node = onnx.helper.make_node("Identity", [node.input[2]], list(node.output), node.name)
        nodes.append(node)
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(_names_read(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    weights = weights or {}
    inits = [onnx.numpy_helper.from_array(np.asarray(weights[t.name], np.float32), t.name)
             if t.name in weights else t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return model


def _names_read(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, and every name its subgraphs read (they may read the outer graph's)."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for inner in sub.node:
                names |= _names_read(inner)
    return names


def prepare_variant_runner(shared: dict):
    return shared


def evaluate_variant(state, switches: np.ndarray) -> dict:
    """Outputs of the switchboard with `switches` over every batch, against the float outputs:
    per output the sums of TensorStats (exactly mergeable), and top-1 hits when labels exist."""
    shared = state
    stats = {name: TensorStats(name, "float32") for name in shared["outputs"]}
    hits = 0
    alternates = None
    if isinstance(switches, tuple):      # (switches, alternates: 0 own grid, k the k-th alternate)
        switches, alternates = switches
    switches = np.asarray(switches, np.bool_)
    weights = {}
    for i, (name, base, alts) in shared.get("weights", {}).items():
        if switches[i]:
            choice = int(alternates[i]) if alternates is not None else 0
            weights[name] = alts[choice - 1] if 0 < choice <= len(alts) else base
    from qgraph.runner import Runner
    runner = Runner(materialize(shared["model"], switches, alternates, weights), threads=1)
    for feeds, reference, labels in zip(shared["feeds"], shared["reference"], shared["labels"]):
        values = runner.run(feeds, shared["outputs"])
        for name in shared["outputs"]:
            stats[name].update(reference[name], values[name])
        if labels is not None:
            first = values[shared["outputs"][0]]
            hits += int((first.reshape(len(first), -1).argmax(1) == labels).sum())
    return {"outputs": {k: _stat_sums(s) for k, s in stats.items()}, "hits": hits}


def _stat_sums(stats: TensorStats) -> dict:
    return {"cosine": stats.cosine, "snr_db": stats.snr_db}


# -- the analysis ---------------------------------------------------------------------------------

@dataclass
class _RangeUse:
    """Accumulates a quantizer's clipped share and code use over batches."""
    site: QuantizerSite
    count: int = 0
    clipped: int = 0
    codes: np.ndarray | None = None
    hist: StreamingHistogram | None = None
    local: TensorStats | None = None
    channel_peaks: np.ndarray | None = None     # per-tensor activations: max |x| per channel

    def update(self, x: np.ndarray) -> None:
        site = self.site
        x = site.seen(np.asarray(x, np.float32))
        if site.kind == "activation" and site.axis is None and x.ndim >= 2:
            axis = _channel_axis(x)
            peaks = np.abs(np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)).max(axis=1)
            self.channel_peaks = peaks if self.channel_peaks is None or self.channel_peaks.shape != peaks.shape \
                else np.maximum(self.channel_peaks, peaks)
        lo, hi = quant.grid_bounds(site.grid.scale, site.grid.zero_point, site.qmin, site.qmax,
                                   axis=site.axis, ndim=x.ndim)
        half = quant._along(np.asarray(site.grid.scale, np.float32), x.ndim, site.axis) / 2
        self.count += x.size
        # clipped: beyond half a step outside the grid (nearer values only round to its end)
        self.clipped += int(np.count_nonzero((x < lo - half) | (x > hi + half)))
        levels = site.qmax - site.qmin + 1
        if levels > MAX_COUNTED_LEVELS:     # an int32 bias: its levels are not worth counting
            codes = None
        elif site.axis is None:
            codes = np.bincount((site.codes(x) - site.qmin).reshape(-1), minlength=levels)[None, :]
        else:
            per = np.moveaxis(site.codes(x) - site.qmin, site.axis, 0)
            per = per.reshape(per.shape[0], -1)
            codes = np.stack([np.bincount(row, minlength=levels) for row in per])
        if codes is not None:
            self.codes = codes if self.codes is None else self.codes + codes
        if self.hist is None:
            self.hist = StreamingHistogram(HISTOGRAM_BINS)
            self.local = TensorStats(site.name, "float32")
        self.hist.update(x)
        self.local.update(x, site.seen(site.fake_quantize(x)))

    def as_dict(self) -> dict:
        unused = float(np.mean((self.codes == 0).sum(axis=1) / self.codes.shape[1])) if self.codes is not None else None
        lo, hi = quant.grid_bounds(self.site.grid.scale, self.site.grid.zero_point, self.site.qmin, self.site.qmax,
                                   axis=0, ndim=1)       # per channel: every channel's ends
        return {**self.site.describe(), "clipped_share": self.clipped / self.count if self.count else 0.0,
                "unused_levels": unused, "grid": [float(np.min(lo)), float(np.max(hi))],
                "observed": [float(self.hist.min), float(self.hist.max)] if self.hist else None,
                "local_snr_db": self.local.snr_db if self.local else None,
                "local_cosine": self.local.cosine if self.local else None,
                "channel_spread": _spread(self.channel_peaks), "channel_gain": _gain(self.channel_peaks)}


def _gain(peaks: np.ndarray | None) -> float | None:
    """Largest over smallest non-zero per-channel peak: what equalizing the channels would expand
    the smallest by."""
    live = peaks[peaks > 0] if peaks is not None else None
    if live is None or live.size < 2:
        return None
    return float(live.max() / live.min())


def _producer_op(tensor, hardswish: set[str]) -> str:
    """The op writing an activation; "HardSwish" for an exported HardSwish region's output."""
    if not tensor.inputs:
        return ""
    return "HardSwish" if tensor.name in hardswish else tensor.inputs[0].op


def _channel_axis(x: np.ndarray) -> int:
    """Where an activation's channels are: axis 1 of an NCHW map, else the last (tokens × features)."""
    return 1 if x.ndim == 4 else x.ndim - 1


def _spread(peaks: np.ndarray | None) -> float | None:
    """Largest over median per-channel peak: how far a few outlier channels run past the rest."""
    if peaks is None or peaks.size < 2 or float(np.median(peaks)) <= 0:
        return None
    return float(peaks.max() / np.median(peaks))


def groups_of(sites: list[QuantizerSite], granularity: str) -> list[tuple[str, list[int]]]:
    """(name, site indices) per local run: each quantizer alone, or every quantizer a layer reads."""
    if granularity == "quantizer":
        return [(s.name, [i]) for i, s in enumerate(sites)]
    layers: dict[str, list[int]] = {}
    for i, site in enumerate(sites):
        for layer in site.layers:
            layers.setdefault(layer, []).append(i)
    return list(layers.items())


#: Bytes of intermediate tensors one analysis batch may hold (both models' shared tensors together).
BATCH_BYTES = 1 << 30


def fitting_batch(plan, runners, batch_size: int, budget: int | None = None) -> int:
    """`batch_size`, lowered so that one batch's tensors — every shared tensor of both models,
    which the comparison holds at once — fit in `budget` bytes, as measured on the first sample.
    (DNSMOS reads 9 s of raw audio: its 81 tensors for a batch of 16 took 20 GB.)"""
    feeds, count = next(plan.batches(1, plan.run_size(1)), (None, 0))
    if feeds is None or count == 0:
        return batch_size
    per_sample = sum(value.nbytes for runner in runners for value in runner.run(feeds).values()) / count
    budget = BATCH_BYTES if budget is None else budget
    return max(1, min(batch_size, int(budget // max(per_sample, 1.0))))


def _batches(plan, batch_size: int, limit: int | None):
    labels = plan.data.get(LABELS)
    start = 0
    for feeds, count in plan.batches(batch_size, limit):
        yield feeds, (labels[start:start + count] if labels is not None else None), count
        start += count


def analyze_models(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, data: dict, *,
                   batch_size: int = 16, limit: int | None = None, threshold_db: float = 20.0,
                   granularity: str = "quantizer", evaluator: Evaluator | None = None, local: bool = True,
                   echo=None) -> dict:
    """The analysis report (a JSON-ready dict); see the module docstring."""
    evaluator = evaluator or Evaluator()
    say = echo or (lambda _line: None)
    plan = check_data(data, quant_model, origin="--data")
    check_data(data, float_model, origin="--data (float model)")
    model, sites, skipped = find_quantizers(quant_model, float_model)
    outputs = [o.name for o in quant_model.graph.output]
    float_outputs = {o.name for o in float_model.graph.output}
    missing = [o for o in outputs if o not in float_outputs]
    if missing:
        raise ModelError(f"output '{missing[0]}' of the quantized model is not an output of the float model; "
                         "analyze compares a QDQ model with the float model it was made from")
    from qgraph.runner import Runner
    shared_names = _shared_tensors(float_model, model)
    by_source = {s.source: s for s in sites if s.kind == "activation"}
    quant_view = {name: (by_source[name].outputs[0] if name in by_source else name) for name in shared_names}
    float_runner = Runner(float_model, shared_names, threads=1)
    quant_runner = Runner(quant_model, list(quant_view.values()), threads=1)
    batch_size = fitting_batch(plan, (float_runner, quant_runner), batch_size)
    cumulative = {name: TensorStats(name, "float32") for name in shared_names}
    ranges = {s.name: _RangeUse(s) for s in sites}
    for s in sites:
        if s.kind == "weight" and s.weight is not None:
            ranges[s.name].update(s.weight)
    feeds_list, reference, labels_list, samples = [], [], [], 0
    hits = {"float": 0, "quantized": 0}
    for feeds, labels, count in _batches(plan, batch_size, limit):
        fvals = {name: rescale_between(float_model, quant_model, name, value)   # smooth/equalize's factors
                 for name, value in float_runner.run(feeds).items()}
        qvals = quant_runner.run(feeds)
        for name in shared_names:
            if fvals[name].shape == qvals[quant_view[name]].shape:
                seen = by_source[name].seen if name in by_source else (lambda x: x)
                cumulative[name].update(seen(fvals[name].astype(np.float32)),
                                        seen(qvals[quant_view[name]].astype(np.float32)))
        for site in sites:
            if site.kind == "activation" and site.source in fvals:
                ranges[site.name].update(fvals[site.source])
        feeds_list.append(feeds)
        reference.append({o: fvals[o] for o in outputs})
        labels_list.append(labels)
        samples += count
        if labels is not None:
            for key, vals in (("float", fvals), ("quantized", qvals)):
                first = vals[outputs[0]]
                hits[key] += int((first.reshape(len(first), -1).argmax(1) == labels).sum())
    if samples == 0:
        raise DataError(f"--data: no sample was run (the model's fixed batch is {plan.run_size(batch_size)}, "
                        f"the data holds {plan.samples}); give at least one full batch")
    say(f"compared {len(shared_names)} shared tensors over {samples} samples; {len(sites)} quantizers")
    has_labels = any(lab is not None for lab in labels_list)

    tensors = []
    for depth, name in enumerate(shared_names):
        stats = cumulative[name]
        if stats.count == 0:
            continue
        site = by_source.get(name)
        local_stats = ranges[site.name].local if site is not None else None
        tensors.append({"tensor": name, "depth": depth, "cumulative_snr_db": stats.snr_db,
                        "cumulative_cosine": stats.cosine, "quantizer": site.name if site else None,
                        "local_snr_db": local_stats.snr_db if local_stats else None,
                        "local_cosine": local_stats.cosine if local_stats else None})
    first_bad = next((t for t in tensors if t["cumulative_snr_db"] < threshold_db), None)

    sensitivity = []
    if local:
        groups = groups_of(sites, granularity)
        board, weights = switchboard(model, sites)
        shared = {"model": board, "weights": weights, "feeds": feeds_list, "reference": reference,
                  "labels": labels_list, "outputs": outputs}
        variants = []
        for _, members in groups:
            flags = np.zeros(len(sites), np.bool_)
            flags[members] = True
            variants.append(flags)
        say(f"local sensitivity: {len(groups)} {granularity} runs ({evaluator.describe()})")
        results = evaluator.map(prepare_variant_runner, evaluate_variant, shared, variants)
        for (name, members), result in zip(groups, results):
            row = {"group": name, "quantizers": [sites[i].name for i in members],
                   "ops": sorted({sites[i].producer for i in members if sites[i].producer}),
                   "kinds": sorted({sites[i].kind for i in members}), **_worst(result["outputs"])}
            if has_labels:
                row["top1"] = result["hits"] / samples
            sensitivity.append(row)
        sensitivity.sort(key=lambda r: (r["output_snr_db"], r["output_cosine"], r["group"]))
    final = {o: {"cosine": cumulative[o].cosine, "snr_db": cumulative[o].snr_db} for o in outputs}
    report = {"samples": samples, "threshold_db": threshold_db, "granularity": granularity,
              "evaluated_by": evaluator.describe() if local else None,
              "outputs": final, "tensors": tensors, "first_below_threshold": first_bad,
              "quantizers": sorted((ranges[s.name].as_dict() for s in sites),
                                   key=lambda q: (q["local_snr_db"] if q["local_snr_db"] is not None else math.inf)),
              "sensitivity": sensitivity, "skipped": skipped}
    if has_labels:
        report["accuracy"] = {k: v / samples for k, v in hits.items()}
    report["_histograms"] = {s.name: ranges[s.name] for s in sites}   # for the plots; not serialised
    return report


def _worst(outputs: dict) -> dict:
    snr = min(v["snr_db"] for v in outputs.values())
    cosine = min(v["cosine"] for v in outputs.values())
    return {"output_snr_db": snr, "output_cosine": cosine}


def _shared_tensors(float_model: onnx.ModelProto, model: QModel) -> list[str]:
    """Float tensors computed by nodes of both models, in the quantized model's node order."""
    in_float = set()
    for node in float_model.graph.node:
        in_float.update(o for o in node.output if o)
    initializers = {t.name for t in float_model.graph.initializer}
    names = []
    for node in model.graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for out in node.outputs:
            dtype = out.dtype
            if (out.name in in_float and out.name not in initializers
                    and (dtype is None or np.dtype(dtype).kind == "f")):
                names.append(out.name)
    outputs = {o.name for o in float_model.graph.output}
    names += [o.name for o in model.graph.outputs if o.name in outputs]
    return list(dict.fromkeys(names))


# -- the report as text, Markdown and plots -------------------------------------------------------

def _db(value) -> str:
    if value is None:
        return "-"
    return "inf" if value == math.inf else ("-inf" if value == -math.inf else f"{value:.1f}")


def _pct(value) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


def summary_lines(report: dict, top: int = 10) -> list[str]:
    """The text tables `qgraph analyze` prints (also the body of report.md)."""
    lines = [f"{report['samples']} samples; {len(report['quantizers'])} quantizers; "
             f"{len(report['tensors'])} shared tensors"]
    for name, stats in report["outputs"].items():
        lines.append(f"  output {name}: cosine {stats['cosine']:.6f}  SNR {_db(stats['snr_db'])} dB (whole model quantized)")
    if "accuracy" in report:
        acc = report["accuracy"]
        lines.append(f"  top-1: float {acc['float']:.2%}, quantized {acc['quantized']:.2%}")
    bad = report["first_below_threshold"]
    lines.append(f"  first tensor under {report['threshold_db']:g} dB: " +
                 (f"{bad['tensor']} ({_db(bad['cumulative_snr_db'])} dB, depth {bad['depth']})" if bad else "none"))
    if report["sensitivity"]:
        lines += ["", f"costliest {report['granularity']}s (only this one quantized, everything else float):",
                  f"  {'rank':>4}  {'out SNR dB':>10}  {'out cosine':>10}  {'top-1':>7}  {report['granularity']}"]
        for rank, row in enumerate(report["sensitivity"][:top], start=1):
            top1 = _pct(row.get("top1")) if "top1" in row else "-"
            what = f" ({', '.join(row['ops'])})" if row["ops"] and report["granularity"] == "quantizer" else ""
            lines.append(f"  {rank:>4}  {_db(row['output_snr_db']):>10}  {row['output_cosine']:>10.6f}  {top1:>7}  "
                         f"{row['group']}{what}")
    hints = repair_hints(report)
    if hints:
        lines += ["", "what to try for the costliest (docs/accuracy.md):"] + [f"  {h}" for h in hints]
    lines += ["", "range use (worst local SNR first):",
              f"  {'local SNR dB':>12}  {'clipped':>8}  {'unused levels':>13}  {'bits':>4}  kind        quantizer"]
    for q in report["quantizers"][:top]:
        lines.append(f"  {_db(q['local_snr_db']):>12}  {_pct(q['clipped_share']):>8}  {_pct(q['unused_levels']):>13}  "
                     f"{q['bits']:>4}  {q['kind']:<10}  {q['name']}" + (f" ({q['producer']})" if q["producer"] else ""))
    return lines


#: A grid with at least this share of its codes never used spends its levels on a few outliers.
UNUSED_LEVELS_HINT = 0.5
#: Outlier channels: the largest channel's peak at least this many times the median channel's.
CHANNEL_SPREAD_HINT = 4.0
#: Values clipped beyond this share: the range is too narrow for the tensor.
CLIPPED_HINT = 1e-3


def repair_hints(report: dict, top: int = 5) -> list[str]:
    """For each quantizer of the `top` costliest sensitivity rows, the qgraph pass that addresses
    what its range use shows: a weight → compensated rounding (gptq/adaround); a LayerNorm output
    whose largest channel peaks ≥ 4x the median one → smooth (its outlier channels into the next
    weights), a HardSwish output with them → equalize_activations; clipping → a wider range (the
    calibrate percentile search); most levels unused elsewhere → equalize; otherwise a 16-bit
    grid. mixed_precision does the last for all of them by measurement."""
    by_name = {q["name"]: q for q in report["quantizers"]}
    hints, seen = [], set()
    for row in report["sensitivity"][:top]:
        for name in row.get("quantizers", [row["group"]]):
            q = by_name.get(name)
            if q is None or name in seen:
                continue
            seen.add(name)
            hints.append(f"{name}: {_hint(q)}")
    if hints:
        hints.append("all of them by measurement, least cost first: mixed_precision: {target: cosine, value: 0.999}")
    return hints


def _hint(q: dict) -> str:
    unused, clipped = q.get("unused_levels") or 0.0, q.get("clipped_share") or 0.0
    if q["kind"] == "weight":
        return "weight rounding: `gptq` (or `adaround`) after calibrate, or 16 bits for it (mixed_precision)"
    spread = q.get("channel_spread") or 0.0
    if spread >= CHANNEL_SPREAD_HINT and q.get("producer") == "LayerNormalization":
        return (f"its largest channel peaks {spread:.0f}x the median one (LayerNorm outlier channels): "
                "`smooth` before insert_qdq moves them into the MatMul weights")
    gain = q.get("channel_gain") or 0.0
    if spread >= CHANNEL_SPREAD_HINT and q.get("producer") == "HardSwish" and gain >= quant.EQUALIZE_MIN_GAIN:
        return (f"its largest channel peaks {spread:.0f}x the median one, {gain:.0f}x the smallest: "
                "`equalize_activations` after fuse_conv_bn equalizes the channels into the depthwise conv "
                "that reads it")
    if clipped >= CLIPPED_HINT:
        return (f"{_pct(clipped)} of its values clipped: a wider range (calibrate "
                "`percentiles: [99.99, 99.999, 99.9999]`, or observer minmax for it)")
    if unused >= UNUSED_LEVELS_HINT:
        return (f"{_pct(unused)} of its levels unused (outliers): `equalize` where convs feed it, "
                "or a 16-bit activation (mixed_precision)")
    return "rounding noise on a well-used grid: a 16-bit activation for it (mixed_precision)"


def markdown(report: dict, plots: list[str], top: int = 20) -> str:
    """report.md: the tables, the per-tensor curve and the plots."""
    out = ["# qgraph analyze", "", "```text", *summary_lines(report, top), "```", ""]
    if plots:
        out += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    else:
        out += ["(no plots: install the report extra, `pip install 'qgraph[report]'`)", ""]
    out += ["## SNR along depth", "", "| depth | tensor | cumulative SNR dB | cosine | quantizer | local SNR dB |",
            "|---:|---|---:|---:|---|---:|"]
    for t in report["tensors"]:
        out.append(f"| {t['depth']} | `{t['tensor']}` | {_db(t['cumulative_snr_db'])} | {t['cumulative_cosine']:.6f} | "
                   f"{'`' + t['quantizer'] + '`' if t['quantizer'] else ''} | {_db(t['local_snr_db'])} |")
    if report["skipped"]:
        out += ["", "## Passed over", ""] + [f"- `{s['node']}`: {s['reason']}" for s in report["skipped"]]
    return "\n".join(out) + "\n"


def plots(report: dict, worst: int = 4) -> dict[str, bytes]:
    """PNG plots (matplotlib, the `report` extra): SNR along depth, cumulative and local, and the
    histograms of the worst quantizers' tensors with their grids. Empty without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    import io
    result = {}

    def png(fig) -> bytes:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buffer.getvalue()

    def finite(v):
        return None if v is None else max(min(v, 100.0), -20.0)

    tensors = report["tensors"]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot([t["depth"] for t in tensors], [finite(t["cumulative_snr_db"]) for t in tensors], "-",
            color="tab:blue", label="cumulative (whole model quantized)")
    local = [t for t in tensors if t["local_snr_db"] is not None]
    ax.plot([t["depth"] for t in local], [finite(t["local_snr_db"]) for t in local], "o", ms=3,
            color="tab:orange", label="local (this quantizer alone)")
    ax.axhline(report["threshold_db"], color="tab:red", lw=0.8, ls="--", label=f"{report['threshold_db']:g} dB")
    ax.set_xlabel("tensor depth (node order)")
    ax.set_ylabel("SNR dB vs float")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("SNR along depth")
    result["snr_depth.png"] = png(fig)

    histograms = report.get("_histograms", {})
    ranked = [name for row in report["sensitivity"] for name in row["quantizers"]] or \
        [q["name"] for q in report["quantizers"]]
    chosen = [n for n in dict.fromkeys(ranked) if n in histograms and histograms[n].hist is not None][:worst]
    for index, name in enumerate(chosen):
        fig = _histogram_figure(plt, histograms[name])
        if fig is not None:
            result[f"hist_{index + 1}.png"] = png(fig)
    return result


def _histogram_figure(plt, use: _RangeUse):
    """Values and grid ends of one quantizer. Per-channel weights are shown in units of their own
    channel's step (x/s_c), where every channel's grid is the same [qmin − z, qmax − z]."""
    site = use.site
    fig, ax = plt.subplots(figsize=(6, 3))
    if site.kind == "weight" and site.weight is not None:
        w = np.asarray(site.weight, np.float64)
        if site.axis is not None:
            steps = quant._along(np.asarray(site.grid.scale, np.float64), w.ndim, site.axis)
            zero = quant._along(np.asarray(site.grid.zero_point, np.float64), w.ndim, site.axis)
            values, bounds, unit = w / steps, (site.qmin - float(zero.min()), site.qmax - float(zero.max())), \
                "value / channel step"
        else:
            lo, hi = quant.grid_bounds(site.grid.scale, site.grid.zero_point, site.qmin, site.qmax)
            values, bounds, unit = w, (float(lo), float(hi)), "value"
        ax.hist(values.ravel(), bins=min(200, max(20, values.size // 20)), color="tab:gray")
    else:
        h = use.hist
        if h is None or h.width == 0.0:
            plt.close(fig)
            return None
        ax.stairs(np.maximum(h.counts, 0.5), h.edges(), fill=True, color="tab:gray")
        ax.set_yscale("log")
        lo, hi = quant.grid_bounds(site.grid.scale, site.grid.zero_point, site.qmin, site.qmax)
        bounds, unit = (float(lo), float(hi)), "value (as its readers see it)"
    for bound in bounds:
        ax.axvline(bound, color="tab:red", lw=1)
    ax.set_xlabel(unit)
    ax.set_title(f"{site.name} ({site.kind}, {site.bits} bits): values and grid ends", fontsize=9)
    return fig


def public(report: dict) -> dict:
    """The report without its in-memory parts (what report.json holds)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}
