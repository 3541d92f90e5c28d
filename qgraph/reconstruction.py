"""Layer reconstruction: the statistics that weight-rounding passes (adaround, gptq) choose codes by.

For a Conv/Gemm/MatMul with a quantized constant weight W (C_out × K per group; convolutions as
im2col patches, K = C_in/g·kernel), X̃ its input in the QDQ model and X its input in the float
form (qparams.bypassed), the asymmetric reconstruction error of a candidate weight W̃ is

    ‖X̃ W̃ᵀ − X Wᵀ‖² = tr(W̃ H W̃ᵀ) − 2 tr(W̃ C Wᵀ) + ‖X Wᵀ‖²,    H = X̃ᵀX̃,  C = X̃ᵀX

so a layer needs its inputs only through H and C (K × K per group), accumulated over the
calibration data in one run of each model; no activation is kept. Layers are rounded in waves
(idioms.layer_waves): the X̃ of a wave is measured on the model whose earlier waves are already
rounded, so each layer compensates the error upstream once (measuring every layer on the unrounded
model compensates it twice: MNIST ResNet W4A8 88% → 11% with AdaRound).

A rounding method is a function of one layer returning its chosen integer codes; the driver keeps
them only when they lower the layer's reconstruction error below round-to-nearest's, and writes
the weight as the dequantized codes, so the model's own QuantizeLinear reproduces them exactly.
Zero points never change; scales change only in a clipping search (:func:`clipped_codes`: each
output channel's scale narrowed by the ratio whose codes reconstruct it best), written to the
weight's quantizer pair.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from qgraph import quant
from qgraph.annotations import QuantizerRecord, require_quantizers
from qgraph.errors import PassError
from qgraph.graph import QModel
from qgraph.idioms import Declined, layer_waves, skip
from qgraph.qparams import bypassed, write_qparams

LAYERS = ("Conv", "Gemm", "MatMul")
BLOCK = 128            # gptq_codes: columns per block
STATISTICS_BYTES = 1 << 29   # float_statistics: H matrices held at once (chunks of layers beyond)


class Layer:
    """One layer's weight, its grid, and its accumulated statistics H and C."""

    def __init__(self, node, weight, record: QuantizerRecord, scale, zp):
        self.node, self.weight_tensor, self.record = node, weight, record
        self.w = np.asarray(weight.values, np.float32)
        self.scale = np.asarray(scale, np.float32).reshape(-1)
        self.zp = np.asarray(zp).astype(np.int64).reshape(-1)
        self.group = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
        self.h = None
        self.c = None
        self.rows = 0

    # weights as (groups, out per group, K) with the channel axis first
    def matrix(self, w: np.ndarray) -> np.ndarray:
        if self.node.op == "Conv":
            return w.reshape(self.group, w.shape[0] // self.group, -1)
        w2 = w if (self.node.op == "Gemm" and self.node.attrs.get("transB", 0)) else w.T
        return w2[None]

    def unmatrix(self, m: np.ndarray) -> np.ndarray:
        if self.node.op == "Conv":
            return m.reshape(self.w.shape)
        m = m[0]
        return m if (self.node.op == "Gemm" and self.node.attrs.get("transB", 0)) else m.T

    def channel_vector(self, v: np.ndarray) -> np.ndarray:
        """A per-output-channel vector as (groups, out per group, 1)."""
        m = self.matrix(self.w)
        return np.broadcast_to(np.asarray(v).reshape(-1), (m.shape[0] * m.shape[1],)).reshape(m.shape[0], m.shape[1], 1)

    def patches(self, x: np.ndarray) -> np.ndarray:
        """Rows of the layer's input as (groups, rows, K)."""
        if self.node.op != "Conv":
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            return x[None]
        return conv_patches(x, self.w.shape, self.node.attrs, self.group)

    def add(self, x_quant: np.ndarray, x_float: np.ndarray | None) -> None:
        """Accumulate H and C over a batch of inputs; only H when `x_float` is None (X̃ = X: C is H)."""
        pq = self.patches(x_quant)
        pq_t = pq.transpose(0, 2, 1)
        h = np.matmul(pq_t, pq)              # BLAS; np.einsum's own loops are ~20x slower here
        self.h = h if self.h is None else self.h + h
        if x_float is not None:
            c = np.matmul(pq_t, self.patches(x_float))
            self.c = c if self.c is None else self.c + c
        self.rows += pq.shape[1]

    def on_grid(self, scale, zp, qmin: int, qmax: int) -> "Layer":
        """This layer (same weight and statistics) on another grid, e.g. at another width."""
        other = copy.copy(self)
        other.scale = np.asarray(scale, np.float32).reshape(-1)
        other.zp = np.asarray(zp).astype(np.int64).reshape(-1)
        other.record = replace(self.record, qmin=qmin, qmax=qmax)
        return other

    def error(self, w_tilde: np.ndarray) -> float:
        """``(tr(W̃HW̃ᵀ) − 2tr(W̃CWᵀ)) / rows``: the reconstruction error less its constant ‖XWᵀ‖²
        term, so it orders candidate weights exactly like the full error."""
        return float(self.channel_errors(w_tilde).sum() / self.rows)

    def channel_errors(self, w_tilde: np.ndarray) -> np.ndarray:
        """The terms of :meth:`error` per output channel (groups, out per group), unnormalized: the
        output channels' errors are independent, so a channel may take its weights from any candidate."""
        w = self.matrix(self.w).astype(np.float64)
        return (np.matmul(w_tilde, self.h) * w_tilde).sum(-1) - 2.0 * (np.matmul(w_tilde, self.c) * w).sum(-1)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point per output channel, as (groups, out per group, 1) float64."""
        return (self.channel_vector(self.scale).astype(np.float64),
                self.channel_vector(self.zp).astype(np.float64))

    def nearest_codes(self) -> np.ndarray:
        """Round-to-nearest codes of W (what QuantizeLinear gives), as (groups, out per group, K)."""
        return quant.quantize(self.matrix(self.w), self.channel_vector(self.scale), self.channel_vector(self.zp),
                              self.record.qmin, self.record.qmax, dtype=np.int64)

    def values(self, codes: np.ndarray) -> np.ndarray:
        """The dequantized weight of `codes`, (groups, out per group, K) float64."""
        s, z = self.grid()
        return s * (codes - z)

    def weight(self, codes: np.ndarray) -> np.ndarray:
        """The float32 weight tensor (the layer's own shape) that `codes` dequantize to."""
        values = quant.dequantize(codes, self.channel_vector(self.scale), self.channel_vector(self.zp))
        return self.unmatrix(values).astype(np.float32)

    def write(self, codes: np.ndarray) -> None:
        self.weight_tensor.values = self.weight(codes)


def find_layers(model: QModel, records: dict[str, QuantizerRecord]) -> tuple[list[Layer], list[dict]]:
    """The layers whose quantized constant weight a rounding method can choose, and the skipped ones
    with their reasons."""
    nodes = {n.name: n for n in model.graph.nodes}
    layers, skipped = [], []
    for record in records.values():
        if record.kind != "weight":
            continue
        node = nodes[record.node]
        try:
            layers.append(_layer(node, nodes[record.quantize], record))
        except Declined as exc:
            skipped.append(skip(node, exc.reason))
    return layers, skipped


def round_weights(model: QModel, ctx, name: str, choose: Callable[[Layer], np.ndarray], max_samples: int,
                  detail: str = "", clip_ratios: Callable[[Layer], Sequence[float]] | None = None) -> dict:
    """A rounding pass `name`: every quantized constant weight of a Conv/Gemm/MatMul given the codes
    `choose(layer)` returns where they reconstruct better than round-to-nearest; the pass report.
    ``clip_ratios(layer)``: the scales, as fractions of the calibrated one, that each output channel
    may take instead (:func:`clipped_codes`); None or ``[1.0]`` keeps the calibrated scales."""
    records = require_quantizers(model, name)
    ctx.require_data(name)
    layers, skipped = find_layers(model, records)
    if not layers:
        return {"changed": 0, "summary": "no layer with a quantized constant weight", "skipped": skipped,
                "warnings": []}
    changed, gains, waves = round_in_waves(model, ctx, layers, choose, max_samples, name, clip_ratios)
    clipped = sum(1 for g in gains if g.get("clipped_channels"))
    if clipped:
        detail += f"; {clipped} with some channels' scales clipped"
    summary = f"{changed} of {len(layers)} weights re-rounded in {waves} waves{detail}"
    return {"changed": changed, "summary": summary, "layers": gains, "skipped": skipped, "warnings": []}


def round_in_waves(model: QModel, ctx, layers: list[Layer], choose: Callable[[Layer], np.ndarray],
                   max_samples: int, name: str,
                   clip_ratios: Callable[[Layer], Sequence[float]] | None = None) -> tuple[int, list[dict], int]:
    """Measure H and C wave by wave and give each layer the codes `choose(layer)` returns (on the
    scales :func:`clipped_codes` picks, with `clip_ratios`) when they reconstruct its output better
    than round-to-nearest on the calibrated scales; returns (changed, per-layer gains, waves)."""
    float_form = bypassed(model)
    float_nodes = {n.name: n for n in float_form.graph.nodes}
    nodes = {n.name: n for n in model.graph.nodes}
    by_name = {layer.node.name: layer for layer in layers}
    waves = layer_waves(model, list(by_name))
    changed, gains = 0, []
    for wave in waves:
        chosen = [by_name[node] for node in wave]
        _accumulate(model, float_form, chosen, [layer.node.inputs[0].name for layer in chosen],
                    [float_nodes[layer.node.name].inputs[0].name for layer in chosen], ctx, max_samples, name)
        for layer in chosen:
            ratios = list(clip_ratios(layer)) if clip_ratios else [1.0]
            before = layer.error(layer.values(layer.nearest_codes()))
            codes, scale = clipped_codes(layer, choose, ratios) if ratios != [1.0] else (choose(layer), layer.scale)
            candidate = layer.on_grid(scale, layer.zp, layer.record.qmin, layer.record.qmax)
            after = candidate.error(candidate.values(codes))
            gain = {"layer": layer.node.name, "gain": max(0.0, before - after)}
            if after < before:
                if not np.array_equal(scale, layer.scale):
                    write_qparams(nodes, layer.record, scale, layer.zp.reshape(np.shape(layer.scale)))
                    gain["clipped_channels"] = int(np.sum(scale != layer.scale))
                candidate.write(codes)
                changed += 1
            layer.h = layer.c = None
            gains.append(gain)
    return changed, gains, len(waves)


def clipped_codes(layer: Layer, choose: Callable[[Layer], np.ndarray],
                  ratios: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Clipping search: ``choose`` run on the layer's grid with its scales multiplied by each ratio;
    each output channel keeps the codes and scale of the ratio that reconstructs it best
    (Layer.channel_errors: the channels' errors are independent). A narrower grid clips a channel's
    largest weights to round the rest more finely; with a compensating rounding such as GPTQ the
    other weights absorb the clipping. A per-tensor scale takes the one ratio best for the whole
    layer. Returns (codes, scale: per channel, or one value for a per-tensor scale)."""
    per_tensor = layer.scale.size == 1
    best_errors = best_codes = best_scale = None
    for ratio in ratios:
        scale = (layer.scale * np.float32(ratio)).astype(np.float32)
        candidate = layer.on_grid(scale, layer.zp, layer.record.qmin, layer.record.qmax)
        codes = choose(candidate)
        errors = candidate.channel_errors(candidate.values(codes))
        channel_scale = candidate.channel_vector(scale)[..., 0]
        if per_tensor:
            errors = np.broadcast_to(errors.sum(), errors.shape)
        if best_errors is None:
            best_errors, best_codes, best_scale = errors, codes, channel_scale
            continue
        better = errors < best_errors
        best_errors = np.where(better, errors, best_errors)
        best_codes = np.where(better[..., None], codes, best_codes)
        best_scale = np.where(better, channel_scale, best_scale)
    scale = best_scale.reshape(-1).astype(np.float32)
    return best_codes, scale[:1] if per_tensor else scale


def float_statistics(model: QModel, layers: list[Layer], ctx, max_samples: int, name: str) -> None:
    """H = C = XᵀX of each layer on its float input (the float form, every quantizer bypassed): the
    statistics of rounding a weight for the float model, as mixed_precision weighs each weight
    alone. One run of the float form per chunk of layers whose H fit STATISTICS_BYTES."""
    from qgraph.runner import Runner
    float_form = bypassed(model)
    float_nodes = {n.name: n for n in float_form.graph.nodes}
    proto = float_form.to_onnx()
    chunks, size = [[]], 0
    for layer in layers:
        groups, _, k = layer.matrix(layer.w).shape
        if chunks[-1] and size + groups * k * k * 8 > STATISTICS_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(layer)
        size += groups * k * k * 8
    for chunk in chunks:
        inputs = [float_nodes[layer.node.name].inputs[0].name for layer in chunk]
        for (values,) in _calibration_values(ctx, proto, [(Runner(proto, inputs), inputs)], max_samples, name):
            for layer, tensor in zip(chunk, inputs):
                layer.add(values[tensor], None)
        for layer in chunk:
            layer.c = layer.h


def _layer(node, q_node, record: QuantizerRecord) -> Layer:
    if node.op not in LAYERS:
        raise Declined(f"{node.op} is not a Conv, Gemm or MatMul")
    weight = q_node.inputs[0]
    if not hasattr(weight, "values"):
        raise Declined(f"weight '{weight.name}' is computed in the graph (forward-fused BN?); fold it first")
    if len(weight.outputs) > 1:
        raise Declined(f"weight '{weight.name}' has other readers than its quantizer")
    w = np.asarray(weight.values)
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        raise Declined("Gemm with transA")
    if node.op in ("Gemm", "MatMul") and w.ndim != 2:
        raise Declined(f"{node.op} weight of rank {w.ndim}")
    if node.op == "MatMul" and node.inputs[1].name != f"{record.tensor}_dequantized" and \
            not (node.inputs[1].inputs and node.inputs[1].inputs[0].name == record.dequantize):
        raise Declined("the weight is the first operand of MatMul")
    if node.op == "Conv" and node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise Declined("Conv with auto_pad SAME_*")
    return Layer(node, weight, record, *quantizer_grid(q_node))


def quantizer_grid(q_node) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of a QuantizeLinear node, the zero point 0 where it has none."""
    scale = QModel.constant_value(q_node.inputs[1])
    zp = QModel.constant_value(q_node.inputs[2]) if len(q_node.inputs) > 2 else np.zeros_like(scale, np.int8)
    return scale, zp


def conv_patches(x: np.ndarray, w_shape, attrs, group: int) -> np.ndarray:
    """im2col rows of a Conv's input, (groups, N·out positions, C/g·kernel), in float64."""
    nd = len(w_shape) - 2
    kernel = list(w_shape[2:])
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    pads = list(attrs.get("pads", [0] * 2 * nd)) if attrs.get("auto_pad", "NOTSET") == "NOTSET" else [0] * 2 * nd
    x = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    ext = [(kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    win = np.lib.stride_tricks.sliding_window_view(x, ext, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dilations)]          # (N, C, *out, *kernel)
    n, c = win.shape[:2]
    out = win.shape[2:2 + nd]
    win = win.reshape(n, group, c // group, *out, *kernel)
    axes = (1, 0) + tuple(range(3, 3 + nd)) + (2,) + tuple(range(3 + nd, 3 + 2 * nd))
    return np.ascontiguousarray(win.transpose(axes)).reshape(group, n * int(np.prod(out)), -1)


def _accumulate(model: QModel, float_form: QModel, layers: list[Layer], quant_inputs: list[str],
                float_inputs: list[str], ctx, limit: int, name: str) -> None:
    from qgraph.runner import Runner
    qproto = model.to_onnx()
    runs = [(Runner(qproto, quant_inputs), quant_inputs), (Runner(float_form.to_onnx(), float_inputs), float_inputs)]
    for qv, fv in _calibration_values(ctx, qproto, runs, limit, name):
        for layer, qn, fn in zip(layers, quant_inputs, float_inputs):
            layer.add(qv[qn], fv[fn])


def _calibration_values(ctx, proto, runs, limit: int, name: str):
    """Per calibration batch (the feed plan of `proto`), the values each (runner, tensor names) of
    `runs` computes; PassError when no batch ran."""
    ran = 0
    for feeds, _ in ctx.feed_plan(proto).batches(ctx.batch_size, limit or None):
        yield [runner.run(feeds, names) for runner, names in runs]
        ran += 1
    if not ran:
        raise PassError(f"{name}: no calibration sample was run; give at least one full batch")


def gptq_codes(layer: Layer, damping: float = 0.01, act_order: bool = True) -> np.ndarray:
    """One GPTQ sweep (Frantar et al. 2023) over a layer's weight on its own grid; its codes as
    (groups, out per group, K). Columns are rounded in order of decreasing H_kk (`act_order`),
    each one's error spread over the columns left through U = chol(H⁻¹)ᵀ, toward the target
    T = W + W(Cᵀ − H)H⁻¹ (the reconstruction optimum; exactly W when X̃ = X, whatever the
    damping); in blocks of BLOCK columns (later blocks updated by one product per block), all
    groups of a grouped convolution at once. Passes: gptq; mixed_precision's `weight_rounding`."""
    h = layer.h / layer.rows
    groups, k = h.shape[0], h.shape[1]
    dead = np.diagonal(h, axis1=1, axis2=2) <= 0                        # inputs that were always zero
    h = h + np.eye(k) * (damping * np.diagonal(h, axis1=1, axis2=2).mean(axis=1) + 1e-12)[:, None, None]
    h[:, np.arange(k), np.arange(k)] += dead
    w = layer.matrix(layer.w).astype(np.float64)
    # T = W + W(Cᵀ − H)H⁻¹: exactly W when the inputs match (X̃ = X), whatever the damping
    shift = np.matmul((layer.c - layer.h) / layer.rows, w.transpose(0, 2, 1))
    target = w + np.swapaxes(np.linalg.solve(h, shift), 1, 2)
    order = np.argsort(-np.diagonal(h, axis1=1, axis2=2), axis=1, kind="stable") if act_order \
        else np.broadcast_to(np.arange(k), (groups, k))
    w = np.take_along_axis(target, order[:, None, :], axis=2)
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    u = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), 1, 2)          # upper: H⁻¹ = UᵀU
    scale, zp = layer.channel_vector(layer.scale), layer.channel_vector(layer.zp)
    qmin, qmax = layer.record.qmin, layer.record.qmax
    codes = np.empty(w.shape, np.int64)
    for start in range(0, k, BLOCK):
        stop = min(start + BLOCK, k)
        errors = np.empty(w.shape[:2] + (stop - start,))
        for j in range(start, stop):
            column = w[:, :, j:j + 1]
            q = quant.quantize(column, scale, zp, qmin, qmax, dtype=np.int64)
            codes[:, :, j:j + 1] = q
            e = (column - scale * (q - zp)) / u[:, None, j:j + 1, j]
            w[:, :, j:stop] -= e * u[:, None, j, j:stop]
            errors[:, :, j - start] = e[:, :, 0]
        w[:, :, stop:] -= np.matmul(errors, u[:, start:stop, stop:])
    unordered = np.empty_like(codes)
    np.put_along_axis(unordered, np.broadcast_to(order[:, None, :], codes.shape), codes, axis=2)
    return unordered
