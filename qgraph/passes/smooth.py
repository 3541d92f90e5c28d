"""smooth: SmoothQuant (Xiao et al. 2023) — move per-channel activation outliers into the weights.

    Y = X·W = (X·diag(s)⁻¹)·(diag(s)·W)          s_j = max|X_j|^α / max_n |W_jn|^(1−α)

X is the output of a per-channel affine on its last axis — a LayerNormalization with constant
γ, β (or the exported `Mul(x, γ) → Add(β)`) — read only by MatMul/Gemm layers with constant
weights (and by Shape): dividing γ and β by s divides X's channels exactly, and multiplying row
j of every weight that reads X by s_j gives the same Y. In transformers a few channels of the
LayerNorm outputs run 10-30x the others, and one per-tensor activation grid spends its levels on
them; per-channel weight grids absorb the factor where activations cannot.

α trades the two grids; per site it is chosen among `alphas` and "no smoothing" (s = 1) by the
local error of the layers the site feeds, on the calibration data (at most `max_rows` rows of X,
sampled evenly; s from the per-channel max over all of them):

    e(s) = Σ_layers ‖fq(X/s)·fq(s·W) − X·W‖² / ‖X·W‖²

with X/s quantized per tensor (asymmetric, `activation_bits`, its min/max) and s·W per output
channel (symmetric, narrow range, `weight_bits`) — insert_qdq's default grids, min/max instead of
its observers. A site is changed only where smoothing lowers that error, so on models without
outliers the pass leaves everything as it was. Measured (benchmarks/zoo.py, 16 calibration / 32
held-out inputs, `ptq` after it): the ViT-style builder with LayerNorm outliers, output cosine
0.976 → 0.988, top-1 agreement 25 → 29 of 32.

Run it on the float model after canonicalize (which fuses the exported LayerNorm) and
dequantize_dynamic, before insert_qdq; it needs calibration data where it finds a site.

The divided tensors are listed in the `qgraph.rescaled` annotation with their factors, so that
`qgraph analyze` compares them with the float model's divided the same way.

Invariant: outputs unchanged up to float rounding (tolerance 1e-4).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated

import numpy as np

from qgraph import quant
from qgraph.annotations import record_rescaled
from qgraph.errors import ConfigError
from qgraph.graph import QModel
from qgraph.idioms import Declined, skip
from qgraph.pipeline import PassContext, register_pass
from qgraph.schema import Range

#: A channel whose activation or weight range is below this is left unscaled (s = 1).
_TINY = 1e-8


@dataclass
class _Site:
    """One affine producer and the layers that read its output `tensor`."""
    node: object                  # the LayerNormalization, or the Add of Mul → Add
    tensor: object                # its output, X
    gamma: object                 # gs.Constant of γ (shape [K])
    beta: object | None           # gs.Constant of β, or None
    layers: list                  # MatMul/Gemm nodes reading X as their first input
    weights: list                 # each layer's weight as (K, N), float64: the matrix X multiplies
    scaled: list                  # names of the tensors the rescaling divides: X and Gathers of it


@register_pass("smooth", preserves_outputs=True)
def smooth(model: QModel, ctx: PassContext, *, alphas: list = [0.25, 0.5, 0.75],  # noqa: B006
           activation_bits: Annotated[int, Range(2, 16)] = 8, weight_bits: Annotated[int, Range(2, 16)] = 8,
           max_samples: Annotated[int, Range(1)] = 64, max_rows: Annotated[int, Range(16)] = 4096) -> dict:
    """SmoothQuant: divide LayerNorm/affine outputs per channel by s, multiply the next weights' rows by s."""
    _check_alphas(alphas)
    quant.qrange(activation_bits, False)            # ConfigError for widths no grid has
    quant.qrange(weight_bits, True)
    sites, skipped = _find_sites(model)
    if not sites:
        return {"changed": 0, "summary": "no LayerNorm or per-channel affine read only by MatMul/Gemm",
                "skipped": skipped, "warnings": []}
    ctx.require_data("smooth")
    absmax, rows = _activation_statistics(model, ctx, [s.tensor.name for s in sites], max_samples, max_rows)
    chosen, errors, divided = {}, {}, {}
    for site in sites:
        x = rows[site.tensor.name]
        options = {"none": np.ones(x.shape[1])}
        w_max = np.max([np.abs(w).max(axis=1) for w in site.weights], axis=0)
        for alpha in sorted(set(float(a) for a in alphas)):
            options[alpha] = _smoothing_factors(absmax[site.tensor.name], w_max, alpha)
        references = [x @ w for w in site.weights]
        measured = {key: _local_error(x, site.weights, references, s, activation_bits, weight_bits)
                    for key, s in options.items()}
        best = min(measured, key=lambda key: (measured[key], key != "none"))
        name = site.node.name or site.tensor.name
        chosen[name] = best
        errors[name] = {"none": measured["none"], "chosen": measured[best]}
        if best != "none":
            _apply(site, options[best])
            divided.update({tensor: options[best] for tensor in site.scaled})
    record_rescaled(model, divided, -1)
    changed = sum(1 for v in chosen.values() if v != "none")
    counts = Counter(str(v) for v in chosen.values())
    summary = (f"{changed} of {len(sites)} sites smoothed (alpha " +
               ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) + "); their layers' local error "
               f"{sum(e['none'] for e in errors.values()):.3g} -> {sum(e['chosen'] for e in errors.values()):.3g}")
    return {"changed": changed, "summary": summary, "alpha": chosen, "local_error": errors,
            "skipped": skipped, "warnings": []}


def _check_alphas(alphas) -> None:
    if not isinstance(alphas, list) or not alphas:
        raise ConfigError(f"smooth: alphas must be a non-empty list of numbers in (0, 1), got {alphas!r}")
    wrong = [a for a in alphas if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1]
    if wrong:
        raise ConfigError(f"smooth: alphas must be numbers in (0, 1), got {wrong[0]!r}")


# -- sites ----------------------------------------------------------------------------------------

def _find_sites(model: QModel) -> tuple[list[_Site], list[dict]]:
    sites, skipped = [], []
    for node in model.graph.nodes:
        try:
            found = _affine(model, node)
            if found is None:
                continue
            sites.append(_readers(model, node, *found))
        except Declined as exc:
            if node.op == "LayerNormalization":     # an affine Mul → Add before a Conv is no site
                skipped.append(skip(node, exc.reason))
    return sites, skipped


def _affine(model: QModel, node):
    """(γ, β) constants of a per-channel affine on the last axis that `node` ends, else None."""
    if node.op == "LayerNormalization":
        if len(node.inputs) < 2 or QModel.constant_value(node.inputs[1]) is None:
            raise Declined("LayerNormalization scale is not a constant")
        beta = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if beta is not None and QModel.constant_value(beta) is None:
            raise Declined("LayerNormalization bias is not a constant")
        return node.inputs[1], beta
    if node.op != "Add":
        return None
    for mul_out, beta in (node.inputs, node.inputs[::-1]):
        mul = QModel.producer(mul_out)
        if mul is None or mul.op != "Mul" or QModel.constant_value(beta) is None:
            continue
        gammas = [t for t in mul.inputs if QModel.constant_value(t) is not None]
        if len(gammas) == 1 and len(mul_out.outputs) == 1 and not model.is_graph_output(mul_out):
            return gammas[0], beta
    return None


def _readers(model: QModel, node, gamma, beta) -> _Site:
    """The site of `node`'s output, Declined where rescaling it would change anything but its layers."""
    x = node.outputs[0]
    scaled: list[str] = []
    layers = _layers_reading(model, x, scaled)
    if not layers:
        raise Declined("no layer reads its output")
    for layer in layers:
        if layer.op == "Gemm" and (layer.attrs.get("transA", 0) or float(layer.attrs.get("alpha", 1.0)) != 1.0):
            raise Declined(f"Gemm '{layer.name}' has transA or alpha")
        weight = layer.inputs[1]
        value = QModel.constant_value(weight)
        if value is None or value.ndim != 2 or not hasattr(weight, "values"):
            raise Declined(f"'{layer.name}' has no 2-D constant weight")
        if len(weight.outputs) != 1:
            raise Declined(f"weight '{weight.name}' of '{layer.name}' is shared with other nodes")
    weights = [_as_k_by_n(layer) for layer in layers]
    channels = weights[0].shape[0]
    for const in (gamma, beta):
        if const is None:
            continue
        value = QModel.constant_value(const)
        if not hasattr(const, "values") or len(const.outputs) != 1:
            raise Declined(f"'{const.name}' is shared or not an initializer")
        if value.size not in (1, channels) or value.ndim > 1:
            raise Declined(f"'{const.name}' is not one value per channel of the last axis ({channels})")
    if any(w.shape[0] != channels for w in weights):
        raise Declined("its layers disagree on the channel count")
    return _Site(node, x, gamma, beta, layers, weights, scaled)


def _layers_reading(model: QModel, x, scaled: list[str]) -> list:
    """The MatMul/Gemm layers that read `x` as their first input, directly or through Gathers on
    another axis than the last (a ViT's class token: the channels stay the last axis); Shape
    readers see no values. Declined for any other reader."""
    if model.is_graph_output(x):
        raise Declined(f"'{x.name}' is a graph output")
    scaled.append(x.name)
    layers = []
    for reader in x.outputs:
        if reader.op == "Shape":
            continue
        if reader.op in ("MatMul", "Gemm") and reader.inputs[0] is x:
            layers.append(reader)
        elif reader.op == "Gather" and reader.inputs[0] is x and _off_last_axis(reader, x):
            layers.extend(_layers_reading(model, reader.outputs[0], scaled))
        else:
            raise Declined(f"'{reader.name}' ({reader.op}) reads '{x.name}': only MatMul/Gemm with a "
                           "constant weight may (or a Gather on another axis before them)")
    return layers


def _off_last_axis(gather, x) -> bool:
    rank = len(x.shape) if x.shape is not None else None
    axis = int(gather.attrs.get("axis", 0))
    return rank is not None and axis not in (-1, rank - 1)


def _as_k_by_n(layer) -> np.ndarray:
    value = np.asarray(QModel.constant_value(layer.inputs[1]), np.float64)
    return value.T if layer.op == "Gemm" and layer.attrs.get("transB", 0) else value


# -- measurement and choice -------------------------------------------------------------------------

def _activation_statistics(model: QModel, ctx: PassContext, names: list[str], max_samples: int,
                           max_rows: int) -> tuple[dict, dict]:
    """Per-channel max |X| over the calibration data (at most `max_samples`) and about `max_rows`
    rows of each X, evenly spaced within each batch in proportion to its samples."""
    from qgraph.runner import Runner
    proto = model.to_onnx()
    runner = Runner(proto, names)
    plan = ctx.feed_plan(proto)
    total = min(max_samples, plan.samples)
    absmax: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feeds, batch in plan.batches(ctx.batch_size, max_samples):
        values = runner.run(feeds, names)
        for name in names:
            x = values[name].reshape(-1, values[name].shape[-1]).astype(np.float64)
            absmax[name] = np.maximum(absmax.get(name, 0.0), np.abs(x).max(axis=0))
            share = max(1, -(-max_rows * batch // total))          # this batch's part of the rows
            rows[name].append(x[np.linspace(0, len(x) - 1, min(share, len(x))).astype(np.int64)])
    return absmax, {name: np.concatenate(parts) for name, parts in rows.items()}


def _smoothing_factors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1−α); 1 where either range is ~0."""
    live = (x_max > _TINY) & (w_max > _TINY)
    s = np.ones_like(x_max, dtype=np.float64)
    s[live] = x_max[live] ** alpha / w_max[live] ** (1.0 - alpha)
    return s


def _local_error(x: np.ndarray, weights: list[np.ndarray], references: list[np.ndarray], s: np.ndarray,
                 activation_bits: int, weight_bits: int) -> float:
    """Σ over the layers of ‖fq(X/s)·fq(s·W) − X·W‖² / ‖X·W‖² (module docstring), the products
    X·W given as `references`."""
    xs = x / s
    qmin, qmax = quant.qrange(activation_bits, False)
    scale, zero_point = quant.scale_zero_point(xs.min(), xs.max(), activation_bits, signed=False, symmetric=False)
    xq = quant.fake_quantize(xs, scale, zero_point, qmin, qmax).astype(np.float64)
    wmin, wmax = quant.qrange(weight_bits, True, narrow_range=True)
    error = 0.0
    for w, reference in zip(weights, references):
        ws = w * s[:, None]
        w_scale, w_zero = quant.scale_zero_point(ws.min(axis=0), ws.max(axis=0), weight_bits, signed=True,
                                                 symmetric=True, narrow_range=True)
        wq = quant.fake_quantize(ws, w_scale, w_zero, wmin, wmax, axis=1).astype(np.float64)
        error += float(np.sum((xq @ wq - reference) ** 2) / max(np.sum(reference ** 2), _TINY))
    return error


def _apply(site: _Site, s: np.ndarray) -> None:
    """γ/s, β/s on the producer; row j of every layer's (K, N) weight times s_j."""
    for const in (site.gamma, site.beta):
        if const is not None:
            value = np.asarray(QModel.constant_value(const))
            const.values = (np.broadcast_to(value.astype(np.float64), s.shape) / s).astype(value.dtype)
    for layer in site.layers:
        weight = layer.inputs[1]
        value = np.asarray(QModel.constant_value(weight))
        transposed = layer.op == "Gemm" and layer.attrs.get("transB", 0)
        scaled = value.astype(np.float64) * (s[None, :] if transposed else s[:, None])
        weight.values = scaled.astype(value.dtype)
