"""Deterministic ONNX builders for the small CNNs qgraph trains, quantizes and deploys.

Every model has one input `input` (float32, ["N", C, H, W], pixels in [0, 1]) and one output
`logits` (["N", num_classes]), opset `OPSET`, IR version 8. Weights come from a seeded numpy
RNG: He-normal (std = sqrt(2 / fan_in)) for Conv and Gemm, zero biases, and BatchNorm at
identity (gamma 1, beta 0, mean 0, var 1). Node names follow the layer path
("stage1.block0.conv1") and initializers add the role (".weight", ".bias", ".running_mean").

RepVGG re-parameterization (`reparameterize_repvgg`) merges the three train-form branches of
a block into one 3x3 Conv, exactly up to float rounding:
    BN(W) folds as  W' = W * gamma / sqrt(var + eps),  b' = beta - mean * gamma / sqrt(var + eps)
    1x1 kernels are zero-padded to 3x3 at the centre; identity is a 3x3 kernel with 1 at [c, c, 1, 1]
    K = K3 + K1 + Kid,  b = b3 + b1 + bid
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import ConfigError, ModelError

try:
    from qgraph.model_io import OPSET
except ImportError:  # model_io is optional for the builders
    OPSET = 17

IR_VERSION = 8
BN_EPSILON = 1e-5
# Inputs at least this tall get an ImageNet-style downsampling stem.
LARGE_INPUT = 64


class _GraphBuilder:
    """Collects nodes and initializers with unique names; layer methods return the output tensor."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def node(self, op: str, name: str, inputs: Sequence[str], output: str | None = None, **attrs) -> str:
        if name in self._names:
            raise ValueError(f"builder bug: node name {name!r} used twice")
        self._names.add(name)
        output = output or name
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def he_normal(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))

    def conv(self, name: str, x: str, cin: int, cout: int, kernel: int, stride: int = 1,
             pad: int | None = None, group: int = 1, bias: bool = False) -> str:
        pad = kernel // 2 if pad is None else pad
        weight = self.he_normal((cout, cin // group, kernel, kernel), fan_in=cin // group * kernel * kernel)
        inputs = [x, self.constant(f"{name}.weight", weight)]
        if bias:
            inputs.append(self.constant(f"{name}.bias", np.zeros(cout, np.float32)))
        return self.node("Conv", name, inputs, kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=[pad] * 4, group=group, dilations=[1, 1])

    def bn(self, name: str, x: str, channels: int) -> str:
        params = [self.constant(f"{name}.{role}", np.full(channels, fill, np.float32))
                  for role, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0))]
        return self.node("BatchNormalization", name, [x, *params], epsilon=BN_EPSILON)

    def relu(self, name: str, x: str) -> str:
        return self.node("Relu", name, [x])

    def relu6(self, name: str, x: str) -> str:
        if "relu6.min" not in self._names:
            self._names.update(("relu6.min", "relu6.max"))
            self.constant("relu6.min", np.float32(0.0))
            self.constant("relu6.max", np.float32(6.0))
        return self.node("Clip", name, [x, "relu6.min", "relu6.max"])

    def add(self, name: str, a: str, b: str) -> str:
        return self.node("Add", name, [a, b])

    def maxpool(self, name: str, x: str, kernel: int, stride: int, pad: int = 0) -> str:
        return self.node("MaxPool", name, [x], kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=[pad] * 4)

    def gemm(self, name: str, x: str, fin: int, fout: int, output: str | None = None) -> str:
        weight = self.constant(f"{name}.weight", self.he_normal((fout, fin), fan_in=fin))
        bias = self.constant(f"{name}.bias", np.zeros(fout, np.float32))
        return self.node("Gemm", name, [x, weight, bias], output=output, transB=1)

    def classifier(self, x: str, channels: int, num_classes: int, prefix: str = "head") -> str:
        """GlobalAveragePool -> Flatten -> Gemm producing `logits`."""
        x = self.node("GlobalAveragePool", f"{prefix}.pool", [x])
        x = self.node("Flatten", f"{prefix}.flatten", [x], axis=1)
        return self.gemm(f"{prefix}.fc", x, channels, num_classes, output="logits")

    def model(self, input_shape: Sequence[int], num_classes: int, graph_name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
            initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="qgraph.models", ir_version=IR_VERSION)
        model.doc_string = f"qgraph.models {graph_name}"
        return model


def _check_input_shape(input_shape: Sequence[int], builder: str) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ConfigError(f"{builder}: input_shape {tuple(input_shape)} must be (C, H, W) with positive sizes")
    return tuple(int(v) for v in input_shape)


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def build_lenet(input_shape=(1, 28, 28), width: int = 8, num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """LeNet: Conv5x5(width)-Relu-MaxPool-Conv5x5(2*width)-Relu-MaxPool-Flatten-Gemm(8*width)-Relu-Gemm.

    Convs pad 2 ("same"), so 28x28 gives 7x7 maps before the classifier and 8x8 inputs also fit.
    """
    channels, height, width_px = _check_input_shape(input_shape, "lenet")
    g = _GraphBuilder(seed)
    x = g.relu("relu1", g.conv("conv1", "input", channels, width, 5, pad=2, bias=True))
    x = g.maxpool("pool1", x, 2, 2)
    x = g.relu("relu2", g.conv("conv2", x, width, 2 * width, 5, pad=2, bias=True))
    x = g.maxpool("pool2", x, 2, 2)
    height, width_px = (_out_size(_out_size(s, 2, 2, 0), 2, 2, 0) for s in (height, width_px))
    if min(height, width_px) < 1:
        raise ConfigError(f"lenet: input_shape {tuple(input_shape)} is too small; use at least 4x4")
    x = g.node("Flatten", "flatten", [x], axis=1)
    x = g.relu("relu3", g.gemm("fc1", x, 2 * width * height * width_px, 8 * width))
    g.gemm("fc2", x, 8 * width, num_classes, output="logits")
    return g.model(input_shape, num_classes, "lenet")


def build_mlp(input_shape=(1, 28, 28), width: int = 64, num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """MLP: Flatten-Gemm(width)-Relu-Gemm(width)-Relu-Gemm(num_classes)."""
    features = int(np.prod(_check_input_shape(input_shape, "mlp")))
    g = _GraphBuilder(seed)
    x = g.node("Flatten", "flatten", ["input"], axis=1)
    x = g.relu("relu1", g.gemm("fc1", x, features, width))
    x = g.relu("relu2", g.gemm("fc2", x, width, width))
    g.gemm("fc3", x, width, num_classes, output="logits")
    return g.model(input_shape, num_classes, "mlp")


def _resnet_stem(g: _GraphBuilder, channels: int, height: int, width: int) -> str:
    """Conv-BN-Relu: 3x3 stride 1 for small inputs; ImageNet-style 7x7/2 then MaxPool 3x3/2 for large."""
    if height >= LARGE_INPUT:
        x = g.relu("stem.relu", g.bn("stem.bn", g.conv("stem.conv", "input", channels, width, 7, 2), width))
        return g.maxpool("stem.pool", x, 3, 2, pad=1)
    return g.relu("stem.relu", g.bn("stem.bn", g.conv("stem.conv", "input", channels, width, 3), width))


def _basic_block(g: _GraphBuilder, p: str, x: str, cin: int, cout: int, stride: int) -> str:
    y = g.relu(f"{p}.relu1", g.bn(f"{p}.bn1", g.conv(f"{p}.conv1", x, cin, cout, 3, stride), cout))
    y = g.bn(f"{p}.bn2", g.conv(f"{p}.conv2", y, cout, cout, 3), cout)
    return g.relu(f"{p}.relu", g.add(f"{p}.add", y, _shortcut(g, p, x, cin, cout, stride)))


def _bottleneck_block(g: _GraphBuilder, p: str, x: str, cin: int, mid: int, stride: int) -> str:
    cout = 4 * mid
    y = g.relu(f"{p}.relu1", g.bn(f"{p}.bn1", g.conv(f"{p}.conv1", x, cin, mid, 1), mid))
    y = g.relu(f"{p}.relu2", g.bn(f"{p}.bn2", g.conv(f"{p}.conv2", y, mid, mid, 3, stride), mid))
    y = g.bn(f"{p}.bn3", g.conv(f"{p}.conv3", y, mid, cout, 1), cout)
    return g.relu(f"{p}.relu", g.add(f"{p}.add", y, _shortcut(g, p, x, cin, cout, stride)))


def _shortcut(g: _GraphBuilder, p: str, x: str, cin: int, cout: int, stride: int) -> str:
    if cin == cout and stride == 1:
        return x
    y = g.conv(f"{p}.downsample.conv", x, cin, cout, 1, stride)
    return g.bn(f"{p}.downsample.bn", y, cout)


def build_resnet(input_shape=(1, 28, 28), width: int = 8, blocks: Sequence[int] = (1, 1, 1),
                 bottleneck: bool = False, num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """ResNet: Conv-BN-Relu stem, stages of BasicBlocks (or Bottlenecks, 4x expansion) with widths
    width * 2^i, first block of each later stage strided with a 1x1 Conv-BN projection; GAP-Flatten-Gemm.

    `build_resnet((3, 224, 224), 64, (3, 4, 6, 3), bottleneck=True, num_classes=1000)` is ResNet-50 (v1.5).
    """
    channels, height, _ = _check_input_shape(input_shape, "resnet")
    g = _GraphBuilder(seed)
    x = _resnet_stem(g, channels, height, width)
    cin = width
    for stage, count in enumerate(blocks, start=1):
        planes = width * 2 ** (stage - 1)
        for index in range(count):
            stride = 2 if stage > 1 and index == 0 else 1
            prefix = f"stage{stage}.block{index}"
            if bottleneck:
                x, cin = _bottleneck_block(g, prefix, x, cin, planes, stride), 4 * planes
            else:
                x, cin = _basic_block(g, prefix, x, cin, planes, stride), planes
    g.classifier(x, cin, num_classes)
    return g.model(input_shape, num_classes, "resnet")


MOBILENETV2_STAGES = ((1, 1, 1, 1), (4, 2, 2, 2), (4, 3, 2, 2), (4, 4, 1, 1))


def build_mobilenetv2(input_shape=(1, 28, 28), width: int = 8,
                      stages: Sequence[tuple[int, float, int, int]] = MOBILENETV2_STAGES,
                      num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2: Conv-BN-ReLU6 stem, inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1
    linear project; Add when stride 1 and channels match), 1x1 Conv-BN-ReLU6 to 8*width, GAP-Flatten-Gemm.

    `stages` rows are (expand ratio, channels as a multiple of width, blocks, stride of the first block).
    """
    channels, height, _ = _check_input_shape(input_shape, "mobilenetv2")
    g = _GraphBuilder(seed)
    if height >= LARGE_INPUT:
        x = g.relu6("stem.clip", g.bn("stem.bn", g.conv("stem.conv", "input", channels, width, 3, 2), width))
    else:
        x = g.relu6("stem.clip", g.bn("stem.bn", g.conv("stem.conv", "input", channels, width, 3), width))
    cin = width
    for stage, (expand, multiple, count, first_stride) in enumerate(stages, start=1):
        cout = max(1, int(round(width * multiple)))
        for index in range(count):
            stride = first_stride if index == 0 else 1
            x = _inverted_residual(g, f"stage{stage}.block{index}", x, cin, cout, expand, stride)
            cin = cout
    head = 8 * width
    x = g.relu6("head.clip", g.bn("head.bn", g.conv("head.conv", x, cin, head, 1), head))
    g.classifier(x, head, num_classes)
    return g.model(input_shape, num_classes, "mobilenetv2")


def _inverted_residual(g: _GraphBuilder, p: str, x: str, cin: int, cout: int, expand: int, stride: int) -> str:
    hidden = cin * expand
    y = x
    if expand != 1:
        y = g.relu6(f"{p}.expand.clip", g.bn(f"{p}.expand.bn", g.conv(f"{p}.expand.conv", y, cin, hidden, 1), hidden))
    y = g.conv(f"{p}.depthwise.conv", y, hidden, hidden, 3, stride, group=hidden)
    y = g.relu6(f"{p}.depthwise.clip", g.bn(f"{p}.depthwise.bn", y, hidden))
    y = g.bn(f"{p}.project.bn", g.conv(f"{p}.project.conv", y, hidden, cout, 1), cout)
    if stride == 1 and cin == cout:
        y = g.add(f"{p}.add", y, x)
    return y


def _repvgg_block(g: _GraphBuilder, p: str, x: str, cin: int, cout: int, stride: int) -> str:
    """Train form: BN(Conv3x3) + BN(Conv1x1) [+ BN(x) when shapes match], then Relu."""
    y = g.bn(f"{p}.conv3x3.bn", g.conv(f"{p}.conv3x3.conv", x, cin, cout, 3, stride), cout)
    y = g.add(f"{p}.add1", y, g.bn(f"{p}.conv1x1.bn", g.conv(f"{p}.conv1x1.conv", x, cin, cout, 1, stride), cout))
    if cin == cout and stride == 1:
        y = g.add(f"{p}.add2", y, g.bn(f"{p}.identity.bn", x, cout))
    return g.relu(f"{p}.relu", y)


def build_repvgg(input_shape=(1, 28, 28), width: int = 8, blocks: Sequence[int] = (2, 2, 2),
                 num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """RepVGG, train form: stages of blocks summing 3x3 Conv-BN, 1x1 Conv-BN and identity BN, then
    Relu; widths width * 2^i, first block of each stage after the first strided (stride 2 also in
    stage 1 for large inputs); GAP-Flatten-Gemm. `reparameterize_repvgg` gives the deploy form."""
    channels, height, _ = _check_input_shape(input_shape, "repvgg")
    g = _GraphBuilder(seed)
    x, cin = "input", channels
    for stage, count in enumerate(blocks, start=1):
        cout = width * 2 ** (stage - 1)
        for index in range(count):
            stride = 2 if index == 0 and (stage > 1 or height >= LARGE_INPUT) else 1
            x = _repvgg_block(g, f"stage{stage}.block{index}", x, cin, cout, stride)
            cin = cout
    g.classifier(x, cin, num_classes)
    return g.model(input_shape, num_classes, "repvgg")


def build_repvgg_deploy(input_shape=(1, 28, 28), width: int = 8, blocks: Sequence[int] = (2, 2, 2),
                        num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """RepVGG, deploy form: each block is one 3x3 Conv with bias and a Relu; GAP-Flatten-Gemm."""
    return reparameterize_repvgg(build_repvgg(input_shape, width, blocks, num_classes, seed))


_REPVGG_3X3 = ".conv3x3.conv"


def reparameterize_repvgg(model: onnx.ModelProto) -> onnx.ModelProto:
    """Deploy form of a (trained) train-form RepVGG: every block's branches merge into one 3x3 Conv
    with bias named "<block>.conv"; outputs are unchanged up to float rounding.

    Blocks are found by this module's names ("<block>.conv3x3.conv", ".conv1x1.*", ".identity.bn",
    ".add1", ".add2", ".relu"); the input model is not modified.
    """
    nodes = {node.name: node for node in model.graph.node}
    prefixes = [name[:-len(_REPVGG_3X3)] for name in nodes if name.endswith(_REPVGG_3X3)]
    if not prefixes:
        raise ModelError(f"model {model.graph.name!r} has no RepVGG train-form blocks (no node named "
                         f"'*{_REPVGG_3X3}'); build it with build_repvgg")
    weights = {init.name: init for init in model.graph.initializer}
    replaced: dict[str, onnx.NodeProto] = {}
    removed: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    for prefix in prefixes:
        block_nodes = [f"{prefix}{suffix}" for suffix in (".conv3x3.conv", ".conv3x3.bn", ".conv1x1.conv",
                                                           ".conv1x1.bn", ".identity.bn", ".add1", ".add2")]
        block_nodes = [name for name in block_nodes if name in nodes]
        last_add = nodes.get(f"{prefix}.add2", nodes.get(f"{prefix}.add1"))
        if last_add is None or f"{prefix}.conv1x1.bn" not in nodes:
            raise ModelError(f"RepVGG block {prefix!r} lacks its 1x1 branch or Add nodes; "
                             "only models from build_repvgg can be re-parameterized")
        kernel, bias = _merged_block_kernel(prefix, nodes, weights)
        conv3 = nodes[f"{prefix}{_REPVGG_3X3}"]
        new_inits += [numpy_helper.from_array(kernel, f"{prefix}.conv.weight"),
                      numpy_helper.from_array(bias, f"{prefix}.conv.bias")]
        replaced[last_add.name] = helper.make_node(
            "Conv", [conv3.input[0], f"{prefix}.conv.weight", f"{prefix}.conv.bias"], list(last_add.output),
            name=f"{prefix}.conv", **{a.name: helper.get_attribute_value(a) for a in conv3.attribute})
        removed.update(block_nodes)

    deploy = onnx.ModelProto()
    deploy.CopyFrom(model)
    new_nodes = [replaced.get(node.name, node) for node in model.graph.node
                 if node.name in replaced or node.name not in removed]
    del deploy.graph.node[:]
    deploy.graph.node.extend(new_nodes)
    used = {name for node in new_nodes for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del deploy.graph.initializer[:]
    deploy.graph.initializer.extend(kept + new_inits)
    deploy.graph.name = f"{model.graph.name}_deploy"
    return deploy


def _merged_block_kernel(prefix: str, nodes: dict[str, onnx.NodeProto],
                         weights: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray]:
    """3x3 kernel and bias equal to the sum of the block's BN-folded branches (computed in float64)."""
    def array(name: str) -> np.ndarray:
        if name not in weights:
            raise ModelError(f"RepVGG block {prefix!r}: tensor {name!r} is not an initializer; "
                             "re-parameterize a model with constant weights")
        return numpy_helper.to_array(weights[name]).astype(np.float64)

    def folded(bn_name: str, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bn = nodes[bn_name]
        gamma, beta, mean, var = (array(name) for name in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        return kernel * scale[:, None, None, None], beta - mean * scale

    conv3, conv1 = nodes[f"{prefix}.conv3x3.conv"], nodes[f"{prefix}.conv1x1.conv"]
    kernel3, bias3 = folded(f"{prefix}.conv3x3.bn", array(conv3.input[1]))
    kernel1, bias1 = folded(f"{prefix}.conv1x1.bn", np.pad(array(conv1.input[1]), ((0, 0), (0, 0), (1, 1), (1, 1))))
    kernel, bias = kernel3 + kernel1, bias3 + bias1
    if f"{prefix}.identity.bn" in nodes:
        channels = kernel.shape[0]
        identity = np.zeros((channels, channels, 3, 3))
        identity[np.arange(channels), np.arange(channels), 1, 1] = 1.0
        kernel_id, bias_id = folded(f"{prefix}.identity.bn", identity)
        kernel, bias = kernel + kernel_id, bias + bias_id
    return kernel.astype(np.float32), bias.astype(np.float32)


BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "lenet": build_lenet,
    "resnet": build_resnet,
    "mobilenetv2": build_mobilenetv2,
    "repvgg": build_repvgg,
    "repvgg_deploy": build_repvgg_deploy,
    "mlp": build_mlp,
}


def build_model(name: str, **kwargs) -> onnx.ModelProto:
    """Build model `name` from BUILDERS with the builder's keyword arguments."""
    if name not in BUILDERS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(BUILDERS)}")
    builder = BUILDERS[name]
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: {exc}; see help(qgraph.models.builders.{builder.__name__})") from None
    return builder(**kwargs)
