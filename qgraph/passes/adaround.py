"""adaround: learned weight rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding"), in NumPy.

    W̃(V) = s·(clip(floor(W/s) + h(V) + z, qmin, qmax) − z),   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)
    min_V  ‖X̃ W̃ᵀ − X Wᵀ‖² / n  +  λ Σ (1 − |2h(V) − 1|^β)          (β annealed 20 → 2)

Per Conv/Gemm/MatMul with a quantized weight: X̃ is the layer's input in the QDQ model
(activations quantized), X in its float form — the asymmetric reconstruction of the paper, on
the pre-activation output, through ``H = X̃ᵀX̃`` and ``C = X̃ᵀX`` (qgraph.reconstruction, which
also measures the layers in waves and keeps round-to-nearest where it reconstructs better), so an
Adam step costs one (C_out × K)·(K × K) product:

    ‖X̃ W̃ᵀ − X Wᵀ‖² = tr(W̃ H W̃ᵀ) − 2 tr(W̃ C Wᵀ) + const,   ∂/∂W̃ = 2(W̃ H − W Cᵀ)

The regularizer is off for the first `warmup` share of the iterations and then pushes h to 0
or 1; the weight becomes the dequantized chosen codes (quant.quantize_rounded).

Invariant: changes outputs (weights move to other grid points; scales do not change). Run it
after calibrate, and do not re-calibrate weights afterwards (that recomputes their scales).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from qgraph import quant
from qgraph.graph import QModel
from qgraph.pipeline import PassContext, register_pass
from qgraph.reconstruction import Layer, round_weights
from qgraph.schema import Range


@register_pass("adaround", preserves_outputs=False)
def adaround(model: QModel, ctx: PassContext, *, iterations: Annotated[int, Range(1, 100000)] = 1000,
             learning_rate: Annotated[float, Range(0.0, lo_open=True)] = 0.01,
             regularization: Annotated[float, Range(0.0)] = 0.01,
             warmup: Annotated[float, Range(0.0, 1.0, hi_open=True)] = 0.2,
             max_samples: Annotated[int, Range(0)] = 256) -> dict:
    """Learn each quantized weight's rounding (up or down) on a layer reconstruction loss (Nagel et al. 2020)."""
    return round_weights(model, ctx, "adaround",
                         lambda layer: learned_codes(layer, iterations, learning_rate, regularization, warmup),
                         max_samples, f" ({iterations} steps each)")


def learned_codes(layer: Layer, iterations: int, lr: float, lam: float, warmup: float) -> np.ndarray:
    """Adam on the rectified-sigmoid rounding variables V of one layer; the codes of h(V) ≥ ½."""
    w = layer.matrix(layer.w).astype(np.float64)
    s, z = layer.grid()
    qmin, qmax = layer.record.qmin, layer.record.qmax
    base = np.floor((w / s).astype(np.float32)).astype(np.float64)
    # the loss is normalized by round-to-nearest's error (its constant term ‖XWᵀ‖² is unknown)
    norm = max(abs(layer.error(layer.values(layer.nearest_codes()))), 1e-12)
    v = quant.adaround_init(w, s)
    m, u = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    start = int(warmup * iterations)
    for step in range(1, iterations + 1):
        sig = 1.0 / (1.0 + np.exp(-v))
        hv = np.clip(sig * (quant.ADAROUND_ZETA - quant.ADAROUND_GAMMA) + quant.ADAROUND_GAMMA, 0.0, 1.0)
        codes = base + hv + z
        inside = (codes >= qmin) & (codes <= qmax)
        w_tilde = s * (np.clip(codes, qmin, qmax) - z)
        grad_w = 2.0 * (np.matmul(w_tilde, layer.h) - np.matmul(w, layer.c.transpose(0, 2, 1))) / layer.rows / norm
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
    return quant.quantize_rounded(layer.matrix(layer.w), layer.channel_vector(layer.scale),
                                  layer.channel_vector(layer.zp), qmin, qmax, up, dtype=np.int64)
