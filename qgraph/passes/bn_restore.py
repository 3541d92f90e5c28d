"""bn_restore: put a BatchNormalization back after convs whose BN was folded away.

For each chosen Conv with output y (channels on axis 1), calibration data gives the
per-channel mean μ and (population) variance σ² of y. The inserted node is

    BN(y) = γ·(y − μ)/√(σ² + ε) + β   with   γ = √(σ² + ε),  β = μ   ⇒   BN(y) = y,

so outputs are unchanged up to float32 rounding (a zero-variance channel gets γ = √ε and
is still the identity). The BN then carries what re-parameterized deploy models (RepVGG,
MobileOne) lost: β and γ for equalize's high-bias absorption, and a BN for QAT to train
(TinyNeuralNetwork's model_restore_bn). Statistics are streamed: per batch, per-channel
count/mean/M2 in float64 merged with Chan's parallel update — activations are never held.

Invariant: outputs unchanged up to float rounding.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import onnx_graphsurgeon as gs

from qgraph.errors import ConfigError, PassError
from qgraph.graph import QModel
from qgraph.idioms import Declined, NamePattern, name_patterns, skip
from qgraph.pipeline import PassContext, register_pass
from qgraph.schema import Range


@register_pass("bn_restore", preserves_outputs=True, tolerance=1e-5)
def bn_restore(model: QModel, ctx: PassContext, *, layers: list[str] | None = None,
               eps: Annotated[float, Range(0.0, lo_open=True)] = 1e-5) -> dict:
    """Insert identity BatchNormalization (γ=√(σ²+ε), β=μ from calibration data) after convs."""
    if eps <= 0:
        raise ConfigError(f"bn_restore: eps must be > 0, got {eps}")
    chosen, skipped = choose_convs(model, layers)
    if not chosen:
        return {"changed": 0, "summary": "no conv to restore a BatchNormalization after",
                "skipped": skipped, "warnings": [], "layers": []}
    stats = conv_output_statistics(model, ctx, [conv.outputs[0].name for conv in chosen])
    report_layers = []
    for conv in chosen:
        name = conv.outputs[0].name
        mean, var = stats[name]
        insert_identity_bn(model, conv, mean, var, eps)
        report_layers.append({"node": conv.name, "channels": int(mean.size),
                              "mean_abs_mu": float(np.mean(np.abs(mean))),
                              "mean_sigma": float(np.mean(np.sqrt(var)))})
    model.cleanup()
    summary = f"{len(chosen)} BatchNormalization restored from {stats['__count__']} samples"
    return {"changed": len(chosen), "summary": summary, "skipped": skipped, "warnings": [],
            "layers": report_layers}


def _layer_patterns(layers) -> list[NamePattern] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    return name_patterns(layers, "bn_restore layers", strict=True)


def choose_convs(model: QModel, layers) -> tuple[list[gs.Node], list[dict]]:
    """Convs matching `layers` (exact name or full regex match; None = all), minus those that cannot take a BN."""
    patterns = _layer_patterns(layers)
    chosen, skipped = [], []
    for node in model.graph.nodes:
        if node.op != "Conv":
            continue
        if patterns is not None and not any(p.matches(node.name) for p in patterns):
            continue
        try:
            _check_conv(model, node)
            chosen.append(node)
        except Declined as declined:
            skipped.append(skip(node, declined.reason))
    if patterns is not None and not chosen and not skipped:
        raise ConfigError(f"bn_restore: no Conv node matches 'layers' {layers!r}; see `qgraph inspect` for names")
    return chosen, skipped


def _check_conv(model: QModel, conv: gs.Node) -> None:
    """Declined when a BN cannot go after `conv`."""
    out = conv.outputs[0]
    if any(c.op == "BatchNormalization" for c in out.outputs):
        raise Declined("already followed by BatchNormalization")
    if model.constant_value(conv.inputs[1]) is None:
        raise Declined(f"weight '{conv.inputs[1].name}' is not an initializer (graph input or computed)")


def conv_output_statistics(model: QModel, ctx: PassContext, names: list[str]) -> dict:
    """Per-channel (mean, population variance) of each tensor in `names` over ctx's batches."""
    from qgraph.runner import Runner  # ORT import is slow; only a run needs it
    runner = Runner(model, extra_outputs=names)
    acc = {name: ChannelMoments() for name in names}
    count = 0
    for batch in ctx.batches(model):
        values = runner.run(batch, names)
        for name in names:
            acc[name].add(values[name])
        count += len(next(iter(batch.values())))
    stats: dict = {"__count__": count}
    for name, moments in acc.items():
        mean, var = moments.result()
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
            raise PassError(f"bn_restore: statistics of '{name}' contain NaN/Inf; check the model's weights "
                            "and the calibration data")
        stats[name] = (mean, var)
    return stats


class ChannelMoments:
    """Streaming per-channel mean and variance over all axes but 1 (Chan et al.'s merge, float64)."""

    def __init__(self):
        self.n = 0
        self.mean = None
        self.m2 = None

    def add(self, x: np.ndarray) -> None:
        if x.ndim < 2:
            raise PassError(f"bn_restore: conv output of rank {x.ndim} has no channel axis")
        axes = (0,) + tuple(range(2, x.ndim))
        x = x.astype(np.float64, copy=False)
        n = x.size // x.shape[1]
        if n == 0:
            return
        mean = x.mean(axis=axes)
        m2 = ((x - mean.reshape((1, -1) + (1,) * (x.ndim - 2))) ** 2).sum(axis=axes)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * n / total)
        self.n = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None:
            raise PassError("bn_restore: the calibration data has no samples")
        return self.mean, self.m2 / self.n


def insert_identity_bn(model: QModel, conv: gs.Node, mean: np.ndarray, var: np.ndarray, eps: float) -> gs.Node:
    """Rewire conv -> BN(γ=√(σ²+ε), β=μ) -> (conv's old output tensor), so every reader sees the BN."""
    out = conv.outputs[0]
    mean32 = mean.astype(np.float32)
    var32 = var.astype(np.float32)
    gamma = np.sqrt(var32 + np.float32(eps)).astype(np.float32)  # the same float32 sum BN computes
    pre = gs.Variable(model.fresh_tensor_name(f"{out.name}__pre_bn"), dtype=out.dtype, shape=out.shape)
    conv.outputs = [pre]
    base = f"{conv.name}_bn"
    params = [gs.Constant(model.fresh_tensor_name(f"{base}.{key}"), value) for key, value in
              (("scale", gamma), ("bias", mean32.copy()), ("mean", mean32), ("var", var32))]
    return model.add_node("BatchNormalization", [pre, *params], [out], base, {"epsilon": float(eps)})
