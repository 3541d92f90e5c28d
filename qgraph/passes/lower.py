"""lower: rewrite a QDQ model into integer operators for a deployment target.

    qlinear:  y_q = QLinearOp(x_q, s_x, z_x, w_q, s_w, z_w, s_y, z_y, b_int32)   (ORT's kernels)
    integer:  y_q = clip((acc · M0 + 2^(n-1)) >> n + z_y),  acc = Σ (x_q − z_x)(w_q − z_w) + b_int32

Weights are stored quantized (int8, biases int32 at s_x·s_w); weight quantizers and
forward-fused BN arithmetic are constant-folded first; Relu/Clip fold into the output range.
Nodes that cannot be lowered stay float between DequantizeLinear and QuantizeLinear and are
reported with the reason. The library is qgraph/lowering/.

Invariant: changes outputs within the quantization model (one requantization rounding per op,
half-even in ORT's kernels, half-up in the integer target); bit-exact against qgraph.interp.
"""

from __future__ import annotations

from typing import Literal

from qgraph.graph import QModel
from qgraph.lowering import lower_graph
from qgraph.pipeline import PassContext, register_pass


@register_pass("lower", preserves_outputs=False)
def lower(model: QModel, ctx: PassContext, *, target: Literal["qlinear", "integer"] = "qlinear") -> dict:
    """Lower QDQ pairs to QLinear ops (target qlinear) or integer-only arithmetic (target integer)."""
    return lower_graph(model, target)
