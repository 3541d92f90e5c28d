"""calibrate: measure activation ranges on data and set every quantizer's scale/zero point.

    [rmin, rmax] = observer(x over all batches);   (s, z) = quant.scale_zero_point(rmin, rmax, grid)

The model runs in ONNX Runtime with every quantizer *bypassed* (readers of each
DequantizeLinear read the float tensor again) and every activation quantizer's input exposed
as an output, so the observers see the float activations — what TensorRT and HAT's
calibration stage observe; `bypass: false` observes the model as it is (e.g. to re-calibrate
after QAT). Batches stream through streaming observers (qgraph.observers): memory does not
grow with the amount of data. Weight scales are recomputed once from the weights (the
folded weight of a forward-fused BN is evaluated in ORT). Ranges from `fixed_range` are kept.
Afterwards `qgraph.calibrated` is true; `fix_activations: true` also writes
`qgraph.fix_activations` (HAT's calibrated QConfig: QAT keeps activation scales frozen).

`percentiles: [99.99, 99.999, 99.9999]` searches the percentile of every percentile-observed
activation, as one choice for the model: each candidate's ranges come from the same histograms,
and the one whose quantized model's outputs are closest to float on the first `search_samples`
calibration samples (pooled SNR) is kept — no single percentile suits every model (YOLOv8n keeps
its boxes at 99.999, PP-OCRv4's recognizer needs 99.99). Weights are set before the search.

`workers` (local processes, 0: one per core) or `ray` shard the batches (qgraph.parallel): a
first pass collects each batch's (min, max) per tensor — all `minmax` needs — and histogram
observers bin their shard on the grids the sequential run would have used
(observers.HistogramReplay), so the merged statistics, and the scales, are exactly those of one
process. `moving_average` depends on the order of every batch and runs in one process.

Invariant: changes outputs (sets quantization parameters).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import numpy as np

from qgraph.annotations import CALIBRATED, FIX_ACTIVATIONS, QuantizerRecord, require_quantizers, set_annotation
from qgraph.data import FeedPlan
from qgraph.errors import ConfigError, PassError
from qgraph.graph import QModel
from qgraph.observers import HistogramReplay, MinMaxObserver, MovingAverageObserver, PercentileObserver, make_observer
from qgraph.parallel import Evaluator, default_workers
from qgraph.pipeline import PassContext, register_pass
from qgraph.qparams import activation_qparams, bypassed, constant_input_values, weight_qparams, write_qparams
from qgraph.progress import ProgressBar
from qgraph.qconfig import OBSERVERS, ActivationSpec, make_activation_spec
from qgraph.schema import Range

_OBSERVER_PARAMS = ("averaging_constant", "percentile", "bins")


@register_pass("calibrate", preserves_outputs=False)
def calibrate(model: QModel, ctx: PassContext, *, observer: str = "", observer_params: dict = {},  # noqa: B006
              max_samples: Annotated[int, Range(0)] = 0, weights: bool = True, bypass: bool = True,
              fix_activations: bool = False, progress: bool = True, workers: Annotated[int, Range(0)] = 1,
              ray: str = "", percentiles: list = [], search_samples: Annotated[int, Range(1)] = 32) -> dict:  # noqa: B006
    """Set activation scales from calibration data (minmax, moving_average, percentile, entropy, mse)."""
    _check_percentiles(percentiles)
    if observer and observer not in OBSERVERS:
        raise ConfigError(f"calibrate: observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
    unknown = [k for k in observer_params if k not in _OBSERVER_PARAMS]
    if unknown:
        raise ConfigError(f"calibrate: observer_params has no field '{unknown[0]}'; valid: {', '.join(_OBSERVER_PARAMS)}")
    make_activation_spec(ActivationSpec(), observer_params, "calibrate observer_params")  # types and ranges
    records = require_quantizers(model, "calibrate", first="insert_qdq")
    ctx.require_data("calibrate")
    proto = model.to_onnx()
    plan = ctx.feed_plan(proto)
    nodes = {n.name: n for n in model.graph.nodes}
    missing = [r.quantize for r in records.values() if r.quantize not in nodes]
    if missing:
        raise PassError(f"calibrate: quantizer node '{missing[0]}' from the qgraph.quantizers annotation is "
                        "not in the graph; re-run insert_qdq on the float model")

    observed = {name: r for name, r in records.items() if r.kind == "activation" and r.fixed_range is None}
    observers = {name: _observer(observer or r.observer, r, observer_params) for name, r in observed.items()}

    views = {name: observed_view(r) for name, r in observed.items()}
    sequential = any(isinstance(o, MovingAverageObserver) for o in observers.values())
    if (workers != 1 or ray) and not sequential:
        batches, samples, seconds = _observe_sharded(model, proto, plan, ctx.batch_size, observers, observed,
                                                     bypass, max_samples or None, Evaluator(workers, ray or None))
    else:
        batches, samples, seconds = _observe(model, proto, plan, ctx.batch_size, observers, views, bypass,
                                             max_samples or None, progress)
    if samples == 0:
        raise PassError(f"calibrate: no sample was run (the data holds {plan.samples}, the model's fixed batch is "
                        f"{plan.run_size(ctx.batch_size)}); give at least one full batch of calibration data")

    warnings = []
    if (workers != 1 or ray) and sequential:
        warnings.append("moving_average depends on the order of every batch: calibrated in one process")
    n_weights = calibrate_weights(model, nodes, records) if weights else 0
    searched = _search_percentiles(model, nodes, ctx, plan, records, observers, percentiles, search_samples)
    ranges = _write_ranges(nodes, records, observers, warnings)
    set_annotation(model, CALIBRATED, True)
    if fix_activations:
        set_annotation(model, FIX_ACTIVATIONS, True)
    kinds = sorted({observer or r.observer for r in observed.values()})
    summary = (f"{len(observed)} activation ranges from {samples} samples in {batches} batches "
               f"({', '.join(kinds) or 'none'}), {n_weights} weights; calibrated")
    if searched:
        summary += (f"; percentile {searched['chosen']:g} chosen of "
                    + ", ".join(f"{p:g} ({snr:.1f} dB)" for p, snr in searched["output_snr_db"].items()))
    return {"changed": len(observed) + n_weights, "summary": summary, "samples": samples, "batches": batches,
            "observe_seconds": round(seconds, 3), "ranges": ranges, "calibrated": True,
            "fix_activations": bool(fix_activations), "skipped": [], "warnings": warnings,
            **({"percentile_search": searched} if searched else {})}


def _check_percentiles(percentiles: list) -> None:
    wrong = [p for p in percentiles if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50 < p <= 100]
    if wrong:
        raise ConfigError(f"calibrate: percentiles must be numbers in (50, 100], got {wrong[0]!r}")


def _write_ranges(nodes: dict, records: dict[str, QuantizerRecord], observers: dict, warnings: list) -> dict:
    """Every activation quantizer's scale and zero point from its observer (or its fixed range)."""
    ranges = {}
    for name, r in records.items():
        if r.kind != "activation":
            continue
        lo, hi = r.fixed_range if r.fixed_range is not None else observers[name].range()
        if lo == hi == 0.0 or (r.nonnegative and hi <= 0.0):
            warnings.append(f"tensor '{name}' is constant on the calibration data (zero range); "
                            "its scale is set to 1")
        scale, zp = activation_qparams(lo, hi, r)
        write_qparams(nodes, r, scale, zp)
        ranges[name] = [round(float(lo), 6), round(float(hi), 6)]
    return ranges


def _search_percentiles(model: QModel, nodes: dict, ctx: PassContext, plan: FeedPlan,
                        records: dict[str, QuantizerRecord], observers: dict, percentiles: list, samples: int) -> dict:
    """Try each candidate percentile on every percentile-observed activation (the histograms are
    already collected: a candidate costs one run of the quantized model) and leave the observers
    at the one whose model is closest to float on the first `samples` calibration samples
    (pooled output SNR, diff.OutputFidelity). The best single percentile differs by model:
    99.999 or more keeps YOLOv8n's rare large activations, 99.99 saves PP-OCRv4's recognizer
    from its outliers (cosine 0.947 → 0.977 on held-out text lines)."""
    from qgraph.diff import OutputFidelity
    searched = [o for o in observers.values() if isinstance(o, PercentileObserver)]
    if not percentiles or not searched:
        return {}
    fidelity = OutputFidelity(bypassed(model).to_onnx(),
                              lambda: (feeds for feeds, _ in plan.batches(ctx.batch_size, samples)))
    scores = {}
    for p in sorted(set(float(p) for p in percentiles)):
        for o in searched:
            o.p = p
        _write_ranges(nodes, records, observers, [])
        scores[p] = fidelity.snr_db(model.to_onnx())
    best = max(scores, key=lambda p: (scores[p], p))
    for o in searched:
        o.p = best
    return {"chosen": best, "output_snr_db": {p: round(v, 3) for p, v in scores.items()}, "samples": samples}


def _observer(kind: str, record: QuantizerRecord, overrides: dict):
    """The observer of one activation quantizer: its grid, its options, `observer_params` over them."""
    options = {"averaging_constant": record.averaging_constant, "percentile": record.percentile, "bins": record.bins}
    options = {k: v for k, v in {**options, **overrides}.items() if v is not None}
    return make_observer(kind, bits=record.bits, signed=record.signed, symmetric=record.symmetric,
                         narrow_range=record.narrow_range, pow2=record.pow2, nonnegative=record.nonnegative,
                         **options)


def observed_view(record: QuantizerRecord):
    """What the quantizer really represents: a non-negative tensor's pair saturates below 0
    (zp 0) and the Clip(0, m) readers cut above m, so its observer sees clip(x, 0, m); a
    HardSwish's input, clip(x, -3, inf) — otherwise histogram observers would spend levels on
    values no reader tells apart."""
    bounds = record.reader_bounds
    return None if bounds is None else (lambda x: np.clip(x, *bounds))


def _observe_sharded(model: QModel, proto, plan: FeedPlan, batch_size: int, observers: dict, records: dict,
                     bypass: bool, limit: int | None, evaluator: Evaluator) -> tuple[int, int, float]:
    """`_observe` over shards of the batches on `evaluator`'s workers; exactly the same statistics."""
    start = time.perf_counter()
    batches = list(plan.batches(batch_size, limit))
    if not batches:
        return 0, 0, 0.0
    run_proto = bypassed(model).to_onnx() if bypass else proto
    names = list(observers)
    shared = {"model": run_proto.SerializeToString(), "feeds": [b for b, _ in batches], "names": names,
              "inputs": plan.names, "views": {n: records[n].reader_bounds for n in names}}
    parts = min(evaluator.size, len(batches))
    shards = [list(chunk) for chunk in np.array_split(np.arange(len(batches)), parts) if len(chunk)]
    found = evaluator.map(_prepare_shard, _shard_ranges, shared, shards)
    ranges = {n: [r for part in found for r in part[n]] for n in names}      # in batch order
    replays = {}
    for name, obs in observers.items():
        if isinstance(obs, MinMaxObserver):
            obs.lo, obs.hi = min(lo for lo, _ in ranges[name]), max(hi for _, hi in ranges[name])
        else:
            replays[name] = HistogramReplay(ranges[name], obs.hist.bins)
    if replays:
        counts = evaluator.map(_prepare_shard, _shard_histograms, shared, [(shard, replays) for shard in shards])
        for name, replay in replays.items():
            merged = counts[0][name]
            for part in counts[1:]:
                merged.merge(part[name])
            observers[name].hist = merged
    return len(batches), sum(count for _, count in batches), time.perf_counter() - start


def _prepare_shard(shared: dict):
    from qgraph.runner import Runner
    outputs = [n for n in shared["names"] if n not in shared["inputs"]]
    return (Runner(_proto(shared["model"]), outputs, threads=1) if outputs else None), outputs, shared


def _proto(data: bytes):
    import onnx
    return onnx.load_from_string(data)


def _shard_values(state, index: int) -> dict:
    runner, outputs, shared = state
    feeds = shared["feeds"][index]
    values = runner.run(feeds, outputs) if runner else {}
    result = {}
    for name in shared["names"]:
        x = feeds[name] if name in shared["inputs"] else values[name]
        bounds = shared["views"][name]
        result[name] = x if bounds is None else np.clip(x, *bounds)
    return result


def _shard_ranges(state, shard: list[int]) -> dict:
    ranges = {name: [] for name in state[2]["names"]}
    for index in shard:
        for name, x in _shard_values(state, int(index)).items():
            ranges[name].append((float(x.min()), float(x.max())))
    return ranges


def _shard_histograms(state, item) -> dict:
    shard, replays = item
    values = {name: {} for name in replays}
    for index in shard:
        batch = _shard_values(state, int(index))
        for name in replays:
            values[name][int(index)] = batch[name]
    return {name: replay.shard(values[name]) for name, replay in replays.items()}


def _observe(model: QModel, proto, plan: FeedPlan, batch_size: int, observers: dict, views: dict,
             bypass: bool, limit: int | None, show: bool) -> tuple[int, int, float]:
    """Stream the data through ORT and feed every observer its tensor, batch by batch."""
    from qgraph.runner import Runner
    inputs = plan.names
    from_feeds = [n for n in observers if n in inputs]
    # the graph outputs too: ORT computes only what is asked for, and a model that cannot
    # compute its outputs should fail here, not after deployment
    outputs = list(dict.fromkeys([n for n in observers if n not in inputs] + [o.name for o in proto.graph.output]))
    run_proto = bypassed(model).to_onnx() if bypass else proto
    runner = Runner(run_proto, outputs)
    total = min(plan.samples, limit or plan.samples)
    n_batches = -(-total // plan.run_size(batch_size))
    bar = ProgressBar("calibrate", n_batches, enabled=show)
    start, samples, index = time.perf_counter(), 0, 0
    # the observers are independent and NumPy releases the GIL in their array passes: one thread
    # per core updates them side by side (ResNet-50, 32 pictures: the histograms' 430 M values
    # take 2/3 of the time they take in one thread); each observer still sees its batches in order
    with ThreadPoolExecutor(max_workers=max(1, min(len(observers), default_workers()))) as pool:
        for index, (batch, count) in enumerate(plan.batches(batch_size, limit)):
            values = runner.run(batch, outputs)

            def update(name, batch=batch, values=values):
                value = batch[name] if name in from_feeds else values[name]
                observers[name].update(views[name](value) if views[name] else value)
            list(pool.map(update, observers))
            samples += count
            bar.update(index + 1, f"batches {bar.rate(index + 1):.1f}/s")
    bar.close()
    return (index + 1 if samples else 0), samples, time.perf_counter() - start


def calibrate_weights(model: QModel, nodes: dict, records: dict[str, QuantizerRecord]) -> int:
    """Recompute weight scales once from the current weights (in-graph folded ones via ORT)."""
    weights = {name: r for name, r in records.items() if r.kind == "weight"}
    tensors = {name: nodes[r.quantize].inputs[0] for name, r in weights.items()}
    values = constant_input_values(model, list(tensors.values()))
    for name, r in weights.items():
        write_qparams(nodes, r, *weight_qparams(values[tensors[name].name], r))
    return len(weights)
