"""adaround: learned weight rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding"), in NumPy.

    W̃(V) = s·(clip(floor(W/s) + h(V) + z, qmin, qmax) − z),   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)
    min_V  ‖X̃ W̃ᵀ − X Wᵀ‖² / n  +  λ Σ (1 − |2h(V) − 1|^β)          (β annealed 20 → 2)

Per Conv/Gemm/MatMul with a quantized weight: X̃ is the layer's input in the QDQ model
(activations quantized), X in its float form (qparams.bypassed) — the asymmetric
reconstruction of the paper, on the pre-activation output. The loss needs X only through
``H = X̃ᵀX̃`` and ``C = X̃ᵀX`` (K×K per group, K = C_in/g·kernel; convolutions as im2col
patches), accumulated over the calibration data in one run of each model, so an Adam step
costs one (C_out × K)·(K × K) product and no activations are kept:

    ‖X̃ W̃ᵀ − X Wᵀ‖² = tr(W̃ H W̃ᵀ) − 2 tr(W̃ C Wᵀ) + const,   ∂/∂W̃ = 2(W̃ H − W Cᵀ)

The regularizer is off for the first `warmup` share of the iterations and then pushes h to 0
or 1; the weight becomes the dequantized chosen codes (quant.quantize_rounded), so the model's
QuantizeLinear reproduces them exactly. A layer keeps round-to-nearest when the learned rounding
does not lower its reconstruction error. Layers are rounded in waves (idioms.layer_waves): X̃ of
a wave is measured on the model whose earlier waves are already rounded — with the asymmetric
loss each layer compensates the error upstream, so measuring every layer on the unrounded model
(one shot) compensates the same error twice and the model collapses (MNIST ResNet W4A8: 88% → 11%).

Invariant: changes outputs (weights move to other grid points; scales do not change). Run it
after calibrate, and do not re-calibrate weights afterwards (that recomputes their scales).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from qgraph import quant
from qgraph.annotations import QuantizerRecord, require_quantizers
from qgraph.errors import PassError
from qgraph.graph import QModel
from qgraph.idioms import Declined, layer_waves, skip
from qgraph.pipeline import PassContext, register_pass
from qgraph.qparams import bypassed
from qgraph.schema import Range

LAYERS = ("Conv", "Gemm", "MatMul")


@register_pass("adaround", preserves_outputs=False)
def adaround(model: QModel, ctx: PassContext, *, iterations: Annotated[int, Range(1, 100000)] = 1000,
             learning_rate: Annotated[float, Range(0.0, lo_open=True)] = 0.01,
             regularization: Annotated[float, Range(0.0)] = 0.01,
             warmup: Annotated[float, Range(0.0, 1.0, hi_open=True)] = 0.2,
             max_samples: Annotated[int, Range(0)] = 256) -> dict:
    """Learn each quantized weight's rounding (up or down) on a layer reconstruction loss (Nagel et al. 2020)."""
    records = require_quantizers(model, "adaround")
    ctx.require_data("adaround")
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
    if not layers:
        return {"changed": 0, "summary": "no layer with a quantized constant weight", "skipped": skipped,
                "warnings": []}
    float_form = bypassed(model)
    float_nodes = {n.name: n for n in float_form.graph.nodes}
    by_name = {layer.node.name: layer for layer in layers}
    waves = layer_waves(model, list(by_name))
    changed, gains = 0, []
    for wave in waves:
        chosen = [by_name[name] for name in wave]
        _accumulate(model, float_form, chosen, [layer.node.inputs[0].name for layer in chosen],
                    [float_nodes[layer.node.name].inputs[0].name for layer in chosen], ctx, max_samples)
        for layer in chosen:
            before, after = layer.optimize(iterations, learning_rate, regularization, warmup)
            if after < before:
                layer.write()
                changed += 1
            layer.h = layer.c = None
            gains.append({"layer": layer.node.name, "gain": before - after})
    summary = f"{changed} of {len(layers)} weights re-rounded in {len(waves)} waves ({iterations} steps each)"
    return {"changed": changed, "summary": summary, "layers": gains, "skipped": skipped, "warnings": []}


class _Layer:
    """One layer's weight, grid and accumulated statistics."""

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

    def add(self, x_quant: np.ndarray, x_float: np.ndarray) -> None:
        pq, pf = self.patches(x_quant), self.patches(x_float)
        h = np.einsum("grk,grl->gkl", pq, pq)
        c = np.einsum("grk,grl->gkl", pq, pf)
        self.h = h if self.h is None else self.h + h
        self.c = c if self.c is None else self.c + c
        self.rows += pq.shape[1]

    def error(self, w_tilde: np.ndarray) -> float:
        """``(tr(W̃HW̃ᵀ) − 2tr(W̃CWᵀ)) / rows``: the reconstruction error less its constant ‖XWᵀ‖²
        term, so it orders candidate weights exactly like the full error."""
        w = self.matrix(self.w).astype(np.float64)
        return float((np.einsum("gok,gkl,gol->", w_tilde, self.h, w_tilde)
                      - 2.0 * np.einsum("gok,gkl,gol->", w_tilde, self.c, w)) / self.rows)

    def optimize(self, iterations: int, lr: float, lam: float, warmup: float) -> tuple[float, float]:
        w = self.matrix(self.w).astype(np.float64)
        s = self.channel_vector(self.scale).astype(np.float64)
        z = self.channel_vector(self.zp).astype(np.float64)
        qmin, qmax = self.record.qmin, self.record.qmax
        base = np.floor((w / s).astype(np.float32)).astype(np.float64)
        # constant term ‖X Wᵀ‖² is not known without ΣXᵀX; errors are compared as differences
        nearest = s * (np.clip(quant.round_half_even((w / s).astype(np.float32)) + z, qmin, qmax) - z)
        err_nearest = self.error(nearest)
        v = quant.adaround_init(w, s)
        m, u = np.zeros_like(v), np.zeros_like(v)
        b1, b2, eps = 0.9, 0.999, 1e-8
        start = int(warmup * iterations)
        norm = max(abs(err_nearest), 1e-12)
        for step in range(1, iterations + 1):
            sig = 1.0 / (1.0 + np.exp(-v))
            hv = np.clip(sig * (quant.ADAROUND_ZETA - quant.ADAROUND_GAMMA) + quant.ADAROUND_GAMMA, 0.0, 1.0)
            codes = base + hv + z
            inside = (codes >= qmin) & (codes <= qmax)
            w_tilde = s * (np.clip(codes, qmin, qmax) - z)
            grad_w = 2.0 * (np.einsum("gok,gkl->gol", w_tilde, self.h)
                            - np.einsum("gok,glk->gol", w, self.c)) / self.rows / norm
            grad_h = grad_w * s * inside
            if step > start and lam > 0:
                beta = 20.0 + (2.0 - 20.0) * (step - start) / max(1, iterations - start)
                d = 2.0 * hv - 1.0
                grad_h = grad_h + lam * (-beta * np.abs(d) ** (beta - 1.0) * np.sign(d) * 2.0)
            live = (hv > 0.0) & (hv < 1.0)
            grad_v = grad_h * sig * (1.0 - sig) * (quant.ADAROUND_ZETA - quant.ADAROUND_GAMMA) * live
            m = b1 * m + (1 - b1) * grad_v
            u = b2 * u + (1 - b2) * grad_v * grad_v
            v -= lr * (m / (1 - b1 ** step)) / (np.sqrt(u / (1 - b2 ** step)) + eps)
        up = quant.rectified_sigmoid(v) >= 0.5
        self.up = up
        chosen = s * (np.clip(base + up + z, qmin, qmax) - z)
        return err_nearest, self.error(chosen)

    def write(self) -> None:
        m = self.matrix(self.w)
        codes = quant.quantize_rounded(m, self.channel_vector(self.scale), self.channel_vector(self.zp),
                                       self.record.qmin, self.record.qmax, self.up, dtype=np.int32)
        values = quant.dequantize(codes, self.channel_vector(self.scale), self.channel_vector(self.zp))
        self.weight_tensor.values = self.unmatrix(values).astype(np.float32)


def _layer(node, q_node, record: QuantizerRecord) -> _Layer:
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
    scale = QModel.constant_value(q_node.inputs[1])
    zp = QModel.constant_value(q_node.inputs[2]) if len(q_node.inputs) > 2 else np.zeros_like(scale, np.int8)
    return _Layer(node, weight, record, scale, zp)


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


def _accumulate(model: QModel, float_form: QModel, layers: list[_Layer], quant_inputs: list[str],
                float_inputs: list[str], ctx: PassContext, limit: int) -> None:
    from qgraph.runner import Runner
    qproto, fproto = model.to_onnx(), float_form.to_onnx()
    qrun, frun = Runner(qproto, quant_inputs), Runner(fproto, float_inputs)
    ran = 0
    for feeds, _ in ctx.feed_plan(qproto).batches(ctx.batch_size, limit or None):
        qv, fv = qrun.run(feeds, quant_inputs), frun.run(feeds, float_inputs)
        for layer, qn, fn in zip(layers, quant_inputs, float_inputs):
            layer.add(qv[qn], fv[fn])
        ran += 1
    if not ran:
        raise PassError("adaround: no calibration sample was run; give at least one full batch")
