"""gptq: weight rounding with second-order error compensation (Frantar et al. 2023, "GPTQ", the
Optimal Brain Quantization of Frantar & Alistarh 2022), in NumPy.

With H = X̃ᵀX̃ and C = X̃ᵀX of qgraph.reconstruction (X̃ the layer's input in the QDQ model, X in
the float form), the asymmetric reconstruction error of a weight W̃ is, up to a constant,

    tr((W̃ − T) H (W̃ − T)ᵀ),    T = W Cᵀ H⁻¹ = W + W (Cᵀ − H) H⁻¹    (the unconstrained optimum; T = W when X̃ = X)

GPTQ rounds the columns of W̃ (input features, K per group) one at a time, in order of
decreasing H_kk ("act order"), and spreads each column's rounding error over the columns not yet
rounded so that the error above stays least given the ones already fixed:

    q_k = Q(w_k),   e = (w_k − q_k) / U_kk,   w_j ← w_j − e·U_kj  (j > k),   U = chol(H⁻¹)ᵀ

Q is the layer's own grid (quant.quantize with its calibrated per-channel scale and zero point),
H is damped by `damping`·mean(diag H) (in the sweep, and in T's correction term only, so that
damping never shrinks W itself); the sweep is qgraph.reconstruction.gptq_codes.

Why next to adaround: AdaRound only chooses up or down per weight by gradient descent on the
same loss; GPTQ may move a weight any number of steps to compensate its neighbours' error, in
one closed-form sweep. Measured on PaddleOCR's recognizer (1×1 480→480 convolutions of its SVTR
neck, 8-bit): local SNR 43 → 60 dB, and that one layer's cost to the softmax output cosine
0.9967 → 0.9994 on held-out strips.

Clipping search (`clip_search`; `auto`: on grids of 16 levels or fewer, i.e. 4-bit weights): the
sweep runs with each weight's calibrated min/max scale and with it narrowed by each ratio of
CLIP_RATIOS, and each output channel keeps the codes and scale of the ratio whose sweep
reconstructs it best (the channels' errors are independent: reconstruction.clipped_codes). On a
4-bit grid the largest weight alone sets a channel's step; clipping it lets the other weights round
finer, and GPTQ's compensation absorbs the clipped part. Off by default: measured with W4A8
(ptq.yaml's settings with smooth and equalize, 4-bit per-channel weights, gptq, bias_correction;
32 calibration and 32 evaluation inputs; worst output's cosine, task agreement), off → auto:
ddddocr's recognizer 0.99062 → 0.99566 (identical strings 16 → 21 of 32), the DB detector builder
0.98255 → 0.98275 (boxes 56 → 56 of 82), the ViT builder 0.94793 → 0.94434 (top-1 20 → 19 of 32);
on the bundled MNIST models (1,000 val digits) lenet 95.5 → 95.9, resnet 94.1 → 94.0, mobilenetv2
92.9 → 93.0, mlp 92.3 → 91.8. The layer-local error always drops (ratio 1.0 is a candidate); the
model's output gains on the recognizer only. Seven sweeps per layer instead of one.

Invariant: changes outputs (weights move to other points of their grid; with `clip_search`, a
weight's per-channel scales may narrow); a layer keeps round-to-nearest on its calibrated scales where GPTQ
does not reconstruct its output better on the calibration data. Run it after calibrate, and do not
re-calibrate weights afterwards.
"""

from __future__ import annotations

from typing import Annotated, Literal

from qgraph.graph import QModel
from qgraph.pipeline import PassContext, register_pass
from qgraph.reconstruction import Layer, gptq_codes, round_weights
from qgraph.schema import Range

#: Scales tried per output channel in the clipping search, as fractions of the calibrated one.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
#: `clip_search: auto` searches grids of at most this many levels (4-bit weights).
AUTO_CLIP_LEVELS = 16


@register_pass("gptq", preserves_outputs=False)
def gptq(model: QModel, ctx: PassContext, *, damping: Annotated[float, Range(0.0, 1.0, lo_open=True)] = 0.01,
         act_order: bool = True, max_samples: Annotated[int, Range(0)] = 256,
         clip_search: Literal["auto", "on", "off"] = "off") -> dict:
    """Round each quantized weight column by column, compensating the error in the columns left (GPTQ)."""

    def ratios(layer: Layer):
        levels = layer.record.qmax - layer.record.qmin + 1
        search = clip_search == "on" or (clip_search == "auto" and levels <= AUTO_CLIP_LEVELS)
        return CLIP_RATIOS if search else (1.0,)

    return round_weights(model, ctx, "gptq", lambda layer: gptq_codes(layer, damping, act_order), max_samples,
                         clip_ratios=ratios)
