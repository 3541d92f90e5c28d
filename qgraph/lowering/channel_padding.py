"""Carrying a depthwise conv's padded channels through its neighbours (qlinear target).

lower_conv pads a depthwise QLinearConv to a multiple of DEPTHWISE_CHANNEL_BLOCK channels: a Pad of
its input channels before it, a Slice of its output channels after it. Both are whole passes over
small maps (PaddleOCR's direction classifier: 7 such convs, Pads and Slices 87 of ~1200 µs of node
time at batch 1). They go away where the extra
channels can travel instead: the conv that writes the depthwise input computes the extra channels
itself (zero weights), the ops between are channelwise, and the convs that read the result take
the extra channels with weights equal to their zero point, so that they add nothing.

Exactness. Call the channels beyond the real ones "extra". Every op a widened tensor passes is
channelwise (an output channel depends only on the same channel of its inputs: Q/DQ on one grid,
elementwise activations, QLinearMul/QLinearAdd, global average pooling, a depthwise conv), so the
real channels' codes are those of the narrow graph whatever the extra channels hold. A widened
tensor ends only at (a) a dense QLinearConv or ConvInteger (a conv with a float output), whose
weights on the extra input channels equal the weight zero point: ``(x − z_x)·(w − z_w) = 0`` adds
nothing to any accumulator; (b) a Slice of the real channels, removed; (c) a Pad whose output is
the widened tensor already (its reader ignores the padded channels the same way). Widened convs
(a dense conv writing a widened tensor, a depthwise conv inside it) get extra output channels with
weights at the zero point and bias 0. A graph output, a reshape or any other op ends the attempt,
and nothing is changed there.

Measured (ORT 1.19, one thread, AMD EPYC, alternated 100 rounds with the float model): PaddleOCR's
direction classifier, whose 14 depthwise Pads and Slices all go (its stem's Slice stays), 1.076x ->
1.003x of float at batch 1 and 0.985x -> 0.923x at batch 8.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qgraph.graph import QModel
from qgraph.lowering.patterns import DEQUANTIZE, QUANTIZE, const

#: elementwise ops with one data input (more inputs are per-tensor constants: scales, bounds)
_UNARY = {"HardSwish", "HardSigmoid", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "Identity",
          "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "GlobalAveragePool",
          DEQUANTIZE, QUANTIZE}
#: channelwise ops with two data inputs: QLinear binary ops (x at 0, y at 3) and float ones
_BINARY_DATA = {"QLinearMul": (0, 3), "QLinearAdd": (0, 3), "Mul": (0, 1), "Add": (0, 1)}


def carry_padded_channels(model: QModel) -> int:
    """Remove the channel Pads and Slices of padded QLinearConvs where the extra channels can be
    carried instead (module docstring); returns the number of Pad and Slice nodes removed. The real
    channels' codes are unchanged."""
    removed = 0
    for node in list(model.graph.nodes):
        if not node.outputs or node.op not in ("Slice", "Pad"):
            continue
        site = _slice_site(node) if node.op == "Slice" else _pad_site(node)
        if site is None:
            continue
        narrow, width = site
        plan = _Widening(model, narrow, width)
        start = node.outputs[0] if node.op == "Slice" else node.inputs[0]
        if plan.tensor(start):
            removed += plan.apply()
    if removed:
        model.cleanup()
    return removed


def _channels(tensor) -> int | None:
    shape = getattr(tensor, "shape", None)
    if shape is None or len(shape) < 2 or not isinstance(shape[1], (int, np.integer)):
        return None
    return int(shape[1])


def _slice_site(node: gs.Node) -> tuple[int, int] | None:
    """(real channels, padded width) of a Slice keeping channels [0, C) of a depthwise QLinearConv's
    output whose channels from C on are padding (weights at the zero point). A model's own Slice
    of channels is left alone (carrying its dropped channels would only cost time), and so is a
    narrow stem's (16 outputs computed for 8): carried, its 8 extra channels double the next
    block's work, which ORT runs no faster (PP-LCNet text direction at batch 8, 60 alternated
    rounds: 0.964x of float with the Slice, 0.992x carried) and the interpreter 14% slower."""
    if len(node.inputs) not in (4, 5):
        return None
    starts, ends, axes = (QModel.constant_value(t) for t in node.inputs[1:4])
    steps = QModel.constant_value(node.inputs[4]) if len(node.inputs) == 5 else np.ones(1, np.int64)
    if any(v is None or np.size(v) != 1 for v in (starts, ends, axes, steps)):
        return None
    start, narrow, axis, step = (int(np.reshape(v, -1)[0]) for v in (starts, ends, axes, steps))
    width = _channels(node.inputs[0])
    if axis != 1 or start != 0 or step != 1 or width is None or not 0 < narrow < width:
        return None
    conv = QModel.producer(node.inputs[0])
    if conv is None or conv.op != "QLinearConv" or not _padded_depthwise(conv, narrow, width):
        return None
    return narrow, width


def _pad_site(node: gs.Node) -> tuple[int, int] | None:
    """(real channels, padded width) of a constant Pad adding channels after the real ones only,
    whose readers are QLinearConvs that give the added channels weights at their zero point."""
    if node.attrs.get("mode", "constant") not in ("constant", b"constant") or len(node.inputs) < 2:
        return None
    pads = QModel.constant_value(node.inputs[1])
    narrow = _channels(node.inputs[0])
    if pads is None or narrow is None:
        return None
    pads = np.asarray(pads).reshape(-1)
    rank = pads.size // 2
    extra = int(pads[rank + 1]) if rank >= 2 else 0
    if extra <= 0 or np.count_nonzero(pads) != 1:
        return None
    width = narrow + extra
    readers = node.outputs[0].outputs
    if not readers or not all(r.op == "QLinearConv" and r.inputs[0] is node.outputs[0]
                              and _ignores_input_channels(r, narrow, width) for r in readers):
        return None
    return narrow, width


#: where a conv's weights and weight zero point are among its inputs
_WEIGHT_SLOTS = {"QLinearConv": (3, 5), "ConvInteger": (1, 3)}


def _weight(conv: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(weights, per-output-channel weight zero points) of a QLinearConv or ConvInteger with
    constant weights (a ConvInteger without a weight zero point has 0)."""
    w_at, wz_at = _WEIGHT_SLOTS[conv.op]
    w = QModel.constant_value(conv.inputs[w_at])
    has_zp = len(conv.inputs) > wz_at and conv.inputs[wz_at].name
    wz = QModel.constant_value(conv.inputs[wz_at]) if has_zp else np.zeros((), None if w is None else w.dtype)
    if w is None or wz is None:
        return None
    return np.asarray(w), np.broadcast_to(np.asarray(wz).reshape(-1), (w.shape[0],))


def _is_depthwise(conv: gs.Node, channels: int) -> bool:
    found = _weight(conv)
    return (found is not None and int(conv.attrs.get("group", 1)) == channels == found[0].shape[0]
            and found[0].shape[1] == 1)


def _ignores_input_channels(conv: gs.Node, narrow: int, width: int) -> bool:
    """Whether the QLinearConv's weights on input channels [narrow, width) are at their zero point
    (a dense conv), or its output channels there are (a padded depthwise conv)."""
    if int(conv.attrs.get("group", 1)) != 1:
        return _padded_depthwise(conv, narrow, width)
    found = _weight(conv)
    if found is None:
        return False
    w, wz = found
    return w.shape[1] == width and bool(np.all(w[:, narrow:] == wz.reshape((-1,) + (1,) * (w.ndim - 1))))


def _padded_depthwise(conv: gs.Node, narrow: int, width: int) -> bool:
    """Whether the conv is depthwise over `width` channels, those from `narrow` on padding: their
    weights at the zero point, so that they compute nothing from their input."""
    found = _weight(conv)
    if found is None:
        return False
    w, wz = found
    return (int(conv.attrs.get("group", 1)) == width == w.shape[0] and w.shape[1] == 1
            and bool(np.all(w[narrow:] == wz[narrow:].reshape((-1,) + (1,) * (w.ndim - 1)))))


class _Widening:
    """One attempt to widen a connected set of tensors from `narrow` to `width` channels: the
    checks run first (tensor), the graph changes only in apply."""

    def __init__(self, model: QModel, narrow: int, width: int):
        self.model, self.narrow, self.width = model, narrow, width
        self.wide: dict[int, gs.Tensor] = {}            # tensors to widen (by id)
        self.nodes: dict[int, gs.Node] = {}             # channelwise nodes seen
        self.out_convs: dict[int, gs.Node] = {}         # convs given extra output channels
        self.in_convs: dict[int, gs.Node] = {}          # dense convs given extra input channels
        self.bypassed: dict[int, gs.Node] = {}          # Slices and Pads to remove

    # -- checks ---------------------------------------------------------------------------
    def tensor(self, t: gs.Tensor) -> bool:
        """Whether `t` (narrow) can carry the extra channels, with everything that follows."""
        if id(t) in self.wide:
            return True
        if isinstance(t, gs.Constant) or _channels(t) != self.narrow or self.model.is_graph_output(t):
            return False
        self.wide[id(t)] = t
        producer = self.model.producer(t)
        if producer is None or not self._produce(producer, t):
            return False
        return all(self._consume(reader, t) for reader in list(t.outputs))

    def _produce(self, node: gs.Node, t: gs.Tensor) -> bool:
        if node.op == "Slice":
            site = _slice_site(node)
            if site != (self.narrow, self.width):
                return False
            self.bypassed[id(node)] = node
            return True
        if node.op == "QLinearConv":
            if _is_depthwise(node, self.narrow):
                return self._channelwise(node)
            if _weight(node) is None or int(node.attrs.get("group", 1)) != 1:
                return False
            self.out_convs[id(node)] = node
            return True
        return self._channelwise(node)

    def _consume(self, node: gs.Node, t: gs.Tensor) -> bool:
        if node.op == "Pad":
            if _pad_site(node) != (self.narrow, self.width) or node.inputs[0] is not t:
                return False
            self.bypassed[id(node)] = node
            return True
        if node.op in _WEIGHT_SLOTS and node.inputs[0] is t:
            if node.op == "QLinearConv" and _is_depthwise(node, self.narrow):
                return self._channelwise(node)
            found = _weight(node)
            if found is None or int(node.attrs.get("group", 1)) != 1 or found[0].shape[1] != self.narrow:
                return False
            self.in_convs[id(node)] = node
            return True
        return self._channelwise(node)

    def _channelwise(self, node: gs.Node) -> bool:
        """A channelwise node: every data input and output is widened."""
        if id(node) in self.nodes:
            return True
        if node.op == "QLinearConv":
            data = [node.inputs[0]]
            if len(node.inputs) > 8 and QModel.constant_value(node.inputs[8]) is None:
                return False
        elif node.op in _UNARY:
            data = [node.inputs[0]]
            if any(QModel.constant_value(t) is None or np.size(QModel.constant_value(t)) != 1
                   for t in node.inputs[1:] if t.name):
                return False                  # per-channel scales or bounds: not handled
        elif node.op in _BINARY_DATA:
            slots = _BINARY_DATA[node.op]
            data = [node.inputs[i] for i in slots]
            if any(QModel.constant_value(t) is None or np.size(QModel.constant_value(t)) != 1
                   for i, t in enumerate(node.inputs) if i not in slots and t.name):
                return False
            if any(isinstance(t, gs.Constant) for t in data):
                return False
        else:
            return False
        if len(node.outputs) != 1 or node.attrs.get("channels_last", 0):
            return False
        self.nodes[id(node)] = node
        return all(self.tensor(t) for t in data + list(node.outputs))

    # -- changes --------------------------------------------------------------------------
    def apply(self) -> int:
        extra = self.width - self.narrow
        for t in self.wide.values():
            t.shape = [t.shape[0], self.width, *t.shape[2:]]
        for conv in self.out_convs.values():
            _add_output_channels(self.model, conv, extra)
        for conv in (n for n in self.nodes.values() if n.op == "QLinearConv"):
            _add_output_channels(self.model, conv, extra)          # a depthwise conv: groups too
            conv.attrs["group"] = self.width
        for conv in self.in_convs.values():
            _add_input_channels(self.model, conv, extra)
        for node in self.bypassed.values():
            kept, dropped = (node.inputs[0], node.outputs[0])
            for reader in list(dropped.outputs):
                for i, t in enumerate(list(reader.inputs)):
                    if t is dropped:
                        reader.inputs[i] = kept
            node.outputs.clear()
        return len(self.bypassed)


def _per_channel(model: QModel, conv: gs.Node, slot: int, extra: int, fill, label: str) -> None:
    """Extend the conv's per-channel constant at input `slot` by `extra` values of `fill` (a
    per-tensor scalar stays as it is)."""
    value = QModel.constant_value(conv.inputs[slot])
    if value is None or np.ndim(value) == 0:
        return
    value = np.asarray(value).reshape(-1)
    conv.inputs[slot] = const(model, f"{conv.name}_{label}_widened",
                              np.concatenate([value, np.full(extra, fill, value.dtype)]))


def _add_output_channels(model: QModel, conv: gs.Node, extra: int) -> None:
    """Extra output channels of weights at the zero point, the first channel's scale, bias 0."""
    w, wz = _weight(conv)
    pad = np.full((extra, *w.shape[1:]), wz[0], w.dtype)
    scale = np.asarray(QModel.constant_value(conv.inputs[4])).reshape(-1)
    conv.inputs[3] = const(model, f"{conv.name}_w_widened", np.concatenate([w, pad]))
    _per_channel(model, conv, 4, extra, scale[0], "w_scale")
    _per_channel(model, conv, 5, extra, wz[0], "w_zero_point")
    if len(conv.inputs) > 8 and conv.inputs[8].name:
        _per_channel(model, conv, 8, extra, 0, "bias")


def _add_input_channels(model: QModel, conv: gs.Node, extra: int) -> None:
    """Extra input channels of a dense conv, their weights at each output channel's zero point."""
    w, wz = _weight(conv)
    fill = np.broadcast_to(wz.astype(w.dtype).reshape((-1,) + (1,) * (w.ndim - 1)),
                           (w.shape[0], extra, *w.shape[2:]))
    conv.inputs[_WEIGHT_SLOTS[conv.op][0]] = const(model, f"{conv.name}_w_wide_input",
                                                   np.concatenate([w, fill], axis=1))
