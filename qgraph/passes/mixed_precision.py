"""mixed_precision: per-quantizer precision — weights 4/8/16 bits, activations 8/16 bits, or float —
chosen by measured sensitivity to meet an accuracy target at the least cost.

    noise_i(o) = 10^(−SNR_i(o)/10)          (output noise with only quantizer i on, at option o)
    min Σ cost_i(o_i)   subject to   Σ noise_i(o_i) ≤ budget            (noise adds: a first-order model)
    budget: SNR target S → 10^(−S/10);  cosine target c → 1/c² − 1;  top-1 → that of cosine 0.999, tightened

Each quantizer is measured alone at its own grid (`measure: all`: at each of its options; by
default the other grids' noise is the measured one scaled by their squared step ratio,
noise ∝ s², which the verification below checks) — variants of qgraph.analyze's switchboard,
evaluated by local worker processes or Ray. The search
starts from the cheapest option everywhere and upgrades, greedily, the quantizer whose next
option removes the most noise per unit of cost, until the estimate meets the budget; then the
assignment itself is evaluated, and while it misses the target the budget halves and the
upgrades go on. Cost `bytes`: weight bytes (bits·elements/8, float 32 bits) plus activation
bytes per sample. Cost `model_bytes`: the weight bytes alone (the file a device stores), activation
bytes per sample only breaking ties (×1/1000: a 16-bit activation is bought before any weight
byte). Cost `bitops`: Σ over Conv/Gemm/MatMul layers of MACs per sample × weight
bits × input activation bits (float counts 32; a layer's input bits are the widest of its
input quantizers). The result is written into the model and as `assign`, a YAML snippet that
re-applies it in a pipeline without searching (`mixed_precision: {assign: {...}}`).

The menu is `weight_bits` × `activation_bits` (+ float with `allow_float`); a quantizer's present
width is always an option. A weight's several grids (4, 8, 16 bits) are each evaluated on their own
(the switchboard swaps the weight's value per variant). `weight_rounding: gptq` rounds every weight
grid of 8 bits or fewer by GPTQ (qgraph.reconstruction.gptq_codes, on the float layer's input
statistics) in the variants measured and in the model written, so the search buys 16 bits only
where even compensated rounding costs too much; it keeps the float weights until the choice is made,
which a `gptq` or `adaround` pass before it would not (they overwrite them).

16-bit activations and weights are int16/uint16 QuantizeLinear/DequantizeLinear in the com.microsoft domain
(ORT 1.19 runs them at opset 17; ai.onnx needs opset 21: quant.qdq_domain); lowering keeps them as
Q/DQ pairs. A weight's grid at any width is its own min/max range; an activation's 16-bit range is
the 8-bit grid's widened to the min/max the data reach: a percentile range clips outliers to save
8-bit steps, and with 256x finer steps the clipping, not the rounding, would be the error left
(it does not shrink with the step, so the noise ∝ s² estimate would miss it), at most 16x
wider (WIDEN_LIMIT) so an outlier cannot coarsen the step. A float
quantizer's readers read its float tensor again.

Invariant: changes outputs (precision). Run it after insert_qdq and calibrate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal

import numpy as np
import yaml

from qgraph import quant
from qgraph.annotations import QuantizerRecord, require_quantizers, write_quantizers
from qgraph.errors import ConfigError, PassError
from qgraph.graph import QModel
from qgraph.pipeline import PassContext, register_pass
from qgraph.qparams import activation_qparams, constant_input_values, weight_qparams, write_qparams
from qgraph.schema import Range

FLOAT = "float"
WEIGHT_BITS = (4, 8, 16)
ACTIVATION_BITS = (8, 16)
TIE_BREAK = 1e-3        # cost model_bytes: what an activation byte per sample weighs against a weight byte
WIDEN_LIMIT = 16        # a 16-bit activation range is at most 16x its 8-bit one: still a 16x finer step


@register_pass("mixed_precision", preserves_outputs=False)
def mixed_precision(model: QModel, ctx: PassContext, *, target: Literal["cosine", "snr_db", "top1"] = "cosine",
                    value: float = 0.999, cost: Literal["bytes", "model_bytes", "bitops"] = "bytes", allow_float: bool = True,
                    weight_bits: list = list(WEIGHT_BITS), activation_bits: list = list(ACTIVATION_BITS),  # noqa: B006
                    assign: dict = {}, max_samples: Annotated[int, Range(0)] = 256,  # noqa: B006
                    rounds: Annotated[int, Range(1, 20)] = 6, measure: Literal["own", "all"] = "own",
                    weight_rounding: Literal["nearest", "gptq"] = "nearest",
                    workers: Annotated[int, Range(0)] = 1, ray: str = "") -> dict:
    """Assign weights 4/8/16 bits, activations 8/16 bits or float per quantizer to meet a target at least cost."""
    records = require_quantizers(model, "mixed_precision")
    menu = replace(_check_menu(weight_bits, activation_bits), allow_float=allow_float)
    rounding = None
    if weight_rounding == "gptq":
        ctx.require_data("mixed_precision with weight_rounding gptq")
        rounding = _GptqRounding(model, records, ctx, max_samples)
    if assign:
        chosen = _check_assign(assign, records)
        observed = observed_ranges(model, records, ctx, max_samples) if ctx.data is not None else {}
        report = {"searched": False}
    else:
        if ctx.data is None:
            raise PassError("mixed_precision needs calibration data to measure sensitivity: give --data FILE.npz")
        _check_target(target, value)
        observed = observed_ranges(model, records, ctx, max_samples)
        chosen, report = _search(model, records, ctx, target, float(value), cost, menu, max_samples,
                                 rounds, measure, workers, ray, observed, rounding)
    before = {k: (r.bits, r.kind) for k, r in records.items()}
    changed = apply_assignment(model, records, chosen, observed)
    if rounding is not None:
        report["gptq_rounded"] = rounding.write(model, records)
    snippet = yaml.safe_dump([{"mixed_precision": {"assign": {k: v for k, v in sorted(chosen.items())
                                                                if v != before[k][0]}}}],
                             default_flow_style=None, sort_keys=False)
    counts = {}
    for name, option in chosen.items():
        kind = before[name][1]
        key = f"{kind[0]}{option}" if option != FLOAT else f"{kind} float"
        counts[key] = counts.get(key, 0) + 1
    summary = (f"{changed} quantizers changed; " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
               + (f"; measured {report['target']} {report['measured']:.6g} (target {value:g})" if "measured" in report
                  else ""))
    warnings = report.pop("warnings", [])
    return {"changed": changed, "summary": summary, "assign": chosen, "snippet": snippet, **report,
            "skipped": [], "warnings": warnings}


def _check_target(target: str, value: float) -> None:
    if target == "cosine" and not 0.0 < value <= 1.0:
        raise ConfigError(f"mixed_precision: a cosine target must be in (0, 1], got {value}")
    if target == "top1" and not 0.0 < value <= 1.0:
        raise ConfigError(f"mixed_precision: a top1 target is an accuracy in (0, 1], got {value}")


@dataclass(frozen=True)
class Menu:
    """The precisions a search may choose from: weight and activation bit widths, and float."""
    weight_bits: tuple = WEIGHT_BITS
    activation_bits: tuple = ACTIVATION_BITS
    allow_float: bool = True


def options(record: QuantizerRecord, menu: Menu) -> list:
    """A quantizer's options from cheapest to dearest (its present width always among them)."""
    bits = menu.weight_bits if record.kind == "weight" else menu.activation_bits
    return sorted(set(bits) | {record.bits}) + ([FLOAT] if menu.allow_float else [])


def _check_menu(weight_bits: list, activation_bits: list) -> Menu:
    for kind, bits, valid in (("weight_bits", weight_bits, WEIGHT_BITS), ("activation_bits", activation_bits,
                                                                          ACTIVATION_BITS)):
        wrong = [b for b in bits if b not in valid]
        if not bits or wrong:
            raise ConfigError(f"mixed_precision: {kind} must be a non-empty list of {list(valid)}, got {bits!r}")
    return Menu(tuple(sorted(set(weight_bits))), tuple(sorted(set(activation_bits))))


def _check_assign(assign: dict, records: dict[str, QuantizerRecord]) -> dict:
    chosen = {name: r.bits for name, r in records.items()}
    for name, option in assign.items():
        if name not in records:
            raise ConfigError(f"mixed_precision assign: '{name}' is not a quantized tensor of this model "
                              f"(e.g. '{next(iter(records))}')")
        valid = options(records[name], Menu())
        if option not in valid:
            raise ConfigError(f"mixed_precision assign: '{name}' must be one of {valid}, got {option!r}")
        chosen[name] = option
    return chosen


def _cost(record: QuantizerRecord, option, elements: int) -> float:
    bits = 32 if option == FLOAT else option
    return elements * bits / 8.0


def _search(model: QModel, records: dict[str, QuantizerRecord], ctx: PassContext, target: str, value: float,
            cost: str, menu: Menu, max_samples: int, rounds: int, measure: str, workers: int, ray: str,
            observed: dict, rounding: "_GptqRounding | None" = None):
    from qgraph.analyze import (ALTERNATES, SWITCHES, evaluate_variant, find_quantizers, prepare_variant_runner,
                                switchboard)
    from qgraph.parallel import Evaluator
    from qgraph.runner import Runner
    proto = model.to_onnx()
    qmodel, sites, _ = find_quantizers(proto)
    sites = [s for s in sites if s.name in records]
    index = {s.name: i for i, s in enumerate(sites)}
    grids = replace(menu, allow_float=False)
    others = {name: [o for o in options(records[name], grids) if o != records[name].bits] for name in index}
    alternates = {index[name]: [_alternate_grid(model, records[name], other, observed) for other in others[name]]
                  for name in index}
    board, weights = switchboard(qmodel, sites, alternates)
    if rounding is not None:
        weights = {i: rounding.values(sites[i].name, records[sites[i].name],
                                      list(zip(others[sites[i].name], alternates[i])), value)
                   for i, value in weights.items()}
    # the float reference: the switchboard with every quantizer off (graph-output quantizers too)
    plan = ctx.feed_plan(proto)
    off = {SWITCHES: np.zeros(len(sites), np.bool_), ALTERNATES: np.zeros(len(sites), np.bool_)}
    layers = _layers(qmodel, sites)
    runner = Runner(board, [s.source for s in sites if s.kind == "activation" and s.source not in plan.names]
                    + [layer.output for layer in layers], threads=1)
    feeds, reference, labels_list = [], [], []
    outputs = [o.name for o in proto.graph.output]
    elements, samples, labels = {}, 0, plan.data.get("labels")
    for batch, count in plan.batches(ctx.batch_size, max_samples or None):
        values = runner.run({**batch, **off})
        for s in sites:
            if s.kind == "activation" and s.name not in elements:
                tensor = batch[s.source] if s.source in batch else values[s.source]
                elements[s.name] = int(tensor.size // max(count, 1))
        for layer in layers:
            layer.macs = layer.macs or int(values[layer.output].size // max(count, 1)) * layer.depth
        feeds.append(batch)
        reference.append({o: values[o] for o in outputs})
        labels_list.append(labels[samples:samples + count] if labels is not None else None)
        samples += count
    if not samples:
        raise PassError("mixed_precision: no calibration sample was run; give at least one full batch")
    if target == "top1" and labels is None:
        raise PassError("mixed_precision: target top1 needs labelled data (a 'labels' array)")
    for s in sites:
        if s.kind == "weight":
            elements[s.name] = int(np.asarray(s.weight).size)
    shared = {"model": board, "weights": weights, "feeds": feeds, "reference": reference, "labels": labels_list, "outputs": outputs}
    evaluator = Evaluator(workers, ray or None)

    def variant(assignment: dict):
        on = np.array([assignment[s.name] != FLOAT for s in sites], np.bool_)
        alt = np.array([others[s.name].index(assignment[s.name]) + 1 if assignment[s.name] in others[s.name] else 0
                        for s in sites], np.int8)
        return on, alt

    base = {s.name: FLOAT for s in sites}
    singles, keys = [], []
    for s in sites:
        for option in options(records[s.name], grids):
            if measure == "all" or option == records[s.name].bits:
                singles.append(variant({**base, s.name: option}))
                keys.append((s.name, option))
    measured = evaluator.map(prepare_variant_runner, evaluate_variant, shared, singles)
    noise = {name: {FLOAT: 0.0} for name in index}
    for (name, option), result in zip(keys, measured):
        snr = min(v["snr_db"] for v in result["outputs"].values())
        noise[name][option] = 0.0 if snr == np.inf else 10.0 ** (-snr / 10.0)
    for s in sites:                      # measure "own": other grids scale the noise by (step ratio)²
        for option in options(records[s.name], grids):
            if option not in noise[s.name]:
                grid = alternates[index[s.name]][others[s.name].index(option)]
                ratio = np.asarray(grid[0], np.float64) / np.asarray(s.grid.scale, np.float64)
                noise[s.name][option] = noise[s.name][records[s.name].bits] * float(np.mean(ratio ** 2))

    def score(result) -> float:
        if target == "top1":
            return result["hits"] / samples
        if target == "cosine":
            return min(v["cosine"] for v in result["outputs"].values())
        return min(v["snr_db"] for v in result["outputs"].values())

    budget = {"cosine": 1.0 / value ** 2 - 1.0 if target == "cosine" else None,
              "snr_db": 10.0 ** (-value / 10.0), "top1": 1.0 / 0.999 ** 2 - 1.0}[target]
    if budget is None:
        budget = 1.0 / 0.999 ** 2 - 1.0
    chosen = {s.name: options(records[s.name], menu)[0] for s in sites}
    costs = CostModel(cost, records, elements, layers)
    history = []
    result = None
    for _ in range(rounds):
        chosen = _greedy(chosen, records, noise, costs, budget, menu)
        result = evaluator.map(prepare_variant_runner, evaluate_variant, shared, [variant(chosen)])[0]
        history.append({"budget": budget, "measured": score(result), "cost": costs.total(chosen)})
        if score(result) >= value:
            break
        budget /= 2.0
    total_before = costs.total({n: r.bits for n, r in records.items() if n in index})
    weight_bytes = sum(_cost(records[n], o, elements[n]) for n, o in chosen.items() if records[n].kind == "weight")
    low = sum(_cost(records[n], o, elements[n]) for n, o in chosen.items()
              if records[n].kind == "weight" and o != FLOAT and o <= 8)
    report = {"target": target, "measured": score(result), "met": score(result) >= value, "history": history,
              "cost": cost, "cost_before": total_before, "cost_after": costs.total(chosen),
              "weight_bytes": weight_bytes, "weight_bytes_8bit_or_less": low, "variants": len(singles) + len(history),
              "evaluated_by": evaluator.describe(), "warnings": [] if score(result) >= value else
              [f"target {target} {value:g} not met after {rounds} rounds (best {score(result):.6g})"]}
    return chosen, report


class _GptqRounding:
    """`weight_rounding: gptq`: every weight of 8 bits or fewer rounded by GPTQ on its float layer's
    input statistics (qgraph.reconstruction), in the variants the search measures and in the
    model it writes; 16-bit weights keep round-to-nearest."""

    def __init__(self, model: QModel, records: dict[str, QuantizerRecord], ctx: PassContext, max_samples: int):
        from qgraph.reconstruction import find_layers, float_statistics
        layers, _ = find_layers(model, records)
        float_statistics(model, layers, ctx, max_samples, "mixed_precision")
        self.layers = {layer.record.tensor: layer for layer in layers}
        self.swept: dict[tuple, np.ndarray] = {}   # (weight, bits, grid bytes) → codes: the search's sweeps, reused when writing

    def _codes(self, name: str, scale, zp, bits: int):
        from qgraph.reconstruction import gptq_codes
        qmin, qmax = quant.qrange(bits, self.layers[name].record.signed, self.layers[name].record.narrow_range)
        layer = self.layers[name].on_grid(scale, zp, qmin, qmax)
        key = (name, bits, layer.scale.tobytes(), layer.zp.tobytes())
        if key not in self.swept:
            self.swept[key] = gptq_codes(layer)
        return layer, self.swept[key]

    def values(self, name: str, record: QuantizerRecord, grids: list[tuple[int, tuple]], value: tuple) -> tuple:
        """A switchboard weight entry (initializer, own value, [value on each alternate grid]) with
        the grids of 8 bits or fewer rounded by GPTQ; `grids`: (bits, grid) per alternate."""
        if name not in self.layers:
            return value
        initializer, own, alternates = value

        def rounded(scale, zp, bits):
            layer, codes = self._codes(name, scale, zp, bits)
            return layer.weight(codes)
        if record.bits <= 8:
            own = rounded(self.layers[name].scale, self.layers[name].zp, record.bits)
        alternates = [rounded(grid[0], grid[1], bits) if bits <= 8 else alt
                      for (bits, grid), alt in zip(grids, alternates)]
        return initializer, own, alternates

    def write(self, model: QModel, records: dict[str, QuantizerRecord]) -> int:
        """Round the model's weights of 8 bits or fewer, at their final grids, by GPTQ; how many."""
        from qgraph.reconstruction import quantizer_grid
        nodes = {n.name: n for n in model.graph.nodes}
        written = 0
        for name, layer in self.layers.items():
            record = records.get(name)
            if record is None or record.bits > 8:
                continue
            chosen, codes = self._codes(name, *quantizer_grid(nodes[record.quantize]), record.bits)
            chosen.write(codes)
            written += 1
        return written


class _Layer:
    """A Conv/Gemm/MatMul whose weight is quantized: its weight and input quantizers, and its MACs."""

    def __init__(self, name: str, output: str, weight: str, inputs: list[str], depth: int):
        self.name, self.output, self.weight, self.inputs, self.depth = name, output, weight, inputs, depth
        self.macs = 0


def _layers(qmodel: QModel, sites) -> list[_Layer]:
    nodes = {n.name: n for n in qmodel.graph.nodes}
    layers = []
    for site in sites:
        if site.kind != "weight" or len(site.layers) != 1 or site.layers[0] not in nodes:
            continue
        node = nodes[site.layers[0]]
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or site.weight is None:
            continue
        w = np.asarray(site.weight)
        out_axis = site.grid.axis if site.grid.per_channel else (0 if node.op != "MatMul" else w.ndim - 1)
        depth = int(w.size // max(w.shape[out_axis], 1)) if w.ndim else 1
        inputs = [s.name for s in sites if s.kind == "activation" and node.name in s.layers]
        layers.append(_Layer(node.name, node.outputs[0].name, site.name, inputs, depth))
    return layers


class CostModel:
    """The cost of an assignment, and of changing one quantizer (only the terms it touches)."""

    def __init__(self, kind: str, records, elements: dict, layers: list[_Layer]):
        self.kind, self.records, self.elements, self.layers = kind, records, elements, layers
        self.touching: dict[str, list[_Layer]] = {}
        for layer in layers:
            for name in [layer.weight, *layer.inputs]:
                self.touching.setdefault(name, []).append(layer)

    @staticmethod
    def bits(option) -> int:
        return 32 if option == FLOAT else int(option)

    def _layer(self, layer: _Layer, chosen: dict) -> float:
        act = max((self.bits(chosen[n]) for n in layer.inputs if n in chosen), default=32)
        return layer.macs * self.bits(chosen.get(layer.weight, FLOAT)) * act

    def _bytes(self, name: str, option) -> float:
        tie = TIE_BREAK if self.kind == "model_bytes" and self.records[name].kind == "activation" else 1.0
        return tie * _cost(self.records[name], option, self.elements[name])

    def total(self, chosen: dict) -> float:
        if self.kind in ("bytes", "model_bytes"):
            return sum(self._bytes(n, o) for n, o in chosen.items())
        return float(sum(self._layer(layer, chosen) for layer in self.layers))

    def delta(self, chosen: dict, name: str, option) -> float:
        if self.kind in ("bytes", "model_bytes"):
            return self._bytes(name, option) - self._bytes(name, chosen[name])
        changed = {**chosen, name: option}
        return float(sum(self._layer(layer, changed) - self._layer(layer, chosen)
                         for layer in self.touching.get(name, [])))


def _greedy(chosen: dict, records, noise, costs: CostModel, budget: float, menu: Menu) -> dict:
    """Upgrade the best noise-removed-per-byte step until the summed noise meets the budget."""
    chosen = dict(chosen)
    while sum(noise[n][o] for n, o in chosen.items()) > budget:
        best, best_gain = None, 0.0
        for name, option in chosen.items():
            ladder = options(records[name], menu)
            step = ladder.index(option)
            for nxt in ladder[step + 1:]:
                removed = noise[name][option] - noise[name][nxt]
                gain = removed / max(costs.delta(chosen, name, nxt), 1e-9)
                if removed > 0 and gain > best_gain:
                    best, best_gain = (name, nxt), gain
        if best is None:
            break
        chosen[best[0]] = best[1]
    return chosen


def observed_ranges(model: QModel, records: dict[str, QuantizerRecord], ctx: PassContext,
                    max_samples: int) -> dict[str, tuple[float, float]]:
    """The min/max each quantized activation reaches in the float model over the data."""
    from qgraph.observers import MinMaxObserver
    from qgraph.qparams import bypassed
    from qgraph.runner import Runner
    nodes = {n.name: n for n in model.graph.nodes}
    sources = {name: nodes[r.clip or r.quantize].inputs[0].name for name, r in records.items()
               if r.kind == "activation"}
    if not sources:
        return {}
    proto = bypassed(model).to_onnx()
    plan = ctx.feed_plan(proto)
    runner = Runner(proto, [s for s in set(sources.values()) if s not in plan.names], threads=1)
    seen = {source: MinMaxObserver() for source in sources.values()}
    for batch, _ in plan.batches(ctx.batch_size, max_samples or None):
        values = runner.run(batch, [s for s in seen if s not in batch])
        for source, observer in seen.items():
            observer.update(batch[source] if source in batch else values[source])
    return {name: seen[source].range() for name, source in sources.items()}


def _alternate_grid(model: QModel, record: QuantizerRecord, bits: int, observed: dict | None = None):
    """(scale, zero point, axis, (qmin, qmax)) of `record` re-gridded at `bits`. An activation keeps
    its range, widened at more bits than its own to the `observed` min/max (module docstring)."""
    new = _regrid_record(record, bits)
    if record.kind == "weight":
        nodes = {n.name: n for n in model.graph.nodes}
        value = constant_input_values(model, [nodes[record.quantize].inputs[0]])
        scale, zp = weight_qparams(next(iter(value.values())), new)
    else:
        reach = (observed or {}).get(record.tensor) if bits > record.bits else None
        scale, zp = _activation_regrid(model, record, new, reach)
    return (np.asarray(scale, np.float32), np.asarray(zp).astype(quant.storage_dtype(new.signed, bits)), record.axis,
            (new.qmin, new.qmax))


def _regrid_record(record: QuantizerRecord, bits: int) -> QuantizerRecord:
    from dataclasses import replace
    qmin, qmax = quant.qrange(bits, record.signed, record.narrow_range)
    return replace(record, bits=bits, qmin=qmin, qmax=qmax)


def _activation_regrid(model: QModel, record: QuantizerRecord, new: QuantizerRecord, reach=None):
    nodes = {n.name: n for n in model.graph.nodes}
    q = nodes[record.quantize]
    scale, zp = QModel.constant_value(q.inputs[1]), QModel.constant_value(q.inputs[2])
    lo, hi = (float(v) for v in quant.grid_bounds(scale, zp, record.qmin, record.qmax))
    if reach is not None:
        # each side grows by at most (WIDEN_LIMIT - 1)/2 widths: an outlier (a -1e9 attention mask)
        # must not make the wider grid's step coarser than 1/16 of the narrow one's
        extra = (WIDEN_LIMIT - 1) / 2 * (hi - lo)
        lo, hi = min(lo, max(reach[0], lo - extra)), max(hi, min(reach[1], hi + extra))
    return activation_qparams(lo, hi, new)


def apply_assignment(model: QModel, records: dict[str, QuantizerRecord], chosen: dict,
                     observed: dict | None = None) -> int:
    """Write the chosen precision into the graph and the annotation; returns how many changed.
    `observed`: activation ranges a wider grid covers (observed_ranges)."""
    nodes = {n.name: n for n in model.graph.nodes}
    changed = 0
    for name, option in chosen.items():
        record = records[name]
        if option == record.bits:
            continue
        changed += 1
        if option == FLOAT:
            _remove_pair(model, nodes, record)
            del records[name]
            continue
        scale, zp, _, _ = _alternate_grid(model, record, option, observed)
        new = _regrid_record(record, option)
        q, dq = nodes[record.quantize], nodes[record.dequantize]
        q.inputs[2].values = np.asarray(q.inputs[2].values).astype(quant.storage_dtype(new.signed, option))
        write_qparams(nodes, new, scale, zp)
        domain = quant.qdq_domain(quant.storage_dtype(new.signed, option))
        q.domain = dq.domain = domain or None
        q.outputs[0].dtype = quant.storage_dtype(new.signed, option)
        records[name] = new
    write_quantizers(model, records)
    model.cleanup()
    return changed


def _remove_pair(model: QModel, nodes: dict, record: QuantizerRecord) -> None:
    first = nodes[record.clip or record.quantize]
    dq = nodes[record.dequantize]
    source, out = first.inputs[0], dq.outputs[0]
    if model.is_graph_output(out):
        model.graph.outputs = [source if t is out else t for t in model.graph.outputs]
        name = out.name
        out.name = f"{name}_unused"
        source.name = name
    for reader in list(out.outputs):
        reader.inputs = [source if t is out else t for t in reader.inputs]
