"""fuse_conv_bn: BatchNormalization pushed into the Conv/ConvTranspose/Gemm/MatMul before it.

With s = γ / √(σ² + ε) per output channel c:
    W'[c] = W[c] · s[c]
    b'[c] = (b[c] − μ[c]) · s[c] + β[c]
`mode: fold` (deploy) computes W', b' once in float64 and stores them as float32
initializers. `mode: forward` (QAT, linger's "forward fused, backward not fused",
Krishnamoorthi 2018) builds the same arithmetic as nodes inside the graph from W, b, γ, β
(μ, σ², ε frozen constants), so training updates W, γ, β while the layer (and the weight
quantizer later put on `<layer>.weight_fused`) sees the folded weight; the subgraphs are
listed in the `forward_fused_bn` annotation, μ and σ² in `frozen` (the trainer keeps what
that lists fixed), and canonicalize's constant folding turns them into the `fold` result.

The output channel is axis 0 of a Conv weight (C_out, C_in/g, k…), axis 1 *within each
group* of a ConvTranspose weight (C_in, C_out/g, k…), and the feature axis of a Gemm/MatMul
weight (axis 1, or 0 with transB). MatMul becomes Gemm so it can carry the bias.

A BatchNormalization with no layer to fold into (DenseNet's and pre-activation ResNets' BN after
a Concat or an Add, a BN on a graph input) becomes a depthwise 1x1 Conv of its own in both modes:
weight s[c], bias β[c] − μ[c]·s[c], group C. Quantization, lowering and training then treat it
as the per-channel affine layer it is, instead of a float island between integer layers (in QAT
its weight and bias train, the statistics being folded in).

Invariant: outputs unchanged up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from qgraph.annotations import FORWARD_FUSED_BN, FROZEN, get_annotation, set_annotation
from qgraph.errors import ConfigError, PassError
from qgraph.graph import Node, QModel, Tensor
from qgraph.idioms import Declined, bn_scale, grouped_view, out_channels, skip
from qgraph.pipeline import PassContext, register_pass
_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_MODES = ("fold", "forward")


@register_pass("fuse_conv_bn", preserves_outputs=True, tolerance=1e-5)
def fuse_conv_bn(model: QModel, ctx: PassContext, *, mode: Literal["fold", "forward"] = "fold") -> dict:
    """Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul (fold or forward)."""
    if mode not in _MODES:
        raise ConfigError(f"fuse_conv_bn: mode must be one of {', '.join(_MODES)}, got '{mode}'")
    fused, skipped, annotation, standalone = [], [], {}, []
    for bn in [n for n in model.graph.nodes if n.op == "BatchNormalization"]:
        try:
            match = match_bn(model, bn)
        except Declined as declined:
            try:
                standalone.append(bn_as_depthwise_conv(model, bn))
            except Declined as also:
                skipped.append(skip(bn, f"{declined.reason}; not a depthwise conv of its own either: {also.reason}"))
            continue
        check_finite(match)
        if not match.layer.name:  # the annotation and new tensor names need one
            match.layer.name = model.unique_name(match.layer.op.lower())
        if mode == "fold":
            fold_bn(model, match)
        else:
            annotation[match.layer.name] = forward_fuse_bn(model, match)
        fused.append({"bn": bn.name, "layer": match.layer.name, "op": match.layer_op})
    if fused or standalone:
        model.cleanup()
    if annotation:
        set_annotation(model, FORWARD_FUSED_BN, {**get_annotation(model, FORWARD_FUSED_BN, {}), **annotation})
        frozen = {entry[key] for entry in annotation.values() for key in ("mean", "var")}
        set_annotation(model, FROZEN, sorted(set(get_annotation(model, FROZEN, []) or []) | frozen))
    parts = [f"{len(fused)} BatchNormalization {'folded' if mode == 'fold' else 'forward-fused'}"] if fused else []
    parts += [f"{len(standalone)} with no layer before them as depthwise 1x1 convs"] if standalone else []
    parts += [f"{len(skipped)} left alone (see skipped)"] if skipped else []
    summary = ", ".join(parts) or "nothing to do: the model has no BatchNormalization"
    return {"changed": len(fused) + len(standalone), "summary": summary, "mode": mode, "fused": fused,
            "standalone_as_conv": standalone, "skipped": skipped, "warnings": []}


# -- pattern and check --------------------------------------------------------------------

@dataclass
class BNMatch:
    """A BatchNormalization that may be fused into `layer`, with every value it needs."""
    bn: Node
    layer: Node
    layer_op: str                # the layer's op before the rewrite (MatMul becomes Gemm)
    weight: Tensor
    bias: Tensor | None
    gamma: Tensor
    beta: Tensor
    mean: Tensor
    var: Tensor
    epsilon: float

    def value(self, tensor: Tensor) -> np.ndarray:
        return QModel.constant_value(tensor)


def match_bn(model: QModel, bn: Node) -> BNMatch:
    """The fusion for `bn`; Declined says why it does not apply."""
    _check_inference(model, bn)
    x = bn.inputs[0]
    layer = model.producer(x)
    if layer is None:
        raise Declined(f"its input '{x.name}' is a graph input, not a Conv/ConvTranspose/Gemm/MatMul output")
    if layer.op not in _LAYERS:
        raise Declined(f"its input '{x.name}' is produced by {layer.op} '{layer.name}', not "
                       "Conv/ConvTranspose/Gemm/MatMul")
    if model.only_consumer(x) is not bn:
        readers = len(x.outputs) - 1
        why = "is a graph output" if model.is_graph_output(x) else f"has {readers} other consumer(s)"
        raise Declined(f"the {layer.op} output '{x.name}' {why}; fusing would change it for them")
    if layer.domain not in (None, "", "ai.onnx"):
        raise Declined(f"{layer.op} '{layer.name}' is in domain '{layer.domain}'")
    params = bn.inputs[1:5]
    for role, tensor in zip(("scale", "B", "mean", "var"), params):
        _check_constant(model, tensor, f"BatchNormalization {role}")
    weight, bias = _layer_params(model, layer)
    match = BNMatch(bn, layer, layer.op, weight, bias, *params, float(bn.attrs.get("epsilon", 1e-5)))
    _check_shapes(match)
    return match


def bn_as_depthwise_conv(model: QModel, bn: Node) -> dict:
    """Replace `bn` (inference mode, constant statistics, input of rank 3-5 with known channels)
    by the depthwise 1x1 Conv computing ``x·s + (β − μ·s)``, s = γ/√(σ²+ε) in float64; Declined
    says why not. Returns the report entry."""
    _check_inference(model, bn)
    x = bn.inputs[0]
    rank = len(x.shape) if x.shape is not None else 0
    if not 3 <= rank <= 5:
        raise Declined(f"its input '{x.name}' has rank {rank or 'unknown'}, not 3-5 (N, C, spatial)")
    for role, tensor in zip(("scale", "B", "mean", "var"), bn.inputs[1:5]):
        _check_constant(model, tensor, f"BatchNormalization {role}")
    gamma, beta, mean, var = (np.asarray(QModel.constant_value(t), np.float64).reshape(-1) for t in bn.inputs[1:5])
    channels, eps, dim = gamma.size, float(bn.attrs.get("epsilon", 1e-5)), x.shape[1]
    if any(v.size != channels for v in (beta, mean, var)) or (isinstance(dim, (int, np.integer)) and dim != channels):
        raise Declined(f"its parameters do not all have the {dim} channels of '{x.name}'")
    if not all(np.all(np.isfinite(v)) for v in (gamma, beta, mean, var)) or np.any(var + eps <= 0):
        raise Declined("its statistics hold NaN/Inf or a non-positive variance")
    scale = bn_scale(gamma, var, eps)
    dtype = QModel.constant_value(bn.inputs[1]).dtype
    spatial = rank - 2
    weight = model.add_constant(f"{bn.name}.weight", scale.reshape((channels, 1) + (1,) * spatial).astype(dtype))
    bias = model.add_constant(f"{bn.name}.bias", (beta - mean * scale).astype(dtype))
    y = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    conv = model.add_node("Conv", [x, weight, bias], [y], f"{bn.name}/depthwise",
                          {"group": channels, "kernel_shape": [1] * spatial})
    return {"bn": bn.name, "conv": conv.name, "channels": channels}


def _check_inference(model: QModel, bn: Node) -> None:
    """Declined unless `bn` is in inference mode with its running-statistics outputs unread."""
    if int(bn.attrs.get("training_mode", 0)) != 0:
        raise Declined("BatchNormalization has training_mode=1")
    for extra in bn.outputs[1:]:
        if extra.outputs or model.is_graph_output(extra):
            raise Declined(f"its running-statistics output '{extra.name}' is used")


def _check_constant(model: QModel, tensor: Tensor, role: str) -> None:
    if model.is_graph_input(tensor):
        raise Declined(f"{role} '{tensor.name}' is a graph input, not an initializer")
    if model.constant_value(tensor) is None:
        raise Declined(f"{role} '{tensor.name}' is not a constant")


def _layer_params(model: QModel, layer: Node) -> tuple[Tensor, Tensor | None]:
    """The layer's weight and bias tensors (bias None when absent)."""
    inputs = layer.inputs
    if layer.op == "Gemm" and int(layer.attrs.get("transA", 0)) not in (0, 1):
        raise Declined(f"Gemm '{layer.name}' has an unexpected transA")
    if layer.op == "MatMul":
        weight = inputs[1]
        _check_constant(model, weight, f"MatMul '{layer.name}' weight")
        if model.constant_value(weight).ndim != 2:
            raise Declined(f"MatMul '{layer.name}' weight '{weight.name}' is not 2-D")
        if not _is_2d(inputs[0]) and not _is_2d(layer.outputs[0]):
            raise Declined(f"MatMul '{layer.name}' output is not known to be 2-D (N, C), so the BN "
                           "channel axis 1 may not be its feature axis; run shape inference first")
        return weight, None
    weight = inputs[1] if len(inputs) > 1 else None
    if weight is None:
        raise Declined(f"{layer.op} '{layer.name}' has no weight input")
    _check_constant(model, weight, f"{layer.op} '{layer.name}' weight")
    bias = inputs[2] if len(inputs) > 2 and inputs[2].name else None
    if bias is not None:
        _check_constant(model, bias, f"{layer.op} '{layer.name}' bias")
    return weight, bias


def _is_2d(tensor: Tensor) -> bool:
    if tensor.shape is not None and len(tensor.shape) == 2:
        return True
    producer = tensor.inputs[0] if tensor.inputs else None
    return producer is not None and producer.op in ("Flatten", "Gemm")


def _check_shapes(m: BNMatch) -> None:
    weight = m.value(m.weight)
    if weight.dtype.kind != "f":
        raise Declined(f"{m.layer_op} '{m.layer.name}' weight '{m.weight.name}' is {weight.dtype}, not float")
    channels = out_channels(m.layer, weight.shape)
    for tensor in (m.gamma, m.beta, m.mean, m.var):
        size = m.value(tensor).size
        if size != channels:
            raise Declined(f"BatchNormalization {tensor.name} has {size} channels but {m.layer_op} "
                           f"'{m.layer.name}' has {channels} outputs")
    if m.bias is not None and m.layer_op in ("Conv", "ConvTranspose") and m.value(m.bias).size != channels:
        raise Declined(f"{m.layer_op} '{m.layer.name}' bias '{m.bias.name}' has {m.value(m.bias).size} values, "
                       f"not {channels}")


def check_finite(m: BNMatch) -> None:
    """PassError naming the first weight or statistics tensor with NaN/Inf or negative variance."""
    for tensor in (m.weight, m.bias, m.gamma, m.beta, m.mean, m.var):
        if tensor is not None and not np.all(np.isfinite(m.value(tensor))):
            raise PassError(f"fuse_conv_bn: tensor '{tensor.name}' (used by '{m.bn.name}') contains NaN or Inf; "
                            "fix the model's weights/statistics before fusing")
    if np.any(m.value(m.var).astype(np.float64) + m.epsilon <= 0):
        raise PassError(f"fuse_conv_bn: running variance '{m.var.name}' + epsilon is not positive "
                        f"in '{m.bn.name}'; the statistics are invalid")


# -- layouts ------------------------------------------------------------------------------

def _gemm_factors(m: BNMatch) -> tuple[float, float]:
    if m.layer_op != "Gemm":
        return 1.0, 1.0
    return float(m.layer.attrs.get("alpha", 1.0)), float(m.layer.attrs.get("beta", 1.0))


# -- rewrites -----------------------------------------------------------------------------

def fold_bn(model: QModel, m: BNMatch) -> None:
    """Replace W, b by W', b' (computed in float64; names kept when unshared) and remove the BN."""
    weight = m.value(m.weight)
    gamma, beta, mean, var = (m.value(t).astype(np.float64).reshape(-1) for t in (m.gamma, m.beta, m.mean, m.var))
    scale = bn_scale(gamma, var, m.epsilon)
    alpha, gemm_beta = _gemm_factors(m)
    view, scale_shape = grouped_view(m.layer, weight.shape)
    folded = (weight.astype(np.float64).reshape(view) * (alpha * scale).reshape(scale_shape)).reshape(weight.shape)
    bias = gemm_beta * m.value(m.bias).astype(np.float64) if m.bias is not None else 0.0
    folded_bias = (bias - mean) * scale + beta
    base = m.layer.name
    new_weight = _replace_constant(model, m.weight, folded.astype(weight.dtype), f"{base}.weight_folded")
    new_bias = _replace_constant(model, m.bias, folded_bias.astype(weight.dtype), f"{base}.bias")
    _rewire(m, new_weight, new_bias)


def _replace_constant(model: QModel, tensor: Tensor | None, value: np.ndarray,
                      fallback: str) -> gs.Constant:
    """`tensor` holding `value` in place (its name kept) when only this layer reads it, else a new initializer."""
    if isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1 and not model.is_graph_output(tensor):
        tensor.values = value
        return tensor
    return gs.Constant(model.fresh_tensor_name(fallback), value)


def forward_fuse_bn(model: QModel, m: BNMatch) -> dict:
    """Build s = γ/√(σ²+ε), W·s and (b−μ)·s+β as nodes; the layer reads them. Returns the annotation entry."""
    dtype = m.value(m.weight).dtype
    base = m.layer.name
    weight_shape = m.value(m.weight).shape
    alpha, gemm_beta = _gemm_factors(m)

    def const(suffix: str, value) -> gs.Constant:
        return gs.Constant(model.fresh_tensor_name(f"{base}.{suffix}"), np.asarray(value, dtype=dtype))

    def op(op_type: str, inputs: list, out_name: str, dtype_=dtype) -> gs.Variable:
        out = gs.Variable(model.fresh_tensor_name(out_name), dtype=dtype_)
        model.add_node(op_type, inputs, [out], f"{base}/bn_fuse/{op_type}")
        return out

    def shape_const(suffix: str, shape) -> gs.Constant:
        return gs.Constant(model.fresh_tensor_name(f"{base}.{suffix}"), np.asarray(shape, dtype=np.int64))

    eps = const("bn_epsilon", m.epsilon)
    std = op("Sqrt", [op("Add", [m.var, eps], f"{base}.bn_var_eps")], f"{base}.bn_std")
    scale = op("Div", [m.gamma, std], f"{base}.bn_scale")
    weight_scale = op("Mul", [scale, const("alpha", alpha)], f"{base}.bn_scale_alpha") if alpha != 1.0 else scale

    view, scale_shape = grouped_view(m.layer, weight_shape)
    scale_view = op("Reshape", [weight_scale, shape_const("bn_scale_shape", scale_shape)], f"{base}.bn_scale_view")
    folded_name = f"{base}.weight_fused"
    if tuple(view) == tuple(weight_shape):
        folded_weight = op("Mul", [m.weight, scale_view], folded_name)
    else:
        weight_view = op("Reshape", [m.weight, shape_const("weight_group_view", view)], f"{base}.weight_group_view")
        scaled = op("Mul", [weight_view, scale_view], f"{base}.weight_group_fused")
        folded_weight = op("Reshape", [scaled, shape_const("weight_shape", weight_shape)], folded_name)

    bias = m.bias
    if bias is None:  # a trainable zero bias, so the layer gets one like a conv with bias=True
        bias = const("bias", np.zeros(out_channels(m.layer, weight_shape)))
    biased = op("Mul", [bias, const("gemm_beta", gemm_beta)], f"{base}.bias_beta") if gemm_beta != 1.0 else bias
    centered = op("Sub", [biased, m.mean], f"{base}.bias_centered")
    folded_bias = op("Add", [op("Mul", [centered, scale], f"{base}.bias_scaled"), m.beta], f"{base}.bias_fused")
    folded_weight.shape, folded_bias.shape = list(weight_shape), None

    _rewire(m, folded_weight, folded_bias)
    return {"bn": m.bn.name, "weight": m.weight.name, "bias": bias.name, "gamma": m.gamma.name,
            "beta": m.beta.name, "mean": m.mean.name, "var": m.var.name, "epsilon": m.epsilon,
            "folded_weight": folded_weight.name, "folded_bias": folded_bias.name}


def _rewire(m: BNMatch, weight: Tensor, bias: Tensor) -> None:
    """The layer reads (weight, bias) and writes the BN's output; the BN is detached."""
    layer, bn = m.layer, m.bn
    if layer.op == "MatMul":
        layer.op = "Gemm"
        layer.attrs = {"transA": 0, "transB": 0}
    if layer.op == "Gemm":
        layer.attrs["alpha"], layer.attrs["beta"] = 1.0, 1.0
    layer.inputs = [layer.inputs[0], weight, bias]
    out = bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    layer.outputs = [out]
