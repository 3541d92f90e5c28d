"""Exporter-style builders: graphs written the way Paddle2ONNX and torch.onnx write them.

`qgraph.models.builders` writes tidy graphs (one op per layer, BN nodes, initializers for
every constant). Real exports are not tidy, and qgraph must handle what they write, so these
builders reproduce the exporters' idioms on purpose:

- `pplcnet_paddle` (Paddle2ONNX, `p2o.<Op>.<n>` node names, `conv2d_3.w_0` weights): PP-LCNet
  depthwise-separable blocks, HardSwish decomposed as `x * Clip(x + 3, 0, 6) / 6`, SE blocks
  (GlobalAveragePool, 1x1 convs with bias, Relu, HardSigmoid), some convs followed by a
  per-channel affine `Mul(c) -> Add(c)` instead of BatchNormalization (inference models with
  BN folded to scale/bias), and a `MatMul + Add` linear head with Softmax. The text-direction
  classifier variant is `pplcnet_paddle(input_shape=(3, 48, 192), num_classes=2)`.
- `vit_encoder` (torch.onnx, `/blocks.0/attn/MatMul` names, `onnx::MatMul_1012` weights,
  scalars as Constant nodes): patch Conv, dynamic-batch reshapes computed with
  Shape/Gather/Unsqueeze/Concat, the class token broadcast with torch's Expand/Where/Equal
  idiom, LayerNorm decomposed as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add, MatMul
  attention with Softmax, GELU in its erf form, residual Adds.
- `db_detector` (Paddle2ONNX): a PP-LCNet-ish backbone whose SE gate is a decomposed hard
  sigmoid `Clip(x * 0.2 + 0.5, 0, 1)`, the DB FPN (1x1 laterals, nearest Resize x2 + Add,
  3x3 smoothing, Resize to 1/4, Concat) and the DB head (Conv + BN + Relu, ConvTranspose +
  BN + Relu, ConvTranspose, Sigmoid): a probability map at input resolution.
- `svtr_recognizer` (Paddle2ONNX): an LCNet backbone that pools the height away, then
  SVTR-style global-mixing blocks on the width sequence (MatMul attention, decomposed
  LayerNorm, decomposed HardSwish MLP) and a CTC head (MatMul + Add + Softmax).

Weights are deterministic from `seed` (and the probe). Plain He-normal convs under BatchNorm
are chaotic at initialization (Yang et al. 2019): an input perturbation at -50 dB came out of
the recognizer at -12 dB, where the trained wheel models keep it near -45 dB, so quantization
noise would be measured through an amplifier. Trained weights are far from isotropic, so each
conv here is a channel copy (identity at the kernel centre, out channel j <- in channel j mod
C_in) plus He-normal noise at `RANDOM_PART`, and depthwise kernels add a Gaussian low-pass.
Every BatchNormalization (or folded affine) gets the statistics it would have after training,
measured in one ONNX Runtime run on a probe batch (seeded image-like noise, or real inputs
passed as `probe`: the zoo passes 32 real pictures), with gamma ~ U(BN_GAMMA) and beta ~
N(0, 0.25); heads are shifted and scaled on the same probe (`_set_head_scale`). The
transformer LayerNorms carry a few outlier channels (gamma 8), as trained transformers do
(Bondarenko et al. 2021).

Known limit: without training, stacked HardSwish compounds kurtosis (channel kurtosis about 30
deep in PP-LCNet against about 5 in the trained YOLOv8n, activation absmax/std about 25), so
8-bit PTQ loses much more here than on trained nets. Use these models for the exporters'
graph idioms and for tool-against-tool comparisons, not for absolute accuracy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
BN_EPSILON = 1e-5
LN_EPSILON = 1e-6
BN_GAMMA = (0.5, 1.5)
# Share of a conv weight that is He-normal noise; the rest copies channels (see the module docstring).
RANDOM_PART = np.float32(0.5)
# Spread of a trained classifier's logits over classes (ImageNet nets: about 2-4).
LOGIT_STD = 3.0
# Share of a DB probability map that is text on the probe (a page of text: 10-20%).
DB_FOREGROUND = 0.15
# Share of a CTC recognizer's frames that decode as blank on the probe.
CTC_BLANK_SHARE = 0.6
EXPORTED = ("pplcnet_paddle", "vit_encoder", "db_detector", "svtr_recognizer")

# PP-LCNet's stages (PaddleClas NET_CONFIG): kernel, in, out, stride, SE. Strides may be
# (h, w) pairs: the recognizer keeps the width for the CTC sequence.
PPLCNET_STAGES = {
    "blocks2": [(3, 16, 32, 1, False)],
    "blocks3": [(3, 32, 64, 2, False), (3, 64, 64, 1, False)],
    "blocks4": [(3, 64, 128, 2, False), (3, 128, 128, 1, False)],
    "blocks5": [(3, 128, 256, 2, False)] + [(5, 256, 256, 1, False)] * 5,
    "blocks6": [(5, 256, 512, 2, True), (5, 512, 512, 1, True)],
}


def _smoothing_kernel(kernel: int) -> np.ndarray:
    """A normalized Gaussian of sigma kernel / 4: the low-pass shape trained depthwise kernels often have."""
    offsets = np.arange(kernel) - kernel // 2
    bump = np.exp(-offsets ** 2 / (2 * (kernel / 4) ** 2))
    return (np.outer(bump, bump) / np.outer(bump, bump).sum()).astype(np.float32)


def make_divisible(value: float, divisor: int = 8) -> int:
    """PaddleClas' channel rounding: nearest multiple of `divisor`, never below 90% of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass
class _NormSite:
    """A BatchNormalization placeholder whose statistics the probe measures."""
    node: onnx.NodeProto
    channels: int
    affine_names: tuple[str, str] | None  # (Mul, Add) node names when written as Mul(c) -> Add(c)


class _Writer:
    """Collects nodes and initializers, naming them like one exporter (`paddle` or `torch`)."""

    def __init__(self, seed: int, style: str):
        self.rng = np.random.default_rng(seed)
        self.style = style
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.norm_sites: list[_NormSite] = []
        self._counts: dict[str, int] = {}
        self._names: set[str] = set()
        self._scope: list[str] = []
        self._matmul_id = 1000  # torch names transposed Linear weights onnx::MatMul_<n>

    # --- naming -------------------------------------------------------------------------
    def count(self, key: str) -> int:
        value = self._counts.get(key, 0)
        self._counts[key] = value + 1
        return value

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _node_name(self, op: str) -> str:
        if self.style == "paddle":
            return f"p2o.{op}.{self.count('node.' + op)}"
        base = "/" + "/".join([*self._scope, op])
        index = self.count("node." + base)
        return base if index == 0 else f"{base}_{index}"

    def _output_name(self, node_name: str, index: int) -> str:
        if self.style == "paddle":
            return node_name if index == 0 else f"{node_name}.{index}"
        return f"{node_name}_output_{index}"

    def param_name(self, leaf: str) -> str:
        """A torch state-dict name from the current scope (`blocks.0.attn.qkv.bias`)."""
        return ".".join([*self._scope, leaf])

    # --- graph pieces -------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], *, outputs: int = 1, out: str | None = None,
           **attrs) -> str | list[str]:
        name = self._node_name(op_type)
        names = [out] if out and outputs == 1 else [self._output_name(name, i) for i in range(outputs)]
        for tensor in names:
            if tensor in self._names:
                raise ValueError(f"exported builder bug: tensor {tensor!r} written twice")
            self._names.add(tensor)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, **attrs))
        return names[0] if outputs == 1 else names

    def init(self, name: str, value: np.ndarray, dtype=np.float32) -> str:
        if name in self._names:
            raise ValueError(f"exported builder bug: initializer {name!r} written twice")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def scalar(self, value: float) -> str:
        """A float scalar the way the exporter writes one: a Constant node (torch) or an initializer."""
        return self.constant(np.float32(value))

    def constant(self, value: np.ndarray) -> str:
        value = np.asarray(value)
        if self.style == "torch":
            return self.op("Constant", [], value=numpy_helper.from_array(value))
        return self.init(f"p2o.helper.constant.{self.count('const')}", value, dtype=value.dtype)

    def he_normal(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))

    def conv_weight(self, cout: int, cin: int, kernel: int, group: int = 1) -> np.ndarray:
        """[cout, cin / group, k, k]: a channel-copy part at the kernel centre plus He-normal noise at
        `RANDOM_PART`; depthwise kernels add a smoothing part (why: the module docstring)."""
        per_group = cin // group
        weight = RANDOM_PART * self.he_normal((cout, per_group, kernel, kernel), fan_in=per_group * kernel * kernel)
        centre = kernel // 2
        source = np.arange(cout) % per_group if group == 1 else np.zeros(cout, np.int64)
        weight[np.arange(cout), source, centre, centre] += np.float32(1.0)
        if group > 1 and kernel > 1:
            weight[:, 0] += np.float32(0.5) * _smoothing_kernel(kernel)
        return weight

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


# --- Paddle-style layers ----------------------------------------------------------------------

def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def p2o_conv(w: _Writer, x: str, cin: int, cout: int, kernel: int, stride=1, group: int = 1,
             bias: bool = False) -> str:
    index = w.count("conv2d")
    weight = w.init(f"conv2d_{index}.w_0", w.conv_weight(cout, cin, kernel, group))
    inputs = [x, weight]
    if bias:
        inputs.append(w.init(f"conv2d_{index}.b_0", w.normal((cout,), 0.1)))
    pad = (kernel - 1) // 2
    return w.op("Conv", inputs, out=f"conv2d_{index}.tmp_{1 if bias else 0}", kernel_shape=[kernel, kernel],
                strides=_pair(stride), pads=[pad] * 4, group=group, dilations=[1, 1])


def p2o_norm(w: _Writer, x: str, channels: int, affine: bool = False) -> str:
    """BatchNormalization (or, with `affine`, Paddle's folded `Mul(c) -> Add(c)`) after a conv."""
    index = w.count("batch_norm")
    params = [w.init(f"batch_norm_{index}.w_0", w.rng.uniform(*BN_GAMMA, channels)),
              w.init(f"batch_norm_{index}.b_0", w.normal((channels,), 0.25)),
              w.init(f"batch_norm_{index}.w_1", np.zeros(channels)),
              w.init(f"batch_norm_{index}.w_2", np.ones(channels))]
    out = w.op("BatchNormalization", [x, *params], out=f"batch_norm_{index}.tmp_2", epsilon=BN_EPSILON,
               momentum=0.9)
    # Node names for the folded form are taken now so that the p2o.<Op>.<n> numbering has no gaps.
    names = (w._node_name("Mul"), w._node_name("Add")) if affine else None
    w.norm_sites.append(_NormSite(w.nodes[-1], channels, names))
    return out


def p2o_hardswish(w: _Writer, x: str) -> str:
    """Paddle2ONNX's HardSwish below opset 14: x * Clip(x + 3, 0, 6) / 6."""
    shifted = w.op("Add", [x, w.scalar(3.0)])
    clipped = w.op("Clip", [shifted, w.scalar(0.0), w.scalar(6.0)])
    return w.op("Div", [w.op("Mul", [x, clipped]), w.scalar(6.0)])


def p2o_hardsigmoid_decomposed(w: _Writer, x: str) -> str:
    """Paddle's hardsigmoid(slope=0.2, offset=0.5) written out: Clip(x * 0.2 + 0.5, 0, 1)."""
    scaled = w.op("Add", [w.op("Mul", [x, w.scalar(0.2)]), w.scalar(0.5)])
    return w.op("Clip", [scaled, w.scalar(0.0), w.scalar(1.0)])


def p2o_conv_bn_act(w: _Writer, x: str, cin: int, cout: int, kernel: int, stride=1, group: int = 1,
                    affine: bool = False, act: str | None = "hardswish") -> str:
    y = p2o_norm(w, p2o_conv(w, x, cin, cout, kernel, stride, group), cout, affine)
    if act == "hardswish":
        return p2o_hardswish(w, y)
    return w.op("Relu", [y]) if act == "relu" else y


def p2o_se(w: _Writer, x: str, channels: int, gate: str) -> str:
    """Squeeze-excitation: GAP -> 1x1 conv (bias) -> Relu -> 1x1 conv (bias) -> hard sigmoid -> Mul."""
    squeezed = w.op("GlobalAveragePool", [x])
    hidden = w.op("Relu", [p2o_conv(w, squeezed, channels, channels // 4, 1, bias=True)])
    logits = p2o_conv(w, hidden, channels // 4, channels, 1, bias=True)
    if gate == "op":
        scale = w.op("HardSigmoid", [logits], alpha=1.0 / 6.0, beta=0.5)
    else:
        scale = p2o_hardsigmoid_decomposed(w, logits)
    return w.op("Mul", [x, scale])


def p2o_depthwise_separable(w: _Writer, x: str, cin: int, cout: int, kernel: int, stride, use_se: bool,
                            se_gate: str, affine: bool) -> str:
    x = p2o_conv_bn_act(w, x, cin, cin, kernel, stride, group=cin, affine=affine)
    if use_se:
        x = p2o_se(w, x, cin, se_gate)
    return p2o_conv_bn_act(w, x, cin, cout, 1, affine=affine)


def pplcnet_backbone(w: _Writer, x: str, scale: float, se_gate: str = "op", strides: dict | None = None,
                     affine_every: int = 3) -> tuple[str, list[tuple[str, int]]]:
    """Stem + blocks2..blocks6; returns the last tensor and (tensor, channels) after blocks3..6.

    Every `affine_every`-th block writes its convs with a folded `Mul -> Add` affine instead of BN.
    """
    stem = make_divisible(16 * scale)
    x = p2o_conv_bn_act(w, x, 3, stem, 3, stride=2)
    taps = []
    for stage, blocks in PPLCNET_STAGES.items():
        for i, (kernel, cin, cout, stride, use_se) in enumerate(blocks):
            stride = strides.get(stage, stride) if (strides and i == 0) else stride
            affine = affine_every > 0 and w.count("block") % affine_every == affine_every - 1
            x = p2o_depthwise_separable(w, x, make_divisible(cin * scale), make_divisible(cout * scale), kernel,
                                        stride, use_se, se_gate, affine)
        if stage != "blocks2":
            taps.append((x, make_divisible(PPLCNET_STAGES[stage][-1][2] * scale)))
    return x, taps


def p2o_linear(w: _Writer, x: str, fin: int, fout: int) -> str:
    """Paddle's Linear: MatMul with an [in, out] weight, then Add of the bias."""
    index = w.count("linear")
    weight = w.init(f"linear_{index}.w_0", w.normal((fin, fout), np.sqrt(1.0 / fin)))
    bias = w.init(f"linear_{index}.b_0", w.normal((fout,), 0.05))
    return w.op("Add", [w.op("MatMul", [x, weight]), bias], out=f"linear_{index}.tmp_1")


# --- torch-style layers -----------------------------------------------------------------------

def torch_layernorm(w: _Writer, x: str, dim: int, outliers: int = 0) -> str:
    """torch.onnx's LayerNorm below opset 17: ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add."""
    mean = w.op("ReduceMean", [x], axes=[-1], keepdims=1)
    centred = w.op("Sub", [x, mean])
    var = w.op("ReduceMean", [w.op("Pow", [centred, w.scalar(2.0)])], axes=[-1], keepdims=1)
    std = w.op("Sqrt", [w.op("Add", [var, w.scalar(LN_EPSILON)])])
    normed = w.op("Div", [centred, std])
    gamma = w.rng.uniform(0.5, 1.5, dim).astype(np.float32)
    if outliers:
        gamma[w.rng.choice(dim, outliers, replace=False)] = np.float32(8.0)
    weight = w.init(w.param_name("weight"), gamma)
    bias = w.init(w.param_name("bias"), w.normal((dim,), 0.1))
    return w.op("Add", [w.op("Mul", [normed, weight]), bias])


def torch_linear(w: _Writer, x: str, fin: int, fout: int, gain: float = 1.0) -> str:
    """nn.Linear on a 3-D input: MatMul with the transposed weight (`onnx::MatMul_<n>`), Add bias."""
    w._matmul_id += 1
    weight = w.init(f"onnx::MatMul_{w._matmul_id}", w.normal((fin, fout), gain * np.sqrt(1.0 / fin)))
    bias = w.init(w.param_name("bias"), w.normal((fout,), 0.05))
    return w.op("Add", [bias, w.op("MatMul", [x, weight])])


def torch_gelu(w: _Writer, x: str) -> str:
    """GELU as torch exports it: x * (Erf(x / sqrt 2) + 1) * 0.5."""
    erf = w.op("Erf", [w.op("Div", [x, w.scalar(1.4142135381698608)])])
    return w.op("Mul", [w.op("Mul", [x, w.op("Add", [erf, w.scalar(1.0)])]), w.scalar(0.5)])


def torch_dim(w: _Writer, x: str, axis: int) -> str:
    """A dynamic size as torch computes it: Shape -> Gather(axis) -> Unsqueeze, a 1-D int64."""
    size = w.op("Gather", [w.op("Shape", [x]), w.constant(np.int64(axis))], axis=0)
    return w.op("Unsqueeze", [size, w.constant(np.array([0], np.int64))])


def torch_attention(w: _Writer, x: str, dim: int, heads: int) -> str:
    """timm Attention: qkv MatMul, Reshape/Transpose/Gather into q, k, v, softmax(q k^T * s) v, proj."""
    head_dim = dim // heads
    batch, tokens = torch_dim(w, x, 0), torch_dim(w, x, 1)
    with w.scope("qkv"):
        qkv = torch_linear(w, x, dim, 3 * dim, gain=1.5)  # peaked attention, as trained nets have
    shape = w.op("Concat", [batch, tokens, w.constant(np.array([3, heads, head_dim], np.int64))], axis=0)
    qkv = w.op("Transpose", [w.op("Reshape", [qkv, shape])], perm=[2, 0, 3, 1, 4])
    q, k, v = (w.op("Gather", [qkv, w.constant(np.int64(i))], axis=0) for i in range(3))
    scores = w.op("MatMul", [q, w.op("Transpose", [k], perm=[0, 1, 3, 2])])
    probs = w.op("Softmax", [w.op("Mul", [scores, w.scalar(head_dim ** -0.5)])], axis=-1)
    mixed = w.op("Transpose", [w.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    merged = w.op("Reshape", [mixed, w.op("Concat", [batch, tokens, w.constant(np.array([dim], np.int64))],
                                          axis=0)])
    with w.scope("proj"):
        return torch_linear(w, merged, dim, dim)


def torch_block(w: _Writer, x: str, dim: int, heads: int, mlp_ratio: int, outliers: int) -> str:
    with w.scope("norm1"):
        h = torch_layernorm(w, x, dim, outliers)
    with w.scope("attn"):
        x = w.op("Add", [x, torch_attention(w, h, dim, heads)])
    with w.scope("norm2"):
        h = torch_layernorm(w, x, dim, outliers)
    with w.scope("mlp"):
        with w.scope("fc1"):
            h = torch_linear(w, h, dim, dim * mlp_ratio)
        with w.scope("act"):
            h = torch_gelu(w, h)
        with w.scope("fc2"):
            h = torch_linear(w, h, dim * mlp_ratio, dim)
    return w.op("Add", [x, h])


def torch_expand_like_batch(w: _Writer, param: str, batch: str) -> str:
    """`cls_token.expand(B, -1, -1)`: torch writes the -1s away with ConstantOfShape/Mul/Equal/Where."""
    sizes = w.op("Concat", [batch, w.constant(np.array([-1, -1], np.int64))], axis=0)
    ones = w.op("ConstantOfShape", [w.constant(np.array([3], np.int64))],
                value=numpy_helper.from_array(np.array([1], np.int64)))
    minus_ones = w.op("Mul", [ones, w.constant(np.int64(-1))])
    keep = w.op("Where", [w.op("Equal", [sizes, minus_ones]), ones, sizes])
    return w.op("Expand", [param, keep])


# --- models -----------------------------------------------------------------------------------

def _model(w: _Writer, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str,
           producer: tuple[str, str]) -> onnx.ModelProto:
    graph = helper.make_graph(w.nodes, name, inputs, outputs, initializer=w.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name=producer[0], producer_version=producer[1])
    model.doc_string = f"qgraph.models.exported {name} (exporter-style, untrained)"
    return model


def _image_input(name: str, input_shape: Sequence[int], batch="N") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *input_shape])


def pplcnet_paddle(input_shape: Sequence[int] = (3, 224, 224), num_classes: int = 1000, scale: float = 0.5,
                   seed: int = 0, probe: np.ndarray | None = None) -> onnx.ModelProto:
    """PP-LCNet classifier as Paddle2ONNX writes a PaddleClas inference model (softmax output).
    `probe`: inputs the statistics are measured on (default: `probe_batch`)."""
    w = _Writer(seed, "paddle")
    x, _ = pplcnet_backbone(w, "x", scale, se_gate="op")
    x = w.op("GlobalAveragePool", [x])
    channels = make_divisible(512 * scale)
    x = p2o_hardswish(w, p2o_conv(w, x, channels, 1280, 1, bias=True))
    x = w.op("Flatten", [x], axis=1)
    logits = p2o_linear(w, x, 1280, num_classes)
    w.op("Softmax", [logits], out="softmax_0.tmp_0", axis=-1)
    model = _model(w, [_image_input("x", input_shape, "p2o.DynamicDimension.0")],
                   [helper.make_tensor_value_info("softmax_0.tmp_0", TensorProto.FLOAT,
                                                  ["p2o.DynamicDimension.0", num_classes])],
                   "pplcnet_paddle", ("PaddlePaddle", "2.6.0"))
    probe = _probe(probe, input_shape, seed)
    return _set_head_scale(_fill_norm_statistics(w, model, probe), logits, probe)


def db_detector(input_shape: Sequence[int] = (3, 320, 320), scale: float = 0.5, fpn_channels: int = 96,
                seed: int = 0, probe: np.ndarray | None = None) -> onnx.ModelProto:
    """PaddleOCR DB text detector: LCNet backbone, DBFPN, DBHead; output a [N, 1, H, W] probability map
    that marks about `DB_FOREGROUND` of the probe's pixels as text (> 0.5 after the sigmoid)."""
    if input_shape[1] % 32 or input_shape[2] % 32:
        raise ValueError(f"db_detector: input height and width {tuple(input_shape[1:])} must be multiples of 32")
    w = _Writer(seed, "paddle")
    _, taps = pplcnet_backbone(w, "x", scale, se_gate="decomposed")
    fused = _db_fpn(w, taps, fpn_channels)
    prob = _db_head(w, fused, fpn_channels)
    batch = "p2o.DynamicDimension.0"
    model = _model(w, [_image_input("x", input_shape, batch)],
                   [helper.make_tensor_value_info(prob, TensorProto.FLOAT, [batch, 1, *input_shape[1:]])],
                   "db_detector", ("PaddlePaddle", "2.6.0"))
    probe = _probe(probe, input_shape, seed)
    logits = next(node.input[0] for node in model.graph.node if node.output[0] == prob)
    return _set_head_scale(_fill_norm_statistics(w, model, probe), logits, probe, centre="quantile")


def _resize(w: _Writer, x: str, factor: int) -> str:
    """F.upsample(scale_factor, mode="nearest") as Paddle2ONNX writes it: Resize with an empty roi."""
    scales = w.constant(np.array([1, 1, factor, factor], np.float32))
    return w.op("Resize", [x, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
                nearest_mode="floor")


def _db_fpn(w: _Writer, taps: list[tuple[str, int]], channels: int) -> str:
    laterals = [p2o_conv(w, x, cin, channels, 1) for x, cin in taps]  # strides 4, 8, 16, 32
    merged = [laterals[-1]]
    for lateral in reversed(laterals[:-1]):
        merged.insert(0, w.op("Add", [lateral, _resize(w, merged[0], 2)]))
    smoothed = [p2o_conv(w, x, channels, channels // 4, 3) for x in merged]
    upsampled = [_resize(w, x, 2 ** i) if i else x for i, x in enumerate(smoothed)]
    return w.op("Concat", list(reversed(upsampled)), axis=1)


def _db_head(w: _Writer, x: str, channels: int) -> str:
    inner = channels // 4
    x = p2o_conv_bn_act(w, x, channels, inner, 3, act="relu")
    x = w.op("Relu", [p2o_norm(w, _conv_transpose(w, x, inner, inner), inner)])
    x = _conv_transpose(w, x, inner, 1, bias=True)
    return w.op("Sigmoid", [x], out="sigmoid_0.tmp_0")


def _conv_transpose(w: _Writer, x: str, cin: int, cout: int, bias: bool = False) -> str:
    index = w.count("conv2d_transpose")
    # ConvTranspose weights are [cin, cout, k, k]: a copy part here is nearest-neighbour upsampling
    weight = RANDOM_PART * w.he_normal((cin, cout, 2, 2), fan_in=cin)
    weight[np.arange(cin), np.arange(cin) % cout] += np.float32(1.0)
    inputs = [x, w.init(f"conv2d_transpose_{index}.w_0", weight)]
    if bias:
        inputs.append(w.init(f"conv2d_transpose_{index}.b_0", w.normal((cout,), 0.1)))
    return w.op("ConvTranspose", inputs, out=f"conv2d_transpose_{index}.tmp_0", kernel_shape=[2, 2],
                strides=[2, 2], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)


def svtr_recognizer(input_shape: Sequence[int] = (3, 48, 320), num_classes: int = 97, scale: float = 0.5,
                    dim: int = 64, depth: int = 2, heads: int = 4, seed: int = 0,
                    probe: np.ndarray | None = None) -> onnx.ModelProto:
    """SVTR-like CTC recognizer: LCNet with (2, 1) strides, height pooled away, global-mixing blocks on
    the width sequence, MatMul + Softmax CTC head; output [N, W/8, num_classes]."""
    if input_shape[1] != 48 or input_shape[2] % 8:
        raise ValueError(f"svtr_recognizer: input {tuple(input_shape)} must be 48 high and a multiple of 8 wide")
    w = _Writer(seed, "paddle")
    x, _ = pplcnet_backbone(w, "x", scale, se_gate="op", strides={"blocks5": (2, 1), "blocks6": (2, 1)})
    # Height 48 -> 6 after the stem, blocks3 and blocks4, -> 2 after the (2, 1) strides; width /8.
    # Pool the height away as PaddleOCR's neck does.
    x = w.op("AveragePool", [x], kernel_shape=[2, 1], strides=[2, 1], pads=[0, 0, 0, 0])
    x = p2o_conv_bn_act(w, x, make_divisible(512 * scale), dim, 1)
    x = w.op("Transpose", [w.op("Squeeze", [x, w.constant(np.array([2], np.int64))])], perm=[0, 2, 1])
    for _ in range(depth):
        x = _svtr_block(w, x, dim, heads)
    x = _p2o_layernorm(w, x, dim)
    logits = p2o_linear(w, x, dim, num_classes)
    w.op("Softmax", [logits], out="softmax_0.tmp_0", axis=2)
    batch = "p2o.DynamicDimension.0"
    model = _model(w, [_image_input("x", input_shape, batch)],
                   [helper.make_tensor_value_info("softmax_0.tmp_0", TensorProto.FLOAT,
                                                  [batch, input_shape[2] // 8, num_classes])],
                   "svtr_recognizer", ("PaddlePaddle", "2.6.0"))
    probe = _probe(probe, input_shape, seed)
    model = _set_head_scale(_fill_norm_statistics(w, model, probe), logits, probe)
    return _raise_blank(model, logits, probe)


def _p2o_layernorm(w: _Writer, x: str, dim: int) -> str:
    """Paddle2ONNX's layer_norm below opset 17: the same nine ops as torch's, with p2o names."""
    index = w.count("layer_norm")
    mean = w.op("ReduceMean", [x], axes=[-1], keepdims=1)
    centred = w.op("Sub", [x, mean])
    var = w.op("ReduceMean", [w.op("Pow", [centred, w.scalar(2.0)])], axes=[-1], keepdims=1)
    normed = w.op("Div", [centred, w.op("Sqrt", [w.op("Add", [var, w.scalar(LN_EPSILON)])])])
    gamma = w.init(f"layer_norm_{index}.w_0", w.rng.uniform(0.5, 1.5, dim))
    beta = w.init(f"layer_norm_{index}.b_0", w.normal((dim,), 0.1))
    return w.op("Add", [w.op("Mul", [normed, gamma]), beta], out=f"layer_norm_{index}.tmp_2")


def _svtr_block(w: _Writer, x: str, dim: int, heads: int) -> str:
    h = _p2o_layernorm(w, x, dim)
    qkv = p2o_linear(w, h, dim, 3 * dim)
    head_dim = dim // heads
    # Paddle exports reshape with 0 ("copy this dim") for the dynamic batch instead of Shape ops.
    qkv = w.op("Reshape", [qkv, w.constant(np.array([0, -1, 3, heads, head_dim], np.int64))])
    qkv = w.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
    q, k, v = (w.op("Squeeze", [part, w.constant(np.array([0], np.int64))])
               for part in w.op("Split", [qkv, w.constant(np.array([1, 1, 1], np.int64))], outputs=3, axis=0))
    scores = w.op("MatMul", [w.op("Mul", [q, w.scalar(head_dim ** -0.5)]), w.op("Transpose", [k],
                                                                               perm=[0, 1, 3, 2])])
    mixed = w.op("MatMul", [w.op("Softmax", [scores], axis=-1), v])
    mixed = w.op("Reshape", [w.op("Transpose", [mixed], perm=[0, 2, 1, 3]),
                             w.constant(np.array([0, -1, dim], np.int64))])
    x = w.op("Add", [x, p2o_linear(w, mixed, dim, dim)])
    h = p2o_hardswish(w, p2o_linear(w, _p2o_layernorm(w, x, dim), dim, 2 * dim))
    return w.op("Add", [x, p2o_linear(w, h, 2 * dim, dim)])


def vit_encoder(input_shape: Sequence[int] = (3, 224, 224), num_classes: int = 1000, patch: int = 16,
                dim: int = 192, depth: int = 4, heads: int = 3, mlp_ratio: int = 4, outliers: int = 2,
                seed: int = 0, probe: np.ndarray | None = None) -> onnx.ModelProto:
    """A timm-style ViT as torch.onnx exports it (dynamic batch); output `logits` [N, num_classes]."""
    channels, height, width = input_shape
    if height % patch or width % patch:
        raise ValueError(f"vit_encoder: input {height}x{width} is not a multiple of the patch size {patch}")
    tokens = (height // patch) * (width // patch) + 1
    w = _Writer(seed, "torch")
    with w.scope("patch_embed"), w.scope("proj"):
        weight = w.init("patch_embed.proj.weight", w.he_normal((dim, channels, patch, patch), channels * patch ** 2))
        x = w.op("Conv", ["input", weight, w.init("patch_embed.proj.bias", w.normal((dim,), 0.05))],
                 kernel_shape=[patch, patch], strides=[patch, patch], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
    with w.scope("patch_embed"):
        # x.flatten(2): Shape -> Slice(0:2) -> Concat(-1) -> Reshape, then transpose(1, 2)
        head = w.op("Slice", [w.op("Shape", [x]), w.constant(np.array([0], np.int64)),
                              w.constant(np.array([2], np.int64)), w.constant(np.array([0], np.int64))])
        x = w.op("Reshape", [x, w.op("Concat", [head, w.constant(np.array([-1], np.int64))], axis=0)])
        x = w.op("Transpose", [x], perm=[0, 2, 1])
    cls = torch_expand_like_batch(w, w.init("cls_token", w.normal((1, 1, dim), 0.5)), torch_dim(w, x, 0))
    x = w.op("Concat", [cls, x], axis=1)
    x = w.op("Add", [x, w.init("pos_embed", w.normal((1, tokens, dim), 0.5))])
    for i in range(depth):
        with w.scope(f"blocks.{i}"):
            x = torch_block(w, x, dim, heads, mlp_ratio, outliers)
    with w.scope("norm"):
        x = torch_layernorm(w, x, dim)
    x = w.op("Gather", [x, w.constant(np.int64(0))], axis=1)
    with w.scope("head"):
        weight = w.init("head.weight", w.normal((num_classes, dim), np.sqrt(1.0 / dim)))
        bias = w.init("head.bias", w.normal((num_classes,), 0.05))
        w.op("Gemm", [x, weight, bias], out="logits", alpha=1.0, beta=1.0, transB=1)
    model = _model(w, [_image_input("input", input_shape, "batch_size")],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", num_classes])],
                   "vit_encoder", ("pytorch", "2.3.1"))
    return _set_head_scale(model, "logits", _probe(probe, input_shape, seed))


# --- normalization statistics -------------------------------------------------------------------

def probe_batch(input_shape: Sequence[int], seed: int, count: int = 8) -> np.ndarray:
    """Seeded image-like noise, about N(0, 1) per channel: blobs of a per-sample size plus fine texture,
    with per-sample contrast and per-channel offsets. Samples must differ in their global statistics
    (as photos do), or pooled features would be nearly equal for all and the head could not be set."""
    rng = np.random.default_rng(seed + 7919)
    channels, height, width = input_shape
    samples = []
    for _ in range(count):
        cell = int(rng.choice([2, 4, 8, 16]))
        coarse = rng.standard_normal((channels, -(-height // cell), -(-width // cell))).astype(np.float32)
        smooth = coarse.repeat(cell, axis=1).repeat(cell, axis=2)[:, :height, :width]
        texture = smooth + np.float32(0.3) * rng.standard_normal(smooth.shape, dtype=np.float32)
        offsets = rng.normal(0.0, 0.5, (channels, 1, 1)).astype(np.float32)
        samples.append(texture * np.float32(rng.uniform(0.5, 1.5)) + offsets)
    return np.stack(samples).astype(np.float32)


def _probe(probe: np.ndarray | None, input_shape: Sequence[int], seed: int) -> np.ndarray:
    if probe is None:
        return probe_batch(input_shape, seed)
    probe = np.asarray(probe, np.float32)
    if probe.ndim != 4 or tuple(probe.shape[1:]) != tuple(input_shape) or len(probe) < 2:
        raise ValueError(f"probe of shape {probe.shape} does not fit input {tuple(input_shape)} (need N >= 2)")
    return probe


def _fill_norm_statistics(w: _Writer, model: onnx.ModelProto, probe: np.ndarray) -> onnx.ModelProto:
    """Measure every norm site's batch mean/var on the probe (one ORT run), write them into the
    BatchNormalization nodes, and turn the `affine` sites into Paddle's `Mul(c) -> Add(c)`."""
    stats = _probe_statistics(model, w.norm_sites, probe)
    inits = {t.name: t for t in model.graph.initializer}
    for site, (mean, var) in zip(w.norm_sites, stats):
        _, scale_name, bias_name, mean_name, var_name = site.node.input
        inits[mean_name].CopyFrom(numpy_helper.from_array(mean, mean_name))
        inits[var_name].CopyFrom(numpy_helper.from_array(var, var_name))
        if site.affine_names:
            _bn_to_affine(model, site, inits)
    onnx.checker.check_model(model)
    return model


def _set_head_scale(model: onnx.ModelProto, logits: str, probe: np.ndarray, centre: str = "class_mean",
                    target_std: float = LOGIT_STD) -> onnx.ModelProto:
    """Shift and scale the head writing `logits` so that, on the probe, it behaves like a trained one:
    an untrained head gives a flat softmax, one class for every input, or a map that is all text.
        L = f W + b,   s = std(L - m),   W' = W k,   b' = (b - m) k,   k = target_std / s
    with m the per-class mean over the probe (`class_mean`: no class favoured whatever the input) or
    the (1 - DB_FOREGROUND) quantile of all values (`quantile`: that share of pixels above 0.5).
    """
    values = _run_probe(model, [logits], probe)[0]
    if centre == "class_mean":
        values = values.reshape(-1, values.shape[-1])
        shift = values.mean(axis=0)
    else:
        shift = np.float32(np.quantile(values, 1.0 - DB_FOREGROUND))
    factor = np.float32(target_std / max(float((values - shift).std()), 1e-12))
    weight, bias = _head_parameters(model, logits)
    inits = {t.name: t for t in model.graph.initializer}
    new_weight = numpy_helper.to_array(inits[weight]) * factor
    new_bias = (numpy_helper.to_array(inits[bias]) - shift) * factor
    inits[weight].CopyFrom(numpy_helper.from_array(new_weight.astype(np.float32), weight))
    inits[bias].CopyFrom(numpy_helper.from_array(new_bias.astype(np.float32), bias))
    return model


def _raise_blank(model: onnx.ModelProto, logits: str, probe: np.ndarray, share: float = CTC_BLANK_SHARE,
                 blank: int = 0) -> onnx.ModelProto:
    """Raise the CTC blank's bias so that `share` of the probe's frames decode as blank, as in a trained
    recognizer (characters are short peaks between blanks): the margin by which the best other class
    beats the blank, at the `share` quantile over frames."""
    values = _run_probe(model, [logits], probe)[0].reshape(-1, model.graph.output[0].type.tensor_type.shape.dim[-1]
                                                           .dim_value)
    margin = np.delete(values, blank, axis=1).max(axis=1) - values[:, blank]
    _, bias = _head_parameters(model, logits)
    tensor = next(t for t in model.graph.initializer if t.name == bias)
    raised = numpy_helper.to_array(tensor).copy()
    raised[blank] += np.float32(np.quantile(margin, share) + 1e-3)
    tensor.CopyFrom(numpy_helper.from_array(raised.astype(np.float32), bias))
    return model


def _head_parameters(model: onnx.ModelProto, logits: str) -> tuple[str, str]:
    """(weight, bias) initializer names of the Gemm/Conv/ConvTranspose, or MatMul + Add(bias), writing `logits`."""
    inits = {t.name for t in model.graph.initializer}
    producer = next(node for node in model.graph.node if logits in node.output)
    if producer.op_type in ("Gemm", "Conv", "ConvTranspose"):
        return producer.input[1], producer.input[2]
    matmul = next(node for node in model.graph.node if node.output[0] in producer.input)
    bias = next(name for name in producer.input if name in inits)
    return next(name for name in matmul.input if name in inits), bias


def _run_probe(model: onnx.ModelProto, outputs: list[str], batch: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in outputs if name not in known)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, {probe.graph.input[0].name: batch})


def _probe_statistics(model: onnx.ModelProto, sites: list[_NormSite],
                      batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ORT run of a copy in which each BN normalizes by its own batch statistics, which are also
    outputs: exactly the statistics every BN sees once its predecessors use theirs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    site_names = {site.node.name for site in sites}
    nodes, outputs = [], []
    for node in probe.graph.node:
        if node.name not in site_names:
            nodes.append(node)
            continue
        bn_nodes, mean, var = _batch_norm_nodes(node)
        nodes.extend(bn_nodes)
        outputs += [mean, var]
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    values = _run_probe(probe, outputs, batch)
    return [(values[i].reshape(-1).astype(np.float32), values[i + 1].reshape(-1).astype(np.float32))
            for i in range(0, len(values), 2)]


def _batch_norm_nodes(node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str, str]:
    """(x - m) / sqrt(v + eps) * gamma + beta with m, v over (N, H, W): BN in training mode, spelled out."""
    x, gamma, beta = node.input[:3]
    p = f"__probe.{node.name}"
    axes = {"axes": [0, 2, 3], "keepdims": 1}
    make = helper.make_node
    nodes = [
        make("ReduceMean", [x], [f"{p}.mean"], **axes),
        make("Sub", [x, f"{p}.mean"], [f"{p}.centred"]),
        make("Mul", [f"{p}.centred", f"{p}.centred"], [f"{p}.sq"]),
        make("ReduceMean", [f"{p}.sq"], [f"{p}.var"], **axes),
        make("Constant", [], [f"{p}.eps"], value=numpy_helper.from_array(np.float32(BN_EPSILON))),
        make("Add", [f"{p}.var", f"{p}.eps"], [f"{p}.var_eps"]),
        make("Sqrt", [f"{p}.var_eps"], [f"{p}.std"]),
        make("Div", [f"{p}.centred", f"{p}.std"], [f"{p}.normed"]),
        make("Constant", [], [f"{p}.shape"], value=numpy_helper.from_array(np.array([1, -1, 1, 1], np.int64))),
        make("Reshape", [gamma, f"{p}.shape"], [f"{p}.gamma"]),
        make("Reshape", [beta, f"{p}.shape"], [f"{p}.beta"]),
        make("Mul", [f"{p}.normed", f"{p}.gamma"], [f"{p}.scaled"]),
        make("Add", [f"{p}.scaled", f"{p}.beta"], [node.output[0]]),
    ]
    return nodes, f"{p}.mean", f"{p}.var"


def _bn_to_affine(model: onnx.ModelProto, site: _NormSite, inits: dict[str, onnx.TensorProto]) -> None:
    """Replace the BN node by `Mul(scale[C,1,1]) -> Add(bias[C,1,1])` with the same output, in place."""
    x, scale_name, bias_name, mean_name, var_name = site.node.input
    gamma, beta, mean, var = (numpy_helper.to_array(inits[n]) for n in (scale_name, bias_name, mean_name, var_name))
    scale = (gamma / np.sqrt(var + np.float32(BN_EPSILON))).astype(np.float32)
    bias = (beta - mean * scale).astype(np.float32)
    for name in (scale_name, bias_name, mean_name, var_name):
        model.graph.initializer.remove(inits.pop(name))
    stem = site.node.output[0].removesuffix(".tmp_2")
    model.graph.initializer.extend([numpy_helper.from_array(scale.reshape(-1, 1, 1), f"{stem}.scale"),
                                    numpy_helper.from_array(bias.reshape(-1, 1, 1), f"{stem}.bias")])
    mul_name, add_name = site.affine_names
    mul = helper.make_node("Mul", [x, f"{stem}.scale"], [f"{stem}.tmp_0"], name=mul_name)
    add = helper.make_node("Add", [f"{stem}.tmp_0", f"{stem}.bias"], [site.node.output[0]], name=add_name)
    position = list(model.graph.node).index(site.node)
    model.graph.node.remove(site.node)
    model.graph.node.insert(position, add)
    model.graph.node.insert(position, mul)


def build_exported(name: str, **kwargs) -> onnx.ModelProto:
    """Build one of `EXPORTED` by name (keyword arguments go to the builder)."""
    builders = {"pplcnet_paddle": pplcnet_paddle, "vit_encoder": vit_encoder, "db_detector": db_detector,
                "svtr_recognizer": svtr_recognizer}
    if name not in builders:
        raise ValueError(f"unknown exported-style builder {name!r}; choose one of: {', '.join(EXPORTED)}")
    return builders[name](**kwargs)
