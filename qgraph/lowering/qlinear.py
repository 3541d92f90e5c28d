"""Target `qlinear`: ONNX Runtime's quantized operators.

    Conv                 → QLinearConv (int8/uint8 x, int8 w per channel, int32 bias at s_x·s_w); a
                           depthwise conv padded to whole blocks of 16 channels between a Pad
                           and a Slice (depthwise_padded_channels); a 3x3 stem from 1-3 channels
                           reads its input padded to 4 and writes at least 16 channels, the real
                           ones sliced out (narrow_input_padded_channels); the Pads and Slices
                           go where the extra channels can travel instead (channel_padding.py)
    Gemm (+bias)         → Unsqueeze → QLinearConv 1×1 → Flatten: one exact requantization,
                           with the int32 bias and per-channel weights (QLinearMatMul has no
                           bias, and QLinearMatMul + QLinearAdd would round twice)
    MatMul (no bias)     → QLinearMatMul
    Add, Mul             → com.microsoft QLinearAdd, QLinearMul
    GlobalAveragePool, AveragePool, Concat, Sigmoid, LeakyRelu
                         → com.microsoft QLinearGlobalAveragePool, QLinearAveragePool,
                           QLinearConcat, QLinearSigmoid, QLinearLeakyRelu
    Concat input written by a table for it alone
                         → the table composed with the input's requantization: the input is
                           on the output's grid, which QLinearConcat copies
                           (fold_concat_requantization)
    MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Resize(nearest), Identity
                         → the same op on the integer tensor (a DQ→Q requantization only
                           when the output grid differs from the input grid)
    SiLU where QLinearSigmoid → QLinearMul writes the table's code for every input code
                         → that pair, on grids sigmoid_mul_grids finds (emit_region)
    HardSwish (one op, or exported as x·Clip(x+3, 0, 6)/6) where ORT's own float HardSwish
    writes the table's code for every input code
                         → DequantizeLinear → HardSwish → QuantizeLinear, a float activation
                           (emit_float_activation; faster than the table, below)
    other unary elementwise ops (Tanh, HardSigmoid, …) and exported activations
    (SiLU, GELU as several ops: idioms.unary_regions)
                         → a 256-entry table ``Q_out(f(DQ_in(q)))`` computed by ORT's own float
                           kernel, applied with GatherElements; on 4-D maps in NHWC between
                           Transposes that ORT cancels against its NHWC QLinearConv's (tables.py)
    Relu / Clip          → folded into the producer's output range (a Clip on the integer
                           output only when the range does not make it implicit)
    Resize (nearest, integer upscale of H and W) on codes
                         → Unsqueeze → Expand → Reshape in NHWC between Transposes
                           (upsample_channels_last)

ORT 1.19 CPU has QLinearConv/QLinearMatMul kernels for (uint8, uint8|int8) and (int8, int8)
activation × weight pairs only; other pairs stay float with a reason.

Tables or the float function between DequantizeLinear and QuantizeLinear (what ORT's
quantize_static does for ops without a QLinear kernel)? Measured in ORT 1.19.2, one thread, AMD
EPYC (AVX2), whole sessions alternated, ns per element of a uint8 map (8×8×24×96 / 16×160×160 /
1×8×24×96): DQ → HardSwish → Q 0.89 / 0.55 / 0.79 (ORT runs HardSwish as HardSigmoid and Mul,
two vectorized passes), the table 1.59 / 0.93 / 1.15, DQ → Sigmoid → Mul → Q 1.22 / 0.83 /
1.05. So HardSwish runs as its float op wherever that reproduces the table for every code
(checked in ORT and in the reference interpreter, emit_float_activation); whole models in
benchmarks/latency.py. Not where the region is more than a HardSwish: PP-OCRv4's detector follows
each with a learnable affine a·h(x) + b, whose float form (two passes more) costs what the table
does (1.00 against 1.01 ns per element on 16×160×160), so the check declines it and the table
stays. A SiLU's float pair is faster per map too, but not in YOLOv8n as a whole (0.46x of float
with tables, 0.48-0.50x with float SiLU: its maps feed Concat, Split and MaxPool, which ORT then
runs around more transposes), so SiLU keeps its table. (A measurement of 2026-11-28 on a Xeon host
had the table at 0.45 ms and DQ → HardSwish → Q at 1.0 ms on 16×160×160; not re-measured there:
`qgraph profile` shows what each form costs on the host at hand.)
ORT's own lookups (QLinearSigmoid 0.18 ms) are faster still, but exist for Sigmoid and
LeakyRelu only; SiLU as QLinearSigmoid then QLinearMul, as ORT's QOperator model runs it,
rounds the sigmoid to 8 bits in between, which the QDQ model does not.

No exact form of an arbitrary table is faster in ORT 1.19 (one thread, 16×80×80 uint8, ns per
element): GatherElements 0.56 and its Cast 0.08-0.18; ArrayFeatureExtractor 0.52 but on int64
indices and int32 values; Gather 3.1; GatherND 4.8. MLAS's lookup (0.20) is reachable only
through QLinearSigmoid and QLinearLeakyRelu, whose tables ORT builds from the logistic and
leaky-ReLU functions. On nudenet's 57 SiLU sites QLinearSigmoid → QLinearMul on ORT's own grids
differs from the exact table on 15-97 of the 256 codes; other grids make it exact on the coarse
grids of the first layers only (6 of the 57, emit_region), so elsewhere an exact SiLU costs about
1.8x the node time of ORT's inexact pair. A user who prefers ORT's speed to the exact table
quantizes σ as ORT does (insert_qdq's `split_regions: [silu]`); the pair is then the QDQ model's
own arithmetic: a QLinearSigmoid and a QLinearMul, lowered as any other.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qgraph import quant
from qgraph.graph import OPSET, QModel
from qgraph.idioms import CLAMPS, RANGE_PRESERVING, Declined, range_preserving_reason
from qgraph.lowering.float_output import lower_to_float
from qgraph.lowering.tables import (CODE_MOVES, emit_on_code_row, emit_table, function_table, is_map,
                                     table_behind)
from qgraph.lowering.patterns import (DEQUANTIZE, QUANTIZE, QInput, Site, const, finish_site,
                                      quantizer_constants, var)
from qgraph.model_io import MS_DOMAIN

MOVING_OPS = RANGE_PRESERVING + CLAMPS   # run unchanged on integer tensors (idioms.RANGE_PRESERVING)
UNARY_TABLE_OPS = ("Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
                   "Softsign", "Exp", "Neg", "Abs", "Erf", "Gelu", "ThresholdedRelu", "Celu", "Sqrt", "Log",
                   "Reciprocal")


# -- shared checks (each raises Declined with the reason a site cannot be lowered) ---------------

def activation(site: Site, i: int) -> QInput:
    """The per-tensor integer activation input ``i``."""
    qi = site.qin(i)
    if qi is None:
        raise Declined(f"missing quantizer: input {i} of {site.node.op} is not dequantized")
    if qi.quantizer.per_channel:
        raise Declined(f"input '{qi.tensor.name}' has a per-channel activation quantizer")
    return qi


def weight(site: Site, i: int) -> QInput:
    """The dequantized constant weight input ``i``."""
    qi = site.qin(i)
    if qi is None or qi.const is None:
        raise Declined(f"missing quantizer: weight input {i} of {site.node.op} is not a dequantized constant")
    return qi


def int32_bias(site: Site, i: int, x: QInput, w: QInput, channels: int) -> np.ndarray | None:
    """The bias as int32 at scale ``s_x·s_w`` (per channel): an int32 DequantizeLinear at that scale is
    taken as is (what ORT's own QDQ fusion does); a float bias is quantized with that scale."""
    if i >= len(site.inputs) or site.inputs[i] is None:
        return None
    value = site.inputs[i]
    if isinstance(value, QInput):
        b = value.const
        if b is None:
            raise Declined("the bias is not constant")
        bq = value.quantizer
        expected = np.broadcast_to(quant.bias_scale(x.quantizer.scale, w.quantizer.scale), (channels,))
        if (b.dtype == np.int32 and not np.any(bq.zero_point)
                and np.array_equal(np.broadcast_to(bq.scale, (channels,)), expected)):
            return b.reshape(channels).astype(np.int32)
        value = bq.dequantize(b, axis=0)
    return quant.quantize_bias(np.asarray(value, np.float32).reshape(channels), x.quantizer.scale,
                               np.broadcast_to(w.quantizer.scale, (channels,)))


def gemm_weight_mk(node, w: np.ndarray) -> np.ndarray:
    """A Gemm/MatMul weight as [M, K] (output features first)."""
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return w
    return w.T


def check_kernel_pair(x: QInput, w: QInput) -> None:
    if x.quantizer.dtype == np.int8 and w.quantizer.dtype != np.int8:
        raise Declined("ORT 1.19 has no QLinearConv/QLinearMatMul kernel for int8 activations with uint8 weights")
    if x.quantizer.dtype not in (np.int8, np.uint8) or w.quantizer.dtype not in (np.int8, np.uint8):
        raise Declined("activation and weight must be 8-bit")


def kernel_inputs(site: Site) -> tuple[QInput, QInput]:
    """The (activation, weight) of a Conv/Gemm/MatMul site that a QLinear kernel can take."""
    x, w = activation(site, 0), weight(site, 1)
    check_kernel_pair(x, w)
    return x, w


def check_gemm_form(node) -> None:
    """Gemm attributes the lowerings do not express (MatMul has none of them)."""
    attrs = node.attrs
    if float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0 or attrs.get("transA", 0):
        raise Declined("Gemm with alpha/beta != 1 or transA is not lowered")


def weight_zero_points(w: QInput, channels: int) -> np.ndarray:
    zp = w.quantizer.zero_point
    return zp if zp.ndim == 0 else zp.reshape(channels)


# -- rules -------------------------------------------------------------------------------

def lower_conv(model: QModel, site: Site) -> None:
    node = site.node
    x, w = kernel_inputs(site)
    if site.float_output:
        return lower_to_float(model, site, x, w)
    channels = w.const.shape[0]
    bias = int32_bias(site, 2, x, w, channels)
    name = node.name

    group = int(node.attrs.get("group", 1))
    depthwise = depthwise_padded_channels(group, w.const.shape)
    stem = narrow_input_padded_channels(group, w.const.shape)
    wide_input, wide_output = stem if stem else (None, None)
    # output channels computed when more than the real ones, which a Slice takes out after the conv
    padded = depthwise or (wide_output if wide_output and wide_output > channels else None)

    def build(out):
        xs, xz = quantizer_constants(model, x.quantizer, f"{name}_x")
        ws_value, wz_value, w_value = w.quantizer.scale, weight_zero_points(w, channels), w.const
        bias_value, attrs, x_in, y_out = bias, dict(node.attrs), x.tensor, out
        if padded:
            # extra output channels: zero weights (their zero point) and zero bias, dropped by the Slice
            extra = padded - channels
            pad_zp = wz_value.reshape(-1)[0]    # ORT takes uint8 weights' zero points only when they agree
            w_value = np.concatenate([w_value, np.full((extra, *w_value.shape[1:]), pad_zp, w_value.dtype)])
            ws_value = _pad_channels(ws_value, extra, ws_value.reshape(-1)[0])
            wz_value = _pad_channels(wz_value, extra, pad_zp)
            bias_value = _pad_channels(np.zeros(channels, np.int32) if bias is None else bias, extra, 0)
            y_out = var(model, f"{name}_y_padded", site.out_q.dtype)
        if depthwise:
            attrs["group"] = padded
            x_in = _zero_point_channels(model, x, xz, w.const.ndim, padded - channels, f"{name}_x_padded",
                                        f"{name}_channel_pads", f"{name}_pad_channels")
        if wide_input:
            extra = wide_input - w_value.shape[1]
            # the extra input channels read the zero point, so (x − x_zp)·(w − w_zp) = 0 whatever
            # their weights; they take each output channel's zero point
            fill = np.broadcast_to(np.asarray(wz_value, w_value.dtype).reshape(-1, 1, 1, 1),
                                   (w_value.shape[0], extra, *w_value.shape[2:]))
            w_value = np.concatenate([w_value, fill], axis=1)
            x_in = _zero_point_channels(model, x, xz, w.const.ndim, extra, f"{name}_x_wide",
                                        f"{name}_input_channel_pads", f"{name}_pad_input_channels")
        w_tensor = w.tensor if w_value is w.const else const(model, f"{name}_w_padded", w_value)
        ws = const(model, f"{name}_w_scale", ws_value)
        wz = const(model, f"{name}_w_zero_point", wz_value)
        ys, yz = quantizer_constants(model, site.out_q, f"{name}_y")
        inputs = [x_in, xs, xz, w_tensor, ws, wz, ys, yz]
        if bias_value is not None:
            inputs.append(const(model, f"{name}_bias_int32", bias_value))
        model.add_node("QLinearConv", inputs, [y_out], name, attrs)
        if padded:
            model.add_node("Slice", [y_out, const(model, f"{name}_slice_start", np.array([0], np.int64)),
                                     const(model, f"{name}_slice_end", np.array([channels], np.int64)),
                                     const(model, f"{name}_slice_axis", np.array([1], np.int64))], [out],
                           f"{name}_slice_channels")

    finish_site(model, site, build)


#: ORT 1.19's depthwise QLinearConv (MLAS, AVX2) runs 16 channels per step, and a channel count off
#: that block costs far more than its share: measured on one thread, 5x5 kernels on 3x96 maps, 88
#: channels 71.7 us against 96 channels 42.9 us, 200 against 208: 139 against 74 us; 120 channels on
#: 60x60: 1184 us, and 634 us padded to 128 with the Pad and Slice around it.
DEPTHWISE_CHANNEL_BLOCK = 16


def depthwise_padded_channels(group: int, weight_shape) -> int | None:
    """The channel count a depthwise conv (one input and one output channel per group; weight
    [C, 1, k...]) is padded to so that ORT runs it in whole blocks (DEPTHWISE_CHANNEL_BLOCK), or None
    where it already does or has a single block's worth of channels or fewer (nothing to gain: 8
    channels 13.8 us, padded to 16 14.6 us). The padded channels are groups of their own with zero
    weights, which the Slice after the conv drops: the real channels' codes are unchanged."""
    channels = weight_shape[0]
    if group == 1 or group != channels or weight_shape[1] != 1 or channels <= DEPTHWISE_CHANNEL_BLOCK:
        return None
    if channels % DEPTHWISE_CHANNEL_BLOCK == 0:
        return None
    return -(-channels // DEPTHWISE_CHANNEL_BLOCK) * DEPTHWISE_CHANNEL_BLOCK


#: ORT 1.19's QLinearConv on a 3x3 kernel over 1-3 input channels (a stem) into 16 or more output
#: channels runs 1.2-1.6x faster with the input padded to 4 channels, Pad included (one thread, uint8,
#: stride 2 unless noted: 3 -> 16 on 48x192 121 -> 87 us; 3 -> 16 on 160x160 273 -> 213 us, batch 8
#: 2.33 -> 1.74 ms; 3 -> 24 341 -> 252; 3 -> 32 stride 1 1426 -> 875; 3 -> 48 498 -> 355; 1 -> 16 on
#: 64x320 stride 1 709 -> 570) and slower into fewer (3 -> 8 on 224x224 499 -> 522 us, batch 8 3.9 ->
#: 4.2 ms; 3 -> 12 on 160x160 278 -> 284); 5x5 and 6x6 stems gain nothing or lose (6x6 3 -> 16 on
#: 320x320 6.6 -> 7.2 ms). A stem into fewer than 16 outputs is therefore also padded to 16 outputs
#: (zero weights, a Slice after): 3 -> 8 on 48x192 at batch 8, the conv and its following 8-channel
#: depthwise and pointwise convs alone, 497 -> 320 us for the stem (NCHW model, ORT's transposes
#: inside); whole models alternated with their float form (AMD EPYC, one thread, HardSwish as its
#: float op, 150 rounds, batch 1 / 8): PP-LCNet text-direction net 1.050x / 1.045x -> 1.002x /
#: 0.997x of float, PaddleOCR's direction classifier 1.087x / 1.015x -> 1.068x / 0.993x, PP-LCNet
#: on 224x224 (30 rounds) 0.786x / 0.795x -> 0.741x / 0.768x.
NARROW_INPUT_CHANNELS = 4
NARROW_INPUT_MIN_OUTPUTS = 16


def narrow_input_padded_channels(group: int, weight_shape) -> tuple[int, int] | None:
    """(input channels, output channels) a dense 2-D 3x3 conv over fewer than NARROW_INPUT_CHANNELS
    input channels is computed on: the input padded to NARROW_INPUT_CHANNELS (channels of its zero
    point; the weights get channels that multiply nothing), the outputs to NARROW_INPUT_MIN_OUTPUTS
    when fewer (zero weights, sliced off after the conv); every output code is unchanged. None for
    other convs."""
    if group != 1 or len(weight_shape) != 4 or tuple(weight_shape[2:]) != (3, 3):
        return None
    if weight_shape[1] >= NARROW_INPUT_CHANNELS:
        return None
    return NARROW_INPUT_CHANNELS, max(int(weight_shape[0]), NARROW_INPUT_MIN_OUTPUTS)


def _zero_point_channels(model: QModel, x: QInput, zero_point: gs.Tensor, rank: int, extra: int, tensor: str,
                         pads: str, node: str) -> gs.Tensor:
    """The conv input ``x`` (of `rank`, the weight's) with ``extra`` channels of its zero point after
    its own (axis 1): a Pad node."""
    widths = np.zeros(2 * rank, np.int64)
    widths[rank + 1] = extra
    padded = var(model, tensor, x.quantizer.dtype)
    model.add_node("Pad", [x.tensor, const(model, pads, widths), zero_point], [padded], node)
    return padded


def _pad_channels(values, extra: int, fill) -> np.ndarray:
    """A per-channel vector with `extra` channels of `fill` after it; a per-tensor scalar as it is."""
    values = np.asarray(values)
    return values if values.ndim == 0 else np.concatenate([values, np.full(extra, fill, values.dtype)])


def lower_gemm(model: QModel, site: Site) -> None:
    node = site.node
    check_gemm_form(node)
    x, w = kernel_inputs(site)
    if site.float_output:
        return lower_to_float(model, site, x, w)
    w_mk = gemm_weight_mk(node, w.const)
    channels = w_mk.shape[0]
    bias = int32_bias(site, 2, x, w, channels) if node.op == "Gemm" else None
    name = node.name

    def build(out):
        axes = const(model, f"{name}_axes", np.array([2, 3], np.int64))
        x4 = var(model, f"{name}_x4d", x.quantizer.dtype)
        model.add_node("Unsqueeze", [x.tensor, axes], [x4], f"{name}_to4d")
        xs, xz = quantizer_constants(model, x.quantizer, f"{name}_x")
        w4 = const(model, f"{name}_w_1x1", np.ascontiguousarray(w_mk)[:, :, None, None])
        ws = const(model, f"{name}_w_scale", w.quantizer.scale)
        wz = const(model, f"{name}_w_zero_point", weight_zero_points(w, channels))
        ys, yz = quantizer_constants(model, site.out_q, f"{name}_y")
        inputs = [x4, xs, xz, w4, ws, wz, ys, yz]
        if bias is not None:
            inputs.append(const(model, f"{name}_bias_int32", bias))
        y4 = var(model, f"{name}_y4d", site.out_q.dtype)
        model.add_node("QLinearConv", inputs, [y4], name)
        model.add_node("Flatten", [y4], [out], f"{name}_to2d", {"axis": 1})

    finish_site(model, site, build)


def lower_matmul(model: QModel, site: Site) -> None:
    a, b = activation(site, 0), site.qin(1)
    if b is None:
        raise Declined("missing quantizer: input 1 of MatMul is not dequantized")
    if site.float_output:
        return lower_to_float(model, site, a, b)
    rank = len(site.node.inputs[0].shape or ())
    if b.const is not None and b.const.ndim == 2 and rank == 2:
        return lower_gemm(model, site)
    if b.const is None and b.quantizer.per_channel:
        raise Declined(f"input '{b.tensor.name}' has a per-channel activation quantizer")
    check_kernel_pair(a, b)
    name = site.node.name

    def build(out):
        as_, az = quantizer_constants(model, a.quantizer, f"{name}_a")
        bs = const(model, f"{name}_b_scale", b.quantizer.scale)
        bz = const(model, f"{name}_b_zero_point", b.quantizer.zero_point)
        ys, yz = quantizer_constants(model, site.out_q, f"{name}_y")
        model.add_node("QLinearMatMul", [a.tensor, as_, az, b.tensor, bs, bz, ys, yz], [out], name)

    finish_site(model, site, build)


def _contrib(op: str, n_act: int, attr_names=()):
    """A rule for a com.microsoft QLinear op with `n_act` per-tensor activation inputs:
    inputs (x, x_scale, x_zp)* then (y_scale, y_zp)."""
    def rule(model: QModel, site: Site) -> None:
        acts = [activation(site, i) for i in range(n_act)]
        if len({a.quantizer.dtype for a in acts} | {site.out_q.dtype}) != 1:
            raise Declined(f"{op} needs one storage type for inputs and output")
        name = site.node.name
        attrs = {k: v for k, v in site.node.attrs.items() if k in attr_names}

        def build(out):
            inputs = []
            for i, a in enumerate(acts):
                inputs += [a.tensor, *quantizer_constants(model, a.quantizer, f"{name}_in{i}")]
            inputs += list(quantizer_constants(model, site.out_q, f"{name}_y"))
            if op == "QLinearGlobalAveragePool":
                attrs["channels_last"] = 0
            model.add_node(op, inputs, [out], name, attrs, domain=MS_DOMAIN)

        finish_site(model, site, build)
    return rule


def lower_concat(model: QModel, site: Site) -> None:
    acts = [activation(site, i) for i in range(len(site.inputs))]
    if len({a.quantizer.dtype for a in acts} | {site.out_q.dtype}) != 1:
        raise Declined("QLinearConcat needs one storage type for inputs and output")
    name = site.node.name

    def build(out):
        inputs = list(quantizer_constants(model, site.out_q, f"{name}_y"))
        for i, a in enumerate(acts):
            inputs += [a.tensor, *quantizer_constants(model, a.quantizer, f"{name}_in{i}")]
        model.add_node("QLinearConcat", inputs, [out], name, {"axis": site.node.attrs["axis"]}, domain=MS_DOMAIN)

    finish_site(model, site, build)


def requantize_dq_q(model: QModel, x: QInput, out_q, out, name: str) -> None:
    """Change grids the way the QDQ model does it: DequantizeLinear then QuantizeLinear."""
    f = var(model, f"{name}_float", np.float32)
    model.add_node(DEQUANTIZE, [x.tensor, *quantizer_constants(model, x.quantizer, f"{name}_in")], [f], f"{name}_dq")
    model.add_node(QUANTIZE, [f, *quantizer_constants(model, out_q, f"{name}_out")], [out], f"{name}_q")


def lower_moving(model: QModel, site: Site, requantize=requantize_dq_q) -> None:
    """A range-preserving op (idioms.RANGE_PRESERVING) or a Relu/Clip on the integer tensor;
    requantize if the output grid differs (Relu and Clip become the output clamp)."""
    node = site.node
    x = activation(site, 0)
    computed = {t.name for t, v in zip(node.inputs, site.inputs) if isinstance(v, gs.Tensor)}
    if node.op not in CLAMPS and (reason := range_preserving_reason(node, computed)) is not None:
        raise Declined(reason)
    extra = list(node.inputs[1:])
    for t, v in zip(extra, site.inputs[1:]):
        if t.name and isinstance(v, QInput):
            raise Declined(f"input '{t.name}' of {node.op} is quantized data, not a constant or shape")
    name = node.name
    same = x.quantizer.same_grid(site.out_q)
    passthrough = node.op in ("Identity", "Dropout", "Relu", "Clip")

    def build(out):
        moved = x.tensor
        if not passthrough:
            moved = out if same else var(model, f"{name}_moved", x.quantizer.dtype)
            model.add_node(node.op, [x.tensor] + extra, [moved], name, dict(node.attrs))
        if same and passthrough:
            model.add_node("Identity", [moved], [out], name)
        elif not same:
            requantize(model, QInput(moved, x.quantizer), site.out_q, out, f"{name}_requant")

    finish_site(model, site, build)


def lower_pad(model: QModel, site: Site, requantize=requantize_dq_q) -> None:
    """Pad on the codes: 'edge' and 'reflect' copy codes; 'constant' pads with its value's code on
    the input's grid, which is the QDQ model's padded code when the output has that grid (0 is
    the zero point on any grid). Requantized when the output's grid differs, as a moving op,
    provided the value's code survives that (``Q_y(DQ_x(Q_x(v))) = Q_y(v)``)."""
    node = site.node
    x = activation(site, 0)
    mode = node.attrs.get("mode", "constant")
    extra = list(node.inputs[1:])
    for k, t in enumerate(extra, start=1):
        if t.name and QModel.constant_value(t) is None:
            raise Declined(f"input {k} '{t.name}' of Pad is computed at run time")
    q = x.quantizer
    if mode == "constant":
        value = extra[1] if len(extra) > 1 and extra[1].name else None
        real = np.float32(0 if value is None else np.asarray(QModel.constant_value(value)).reshape(()))
        code = quant.quantize(real, q.scale, q.zero_point, q.qmin, q.qmax, dtype=q.dtype)
        out = site.out_q
        if not q.same_grid(out) and (
                quant.quantize(quant.dequantize(code, q.scale, q.zero_point), out.scale, out.zero_point, out.qmin,
                               out.qmax) != quant.quantize(real, out.scale, out.zero_point, out.qmin, out.qmax)):
            raise Declined(f"Pad value {float(real):g} is not on its input's grid (scale {float(q.scale):g}), "
                           "and the output's grid differs")
        fill = const(model, f"{node.name}_pad_code", np.asarray(code, q.dtype).reshape(()))
        extra = [extra[0], fill, *extra[2:]]
    same = q.same_grid(site.out_q)

    def build(out):
        padded = out if same else var(model, f"{node.name}_moved", q.dtype)
        model.add_node("Pad", [x.tensor] + extra, [padded], node.name, {"mode": mode})
        if not same:
            requantize(model, QInput(padded, q), site.out_q, out, f"{node.name}_requant")

    finish_site(model, site, build)


def prelu_slopes(site: Site, x: QInput) -> np.ndarray:
    """A per-channel PRelu's slopes as (C,) float32 for x's axis 1 (a slope broadcast over
    anything but the channel axis is declined)."""
    slope = QModel.constant_value(site.node.inputs[1])
    shape = x.tensor.shape
    if slope is None or shape is None or len(shape) < 2:
        raise Declined("PRelu needs a constant slope and an input of known rank")
    slope = np.asarray(slope, np.float32)
    rank = len(shape)
    full = (1,) * (rank - slope.ndim) + slope.shape
    if any(d != 1 for i, d in enumerate(full) if i != 1) or not isinstance(shape[1], (int, np.integer)):
        raise Declined(f"PRelu slope of shape {list(slope.shape)} is not one value per channel of a static axis 1")
    return np.broadcast_to(slope.reshape(-1), (int(shape[1]),)).astype(np.float32)


def lower_prelu(model: QModel, site: Site) -> str:
    """A PRelu with one slope per channel as ``DequantizeLinear → PRelu → QuantizeLinear``: the
    QDQ model's own computation, so its codes exactly (reported as a float activation); a shared
    slope is a unary region and takes the table rules."""
    x = activation(site, 0)
    slopes = prelu_slopes(site, x)
    node = site.node
    rank = len(x.tensor.shape)
    slope = const(model, f"{node.name}_slope", slopes.reshape((-1,) + (1,) * (rank - 2)))
    form = (("PRelu", ("x", "slope"), {}, "y"),)
    finish_site(model, site, lambda out: emit_float_activation(model, x, site.out_q, out, node.name, form,
                                                               constants={"slope": slope}))
    return float_activation_label("prelu")


def lower_unary_table(model: QModel, site: Site, channels_last: bool = False, float_ops=()) -> str | None:
    """A one-input elementwise op as a lookup table (qgraph.lowering.tables; `channels_last`
    as there, for 4-D maps); an op of `float_ops` as itself between DequantizeLinear and
    QuantizeLinear where that writes the table's codes (emit_float_activation), returning the
    report's label (None for a table)."""
    x = activation(site, 0)
    if len(site.node.inputs) != 1:
        raise Declined(f"{site.node.op} with more than one input is not lowered")
    node = site.node
    table = function_table(model, [node], node.inputs[0].name, node.outputs[0].name, x.quantizer, site.out_q)
    form = ((node.op, ("x",), dict(node.attrs), "y"),)
    if node.op in float_ops and float_activation_exact(x.quantizer, site.out_q, form, table):
        label = float_activation_label(node.op.lower())
        finish_site(model, site, lambda out: emit_float_activation(model, x, site.out_q, out, node.name, form))
        return label
    finish_site(model, site, lambda out: emit_table(model, x, table, out, node.name,
                                                    channels_last and is_map(node.inputs[0])))
    return None


def lower_unary(model: QModel, site: Site) -> str | None:
    """The qlinear rule of a one-input elementwise op: lower_unary_table on NHWC maps, with the
    float form for FLOAT_ACTIVATION_OPS."""
    return lower_unary_table(model, site, TABLES_CHANNELS_LAST, FLOAT_ACTIVATION_OPS)


#: sigmoid grids tried by sigmoid_mul_grids: scales around 1/255, the zero point at the bottom
SIGMOID_SCALES = np.linspace(1 / 262, 1 / 190, 400).astype(np.float32)


def sigmoid_mul_grids(in_q, out_q, table: np.ndarray) -> tuple[np.float32, np.float32] | None:
    """(s, m): grids under which ``QLinearMul(x, QLinearSigmoid(x) on the grid (s, qmin))`` with
    ``m`` as QLinearMul's second scale gives `table`'s code for every input code, in ORT itself;
    None when none of SIGMOID_SCALES does.

    SiLU's table ``Q_out(x·σ(x))`` and ORT's pair differ by the pair's rounding of σ to 8 bits; on
    coarse grids (a network's first layers) that rounding can be absorbed. For each sigmoid grid the
    products p = (x − z_x)(σ_q − qmin) are integers and each code bounds the multiplier
    (``round(p·m') = table − z_out``): the bounds' intersection, when not empty, holds m'."""
    from qgraph.interp.mlas import logistic
    qmin, qmax = in_q.qmin, in_q.qmax
    codes = quant.all_codes(in_q.dtype).astype(np.int64)
    want = np.asarray(table).astype(np.int64)
    zc = int(out_q.zero_point)
    sigma_codes = quant.quantize(logistic(in_q.dequantize(codes))[None, :], SIGMOID_SCALES[:, None], qmin, qmin, qmax)
    p = ((codes - int(in_q.zero_point)) * (sigma_codes.astype(np.int64) - qmin)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):      # p = 0 rows: no bound, checked below
        low = np.where(want == qmin, -np.inf, want - zc - 0.5) / p
        high = np.where(want == qmax, np.inf, want - zc + 0.5) / p
    lo = np.where(p > 0, low, np.where(p < 0, high, -np.inf)).max(axis=1)
    hi = np.where(p > 0, high, np.where(p < 0, low, np.inf)).min(axis=1)
    fixed = np.all((p != 0) | (want == zc), axis=1)              # a zero product writes z_out
    for k in np.flatnonzero(fixed & (0 < lo) & (lo < hi))[:8]:
        m = np.float32((lo[k] + hi[k]) / 2 * float(out_q.scale) / float(in_q.scale))
        got = _sigmoid_mul_codes(in_q, out_q, SIGMOID_SCALES[k], m)
        if got is not None and np.array_equal(got, np.asarray(table)):
            return SIGMOID_SCALES[k], m
    return None


def _sigmoid_mul_codes(in_q, out_q, sigmoid_scale, mul_scale) -> np.ndarray | None:
    """What ORT's QLinearSigmoid → QLinearMul writes for every input code (None if ORT refuses)."""
    from onnx import TensorProto, helper, numpy_helper
    from qgraph.runner import run_model
    onnx_type = TensorProto.UINT8 if in_q.dtype == np.uint8 else TensorProto.INT8
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in (
        ("xs", in_q.scale), ("xz", in_q.zero_point), ("ss", np.float32(sigmoid_scale)),
        ("sz", np.array(in_q.qmin, in_q.dtype)), ("ms", np.float32(mul_scale)), ("ys", out_q.scale),
        ("yz", out_q.zero_point))]
    nodes = [helper.make_node("QLinearSigmoid", ["x", "xs", "xz", "ss", "sz"], ["s"], domain=MS_DOMAIN),
             helper.make_node("QLinearMul", ["x", "xs", "xz", "s", "ms", "sz", "ys", "yz"], ["y"], domain=MS_DOMAIN)]
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", onnx_type, [256])],
                              [helper.make_tensor_value_info("y", onnx_type, [256])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    proto.ir_version = 8
    try:
        return run_model(proto, {"x": quant.all_codes(in_q.dtype)})["y"]
    except Exception:  # noqa: BLE001 - a refused form is just not used
        return None


def emit_region(model: QModel, x: QInput, table: np.ndarray, out_q, out: gs.Tensor, name: str, kind: str) -> str | None:
    """A SiLU as ORT's QLinearSigmoid → QLinearMul where sigmoid_mul_grids finds grids under which
    that pair writes the table's code for every input code (MLAS's byte lookup and a vectorized
    multiply: 0.42 ns per element against the table's 0.7-0.85); a HardSwish as its float op
    (emit_float_activation); None otherwise (a table)."""
    form = FLOAT_ACTIVATIONS.get(kind)
    if form is not None:
        if not float_activation_exact(x.quantizer, out_q, form, table):
            return None
        emit_float_activation(model, x, out_q, out, name, form)
        return float_activation_label(kind)
    if kind != "silu" or x.quantizer.dtype != out_q.dtype:
        return None
    grids = sigmoid_mul_grids(x.quantizer, out_q, table)
    if grids is None:
        return None
    sigmoid_scale, mul_scale = grids
    xs, xz = quantizer_constants(model, x.quantizer, f"{name}_x")
    ss = const(model, f"{name}_sigmoid_scale", sigmoid_scale)
    sz = const(model, f"{name}_sigmoid_zero_point", np.array(x.quantizer.qmin, x.quantizer.dtype))
    sigma = var(model, f"{name}_sigmoid", x.quantizer.dtype)
    model.add_node("QLinearSigmoid", [x.tensor, xs, xz, ss, sz], [sigma], f"{name}_sigmoid", domain=MS_DOMAIN)
    ys, yz = quantizer_constants(model, out_q, f"{name}_y")
    model.add_node("QLinearMul", [x.tensor, xs, xz, sigma, const(model, f"{name}_mul_scale", mul_scale), sz, ys, yz],
                   [out], name, domain=MS_DOMAIN)
    return "QLinearSigmoid + QLinearMul"


#: Activations (unary_regions kinds, or the op's name in lower case) that ORT runs faster as float
#: ops between DequantizeLinear and QuantizeLinear than as a table (the module docstring's
#: measurements): kind -> its float ops as (op, inputs, attributes, output), from tensor "x" to "y".
#: One HardSwish op, not its function body written out: ORT inlines the op as HardSigmoid and Mul
#: after its QDQ passes, while a DequantizeLinear read by the two ops of the body is duplicated
#: (one more pass over the map: DQ → HardSwish → Q 80 us, DQ → HardSigmoid, Mul → Q 97 us on
#: 8×8×24×96, one thread).
FLOAT_ACTIVATIONS = {
    "hardswish": (("HardSwish", ("x",), {}, "y"),),
}
#: ops lowered as themselves between DequantizeLinear and QuantizeLinear where that is exact
#: (lower_unary): HardSwish for its speed on maps, HardSigmoid (an SE block's gate on a few
#: channels) for its node count: three nodes where a table takes four to six.
FLOAT_ACTIVATION_OPS = ("HardSwish", "HardSigmoid")
#: readers of a float activation's codes (through moves) that ORT runs in NHWC only when the
#: activation keeps its Transposes (emit_float_activation)
NHWC_READERS = ("MaxPool",)


def float_activation_exact(in_q, out_q, form: tuple, table: np.ndarray) -> bool:
    """Whether ``Q_out(f(DQ_in(q)))``, f the float ops `form` ((op, inputs, attributes, output) from
    "x" to "y", as in FLOAT_ACTIVATIONS), writes `table`'s code for every input code q, in ORT and
    in the reference interpreter alike. Each code is run at several offsets (vector bodies and
    scalar tails of ORT's kernels). The check holds for the ORT build that lowers; a table's codes
    hold on any build, while a build that fused a HardSigmoid's multiply-add (another architecture)
    could round a code differently — `qgraph diff` on the deployment host checks it."""
    from onnx import TensorProto, helper, numpy_helper
    from qgraph.interp import run as interp_run
    from qgraph.runner import run_model
    onnx_types = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}
    if np.dtype(in_q.dtype) not in onnx_types or np.dtype(out_q.dtype) not in onnx_types:
        return False
    codes = quant.all_codes(in_q.dtype)
    x = np.concatenate([codes, codes[::-1], codes[5:], codes[:11]])
    want = np.asarray(table)[x.astype(np.int64) - int(in_q.qmin)]
    nodes = [helper.make_node("DequantizeLinear", ["q", "xs", "xz"], ["x"])]
    nodes += [helper.make_node(op, list(inputs), [output], **attrs) for op, inputs, attrs, output in form]
    nodes.append(helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["out"]))
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in (
        ("xs", np.float32(in_q.scale)), ("xz", np.asarray(in_q.zero_point, in_q.dtype)),
        ("ys", np.float32(out_q.scale)), ("yz", np.asarray(out_q.zero_point, out_q.dtype)))]
    graph = helper.make_graph(
        nodes, "activation", [helper.make_tensor_value_info("q", onnx_types[np.dtype(in_q.dtype)], [x.size])],
        [helper.make_tensor_value_info("out", onnx_types[np.dtype(out_q.dtype)], [x.size])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 8
    try:
        by_ort = run_model(proto, {"q": x})["out"]
        by_interp = interp_run(proto, {"q": x})["out"]
    except Exception:  # noqa: BLE001 - a form ORT or the interpreter refuses is just not used
        return False
    return np.array_equal(by_ort, want) and np.array_equal(by_interp, want)


def float_activation_label(kind: str) -> str:
    """The lowering report's label of a float activation."""
    return f"float {kind} between DequantizeLinear and QuantizeLinear"


def emit_float_activation(model: QModel, x: QInput, out_q, out: gs.Tensor, name: str, form: tuple,
                          constants: dict | None = None) -> None:
    """``out = Q_out(f(DQ_in(x)))`` with f the float ops `form` (see float_activation_exact, which
    the caller has checked: the table's codes, so nothing changes but the speed).

    Layout: ORT cancels Transposes through these elementwise ops, so a plain DQ → f → Q runs in
    whatever layout its neighbours have. One exception, measured: when the codes go on to a
    MaxPool (NHWC_READERS), ORT's transpose optimizer leaves that MaxPool in NCHW (PaddleOCR's
    direction classifier: its 2×2 uint8 MaxPool 1.2 ms against 0.08 ms as NhwcMaxPool, at batch 8);
    there the activation is written as the table is (tables.emit_table: NHWC Transposes with a
    Flatten and a Reshape inside, which ORT's first pass cannot see through), so the Transpose
    before the MaxPool is still there when ORT moves QLinearConv and MaxPool into NHWC."""
    xs, xz = quantizer_constants(model, x.quantizer, f"{name}_x")
    ys, yz = quantizer_constants(model, out_q, f"{name}_y")

    def activation_of(codes: gs.Tensor, result: gs.Tensor) -> gs.Tensor:
        tensors = {"x": var(model, f"{name}_dequantized", np.float32), **(constants or {})}
        model.add_node(DEQUANTIZE, [codes, xs, xz], [tensors["x"]], f"{name}_dequantize")
        for op, inputs, attrs, output in form:
            tensors[output] = var(model, f"{name}_{output}", np.float32)
            model.add_node(op, [tensors[t] for t in inputs], [tensors[output]], f"{name}_{output}", dict(attrs))
        model.add_node(QUANTIZE, [tensors["y"], ys, yz], [result], f"{name}_quantize")
        return result

    if is_map(x.tensor) and _read_by(model, out, NHWC_READERS):
        emit_on_code_row(model, x, out, out_q.dtype, name, True,
                         lambda codes: activation_of(codes, var(model, f"{name}_row", out_q.dtype)))
    else:
        activation_of(x.tensor, out)


def _read_by(model: QModel, tensor: gs.Tensor, ops: tuple[str, ...], depth: int = 4) -> bool:
    """Whether an op of `ops` reads `tensor`'s codes, directly or through code moves and
    Dequantize/QuantizeLinear (a QDQ form not lowered yet), within `depth` steps."""
    frontier = [tensor]
    for _ in range(depth):
        readers = [r for t in frontier for r in t.outputs]
        if any(r.op in ops for r in readers):
            return True
        frontier = [o for r in readers if r.op in CODE_MOVES + (DEQUANTIZE, QUANTIZE) for o in r.outputs]
    return False


#: Tables on 4-D maps run in NHWC (tables.emit_table): ORT runs QLinearConv in NHWC.
TABLES_CHANNELS_LAST = True

# nearest Resize modes that make an integer upscale a plain repetition of every pixel
_REPEATING_RESIZE = {("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"),
                     ("pytorch_half_pixel", "round_prefer_floor")}


def upscale_factors(node) -> tuple[int, int] | None:
    """(s_h, s_w) when `node` is a nearest Resize of a 4-D tensor by constant scales [1, 1, s_h, s_w],
    positive integers, in a mode where it repeats every pixel s_h × s_w times; else None."""
    attrs = node.attrs
    modes = (attrs.get("coordinate_transformation_mode", "half_pixel"), attrs.get("nearest_mode", "round_prefer_floor"))
    if node.op != "Resize" or attrs.get("mode", "nearest") != "nearest" or modes not in _REPEATING_RESIZE:
        return None
    if len(node.inputs) != 3 or not node.inputs[2].name:
        return None                               # sizes instead of scales
    scales = QModel.constant_value(node.inputs[2])
    if scales is None or scales.shape != (4,) or list(scales[:2]) != [1, 1]:
        return None
    if any(s != int(s) or s < 1 for s in scales[2:]):
        return None
    return int(scales[2]), int(scales[3])


def upsample_channels_last(model: QModel) -> int:
    """Nearest integer upscaling of 8-bit codes as a repetition in NHWC; returns the count.

    ``y[n, h·s_h + i, w·s_w + j, c] = x[n, h, w, c]`` is Unsqueeze to (N, H, 1, W, 1, C), Expand
    to (N, H, s_h, W, s_w, C) and Reshape: the same bytes, moved in runs of C. ORT's transpose
    optimizer otherwise moves an 8-bit Resize into NHWC next to its QLinearConv, where ORT 1.19
    resizes one element at a time (8×96×80×80 uint8, 2x, one thread: 47 ms in NHWC, 8 ms as
    Expand; DB text detector: 16 of 105 ms). The Transposes around it cancel against ORT's."""
    count = 0
    for node in list(model.graph.nodes):
        x = node.inputs[0] if node.inputs else None
        factors = upscale_factors(node) if node.op == "Resize" else None
        if factors is None or x.dtype not in (np.uint8, np.int8) or not node.outputs:
            continue
        name, out = node.name, node.outputs[0]
        node.outputs.clear()
        nhwc = var(model, f"{name}_nhwc", x.dtype)
        model.add_node("Transpose", [x], [nhwc], f"{name}_to_nhwc", {"perm": [0, 2, 3, 1]})
        spaced = var(model, f"{name}_spaced", x.dtype)
        model.add_node("Unsqueeze", [nhwc, const(model, f"{name}_axes", np.array([2, 4], np.int64))], [spaced],
                       f"{name}_spaced")
        repeated = var(model, f"{name}_repeated", x.dtype)
        model.add_node("Expand", [spaced, const(model, f"{name}_repeats", np.array([1, 1, factors[0], 1, factors[1], 1],
                                                                                   np.int64))],
                       [repeated], f"{name}_repeat")
        shape = var(model, f"{name}_in_shape", np.int64)
        model.add_node("Shape", [nhwc], [shape], f"{name}_in_shape")
        target = var(model, f"{name}_out_shape", np.int64)
        model.add_node("Mul", [shape, const(model, f"{name}_factors", np.array([1, *factors, 1], np.int64))], [target],
                       f"{name}_out_shape")
        merged = var(model, f"{name}_merged", x.dtype)
        model.add_node("Reshape", [repeated, target], [merged], f"{name}_merge")
        model.add_node("Transpose", [merged], [out], f"{name}_to_nchw", {"perm": [0, 3, 1, 2]})
        count += 1
    return count


def fold_concat_requantization(model: QModel) -> int:
    """A QLinearConcat input on another grid than the output, written by a table read by nothing
    else, gets the table ``R∘T`` (R: the input's DequantizeLinear then the output's QuantizeLinear,
    what the QDQ model does and what ORT's QLinearConcat tabulates) and the output's grid: ORT
    then copies it instead of a lookup per element (two 52×52×96 uint8 inputs: 22 µs against
    110). The concatenation's codes are unchanged; the rewritten tensors get new names, their
    codes being on the concatenation's grid. Returns the inputs folded."""
    folded = 0
    for concat in [n for n in model.graph.nodes if n.op == "QLinearConcat"]:
        out_scale, out_zp = (QModel.constant_value(t) for t in concat.inputs[:2])
        if out_scale is None or out_zp is None:
            continue
        for i in range(2, len(concat.inputs), 3):
            x, scale, zp = concat.inputs[i:i + 3]
            in_scale, in_zp = QModel.constant_value(scale), QModel.constant_value(zp)
            if in_scale is None or in_zp is None or (np.float32(in_scale) == np.float32(out_scale)
                                                     and int(in_zp) == int(out_zp)):
                continue
            found = table_behind(model, x)
            if found is None:
                continue
            table, chain = found
            dtype = np.asarray(out_zp).dtype
            qmin, qmax = quant.storage_range(dtype)
            codes = np.asarray(table.values)
            table.values = quant.quantize(quant.dequantize(codes, in_scale, in_zp), out_scale, out_zp,
                                          qmin, qmax, dtype=dtype).reshape(codes.shape)
            concat.inputs[i + 1], concat.inputs[i + 2] = concat.inputs[0], concat.inputs[1]
            for t in chain:
                t.name = model.fresh_tensor_name(f"{t.name}_on_{concat.name}_grid")
            folded += 1
    return folded


RULES = {
    "Conv": lower_conv,
    "Gemm": lower_gemm,
    "MatMul": lower_matmul,
    "Add": _contrib("QLinearAdd", 2),
    "Mul": _contrib("QLinearMul", 2),
    "GlobalAveragePool": _contrib("QLinearGlobalAveragePool", 1),
    "AveragePool": _contrib("QLinearAveragePool", 1, ("auto_pad", "ceil_mode", "count_include_pad",
                                                      "kernel_shape", "pads", "strides")),
    "Sigmoid": _contrib("QLinearSigmoid", 1),
    "LeakyRelu": _contrib("QLinearLeakyRelu", 1, ("alpha",)),
    "Concat": lower_concat,
    "Pad": lower_pad,
    "PRelu": lower_prelu,
    **{op: lower_moving for op in MOVING_OPS},
    **{op: lower_unary for op in UNARY_TABLE_OPS if op not in ("Sigmoid", "LeakyRelu")},
}
