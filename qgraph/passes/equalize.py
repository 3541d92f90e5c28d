"""equalize: cross-layer equalization with optional high-bias absorption (Nagel et al. 2019).

ReLU is positive-homogeneous, f(x/s) = f(x)/s for s > 0, so for a chain
L1 → [BN] → [Relu|LeakyRelu|PRelu|Clip(0, ∞)|nothing] → L2 scaling output channel i of L1
by 1/sᵢ and input channel i of L2 by sᵢ leaves the outputs unchanged. With rᵢ the
per-channel weight range (max |w|, measured on the *folded* weight W·γ/√(σ²+ε) when a BN
follows), sᵢ = √(r1ᵢ/r2ᵢ) makes both ranges √(r1ᵢ·r2ᵢ). For L1 → depthwise → L3 the
depthwise conv carries both scales: s12 = r1/∛(r1r2r3), s23 = ∛(r1r2r3)/r3 make all three
ranges ∛(r1r2r3). Sets are re-scaled in rounds until no scale moves by more than 1e-8
(or `iterations` rounds). A zero-range channel gets sᵢ = 1. `threshold` clamps each
link's accumulated sᵢ into [1/threshold, threshold] (0 = off): a tiny r1ᵢ would otherwise
multiply that activation channel by 1/sᵢ ≫ 1 and wreck per-tensor activation ranges.

Design decisions:
- BN after L1 (or after the depthwise conv) is scaled, not the conv: γ and β are multiplied
  by 1/sᵢ, which scales the BN output exactly (the conv and the BN's ε are untouched).
  A later fuse_conv_bn fold then yields exactly the equalized weights. Run CLE on a model
  with BNs (or after bn_restore), not after folding, to keep β and γ for absorption.
- Clip(0, 6) (ReLU6) is not positive-homogeneous and ONNX Clip bounds are scalars, so no
  per-channel rescaling keeps it exact: such links are skipped with a reason (AIMET instead
  replaces ReLU6 by ReLU, which changes outputs). Grouped non-depthwise convs, shared or
  non-constant weights, Gemm with transA/alpha/beta ≠ defaults are skipped with a reason.
- High-bias absorption (Nagel §4.2, as AIMET's HighBiasFold): where a BN precedes the
  activation, cᵢ = max(0, β'ᵢ − 3|γ'ᵢ|) (β', γ' after scaling) is subtracted from β and
  b2 += Σ_{taps} W2[:, i]·cᵢ is added to L2's bias. Through Relu this is exact only where the
  pre-activation is ≥ cᵢ (the 3σ rule: nearly always), and a zero-padded L2 would get the
  wrong correction at borders, so absorption is skipped there (reported only when some cᵢ > 0).
  AIMET absorbs into padded convs anyway; that option is not offered because on bn_restore'd
  RepVGG (β = μ, γ = σ of the pre-activation) no channel has μ > 3σ (largest μ/σ 0.4 in
  benchmarks/cle.py), so there is nothing to absorb. Because it is a heuristic
  (measured: 1.1e-3 relative output change on a 1x1-conv net whose BN statistics do not
  match the data),
  `high_bias_absorption` defaults to false and the pass's 1e-4 tolerance is the contract
  with it off; with it on, the report gives the number of absorbed channels.

The tensors between linked layers are listed in the `qgraph.rescaled` annotation with their
factors (axis 1), so that `qgraph analyze` compares them with the float model's divided the same
way (an absorbed high bias also shifts them; that shift is not recorded).

Invariant: outputs unchanged up to float rounding (tolerance 1e-4) with
high_bias_absorption off; with it on, unchanged wherever every pre-activation is ≥ cᵢ.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import onnx_graphsurgeon as gs

from qgraph.annotations import record_rescaled
from qgraph.errors import ConfigError, PassError
from qgraph.graph import QModel
from qgraph.idioms import Declined, bn_scale, clip_bounds, skip
from qgraph.pipeline import PassContext, register_pass
from qgraph.schema import Range

_LAYER_OPS = ("Conv", "Gemm")
_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
_CONVERGED = 1e-8
_HBA_SIGMAS = 3.0


@register_pass("equalize", preserves_outputs=True, tolerance=1e-4)
def equalize(model: QModel, ctx: PassContext, *, iterations: Annotated[int, Range(1, 1000)] = 20,
             threshold: Annotated[float, Range(0.0)] = 100.0,
             high_bias_absorption: bool = False) -> dict:
    """Cross-layer equalization of Conv/Gemm pairs and Conv→DWConv→Conv triplets (Nagel 2019)."""
    if not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"equalize: iterations must be an integer >= 1, got {iterations!r}")
    if threshold < 0 or (0 < threshold < 1):
        raise ConfigError(f"equalize: threshold must be 0 (off) or >= 1, got {threshold}")
    skipped: list[dict] = []
    layers = find_layers(model, skipped)
    sets = find_cls_sets(model, layers, skipped)
    if not sets:
        return {"changed": 0, "summary": "nothing to equalize: no Conv/Gemm chains with scalable links",
                "skipped": skipped, "warnings": [], "sets": [], "rounds": 0}
    before = [set_spread(s) for s in sets]
    layer_before = {layer.node.name: layer.out_spread() for s in sets for layer in s.layers}
    rounds = 0
    for rounds in range(1, iterations + 1):
        moved = max(s.scale_once(threshold) for s in sets)
        if moved < _CONVERGED:
            break
    touched = {id(layer): layer for s in sets for layer in s.layers}
    for layer in touched.values():
        layer.write_back()
    record_rescaled(model, {tensor: link.total for s in sets for link in s.links for tensor in link.chain_tensors()}, 1)
    absorbed = 0
    if high_bias_absorption:
        for s in sets:
            for link in s.links:
                absorbed += absorb_high_bias(model, link, skipped)
    model.cleanup()
    report_sets = [{"layers": [layer.node.name for layer in s.layers],
                    "spread_before": round(b, 4), "spread_after": round(set_spread(s), 4)}
                   for s, b in zip(sets, before)]
    report_layers = {layer.node.name: [round(layer_before[layer.node.name], 4), round(layer.out_spread(), 4)]
                     for layer in touched.values()}
    clamped = sum(s.clamped(threshold) for s in sets)
    warnings = [f"{clamped} channel scales hit threshold {threshold:g}"] if clamped else []
    summary = (f"{len(sets)} sets equalized in {rounds} rounds; worst spread "
               f"{max(before):.3g} -> {max(set_spread(s) for s in sets):.3g}"
               + (f"; {absorbed} channels' high bias absorbed" if high_bias_absorption else ""))
    return {"changed": len(touched), "summary": summary, "skipped": skipped, "warnings": warnings,
            "sets": report_sets, "layer_spread": report_layers, "rounds": rounds,
            "absorbed_channels": absorbed}


# -- layers ------------------------------------------------------------------------------

class Layer:
    """One Conv/Gemm as CLE sees it: per-(out, in) channel max |w| of the folded weight (float32),
    and float64 scales accumulated on its output and input channels, written to the tensors at
    the end. Row/column maxima are cached until the scales they depend on change."""

    def __init__(self, node: gs.Node, kind: str, weight: gs.Constant, bias: gs.Constant | None,
                 bn: gs.Node | None, out_axis: int, in_axis: int):
        self.node, self.kind, self.weight, self.bias, self.bn = node, kind, weight, bias, bn
        self.out_axis, self.in_axis = out_axis, in_axis
        shape = weight.shape
        self.out_scale = np.ones(shape[out_axis])
        self.in_scale = np.ones(shape[out_axis] if kind == "dw" else shape[in_axis])
        self.version = 0
        self._absmax = None
        self._row = self._col = None

    @property
    def absmax(self) -> np.ndarray:
        if self._absmax is None:
            w = np.moveaxis(np.asarray(self.weight.values), (self.out_axis, self.in_axis), (0, 1))
            absmax = abs_max_over_taps(w)
            if not np.all(np.isfinite(absmax)):  # max propagates NaN and Inf
                raise PassError(f"equalize: weight '{self.weight.name}' of '{self.node.name}' contains NaN/Inf")
            fold = np.abs(bn_fold_factor(self.bn)) if self.bn is not None else None
            if self.kind == "dw":
                absmax = absmax[:, 0] * (fold if fold is not None else 1.0)
            elif fold is not None:
                absmax = absmax * fold[:, None]
            self._absmax = np.asarray(absmax, dtype=np.float32)
        return self._absmax

    @property
    def out_channels(self) -> int:
        return self.out_scale.size

    @property
    def in_channels(self) -> int:
        return self.in_scale.size

    def scale_out(self, factor: np.ndarray) -> None:
        self.out_scale *= factor
        self._col = None
        self.version += 1

    def scale_in(self, factor: np.ndarray) -> None:
        self.in_scale *= factor
        self._row = None
        self.version += 1

    def current(self) -> np.ndarray:
        """Depthwise only: the per-channel range (input and output channel are the same)."""
        return self.absmax * self.out_scale * self.in_scale

    def out_range(self) -> np.ndarray:
        if self.kind == "dw":
            return self.current()
        if self._row is None:
            self._row = (self.absmax * self.in_scale[None, :]).max(axis=1)
        return self._row * self.out_scale

    def in_range(self) -> np.ndarray:
        if self.kind == "dw":
            return self.current()
        if self._col is None:
            self._col = (self.absmax * self.out_scale[:, None]).max(axis=0)
        return self._col * self.in_scale

    def out_spread(self) -> float:
        return spread(self.out_range())

    def write_back(self) -> None:
        """Apply the accumulated scales: input scales to the weight; output scales to the BN's
        γ and β when a BN follows, else to the weight and bias."""
        w = np.array(self.weight.values)
        moved = np.moveaxis(w, (self.out_axis, self.in_axis), (0, 1))  # a view: scaling it scales w
        extra = (1,) * (moved.ndim - 2)
        out = self.out_scale if self.bn is None else np.ones_like(self.out_scale)
        if self.kind == "dw":
            factor = (out * self.in_scale).reshape((-1, 1) + extra)
        else:
            factor = np.multiply.outer(out, self.in_scale).reshape(moved.shape[:2] + extra)
        moved *= factor.astype(w.dtype)
        self.weight.values = w
        if self.bn is None:
            if self.bias is not None:
                self.bias.values = _scaled(self.bias, self.out_scale, self.out_channels)
        else:
            for param in self.bn.inputs[1:3]:  # scale (γ) and B (β)
                param.values = _scaled(param, self.out_scale, self.out_channels)


def abs_max_over_taps(w: np.ndarray) -> np.ndarray:
    """max |w| over axes 2.. of an (O, C, taps...) array; one np.maximum per tap is ~3x faster
    than a NumPy reduction over a short trailing axis."""
    if w.ndim == 2:
        return np.abs(w)
    flat = np.abs(w).reshape(w.shape[0] * w.shape[1], -1)
    result = flat[:, 0].copy()
    for k in range(1, flat.shape[1]):
        np.maximum(result, flat[:, k], out=result)
    return result.reshape(w.shape[:2])


def _scaled(tensor: gs.Constant, factor: np.ndarray, channels: int) -> np.ndarray:
    values = np.asarray(tensor.values)
    dtype = values.dtype
    flat = np.broadcast_to(values.astype(np.float64).reshape(-1), (channels,)) if values.size == 1 \
        else values.astype(np.float64).reshape(-1)
    return (flat * factor).astype(dtype)


def bn_fold_factor(bn: gs.Node) -> np.ndarray:
    """γ/√(σ²+ε) per channel."""
    gamma, _, _, var = (np.asarray(t.values, dtype=np.float64) for t in bn.inputs[1:5])
    eps = float(bn.attrs.get("epsilon", 1e-5))
    for t in bn.inputs[1:5]:
        if not np.all(np.isfinite(np.asarray(t.values))):
            raise PassError(f"equalize: BatchNormalization '{bn.name}' parameter '{t.name}' contains NaN/Inf")
    return bn_scale(gamma, var, eps)


def spread(ranges: np.ndarray) -> float:
    """max/min of the non-zero per-channel ranges (1 when fewer than one is non-zero)."""
    nonzero = ranges[ranges > 0]
    return float(nonzero.max() / nonzero.min()) if nonzero.size else 1.0


def _single_use_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1


def layer_kind(model: QModel, node: gs.Node) -> Layer:
    """A Layer for `node`; Declined says why it cannot be scaled."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or not isinstance(weight, gs.Constant):
        name = weight.name if weight is not None else "?"
        raise Declined(f"weight '{name}' is not an initializer (graph input or computed); CLE needs constant weights")
    if len(weight.outputs) != 1:
        raise Declined(f"weight '{weight.name}' is shared with other nodes")
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None and not _single_use_constant(bias):
        raise Declined(f"bias '{bias.name}' is not a constant used only here")
    shape = weight.shape
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        if len(shape) < 3:
            raise Declined(f"weight '{weight.name}' has rank {len(shape)}")
        if group == 1:
            kind = "conv"
        elif shape[1] == 1 and group == shape[0]:
            kind = "dw"
        else:
            raise Declined(f"grouped conv (group={group}) that is not depthwise is not handled")
        out_axis, in_axis = 0, 1
    else:
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0:
            raise Declined("Gemm with transA or alpha/beta != 1 is not handled")
        if len(shape) != 2:
            raise Declined(f"Gemm weight '{weight.name}' has rank {len(shape)}")
        kind = "gemm"
        out_axis, in_axis = (0, 1) if node.attrs.get("transB", 0) else (1, 0)
    bn = following_bn(model, node)
    if bias is not None and bn is None and bias.values.size not in (1, shape[out_axis]):
        raise Declined(f"bias '{bias.name}' does not broadcast per output channel")
    return Layer(node, kind, weight, bias, bn, out_axis, in_axis)


def following_bn(model: QModel, node: gs.Node) -> gs.Node | None:
    """The BatchNormalization that alone reads `node`'s output, with constant single-use params."""
    nxt = model.only_consumer(node.outputs[0])
    if nxt is None or nxt.op != "BatchNormalization" or len(nxt.outputs) != 1:
        return None
    if nxt.attrs.get("training_mode", 0):
        return None
    if not all(_single_use_constant(t) for t in nxt.inputs[1:5]):
        return None
    return nxt


def find_layers(model: QModel, skipped: list[dict]) -> dict[str, Layer]:
    layers = {}
    for node in model.graph.nodes:
        if node.op not in _LAYER_OPS:
            continue
        try:
            layers[node.name] = layer_kind(model, node)
        except Declined as declined:
            skipped.append(skip(node, declined.reason))
    return layers


# -- chains ------------------------------------------------------------------------------

class Link:
    """L1 → [BN] → [activation] → L2 where every intermediate tensor has one reader."""

    def __init__(self, first: Layer, second: Layer, activation: gs.Node | None):
        self.first, self.second, self.activation = first, second, activation
        self.total = np.ones(first.out_channels)  # accumulated scale sᵢ of this link

    def apply(self, s: np.ndarray) -> None:
        self.first.scale_out(1.0 / s)
        self.second.scale_in(s)
        self.total *= s

    def chain_tensors(self) -> list[str]:
        """The tensors between the two layers, each now divided by `total` along axis 1: the
        first layer's output (its BN's, when the BN carries the scale) and the activation's."""
        names = [(self.first.bn or self.first.node).outputs[0].name]
        return names + ([self.activation.outputs[0].name] if self.activation is not None else [])


class ClsSet:
    """A pair (one link) or a depthwise triplet (two links through the middle layer)."""

    def __init__(self, links: list[Link]):
        self.links = links
        self.layers = [links[0].first] + [link.second for link in links]
        self._seen: tuple | None = None  # layer versions right after this set last scaled them

    def scale_once(self, threshold: float) -> float:
        """One equalization step; returns the largest |log sᵢ| applied (0 when no layer of the
        set changed since its last step, which would recompute sᵢ = 1)."""
        if self._seen == tuple(layer.version for layer in self.layers):
            return 0.0
        moved = self._step(threshold)
        self._seen = tuple(layer.version for layer in self.layers)
        return moved

    def _step(self, threshold: float) -> float:
        if len(self.links) == 1:
            link = self.links[0]
            r1, r2 = link.first.out_range(), link.second.in_range()
            ok = (r1 > 0) & (r2 > 0)
            s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)
            return _apply_clamped(link, s, threshold)
        a, b = self.links
        r1, r2, r3 = a.first.out_range(), a.second.current(), b.second.in_range()
        ok = (r1 > 0) & (r2 > 0) & (r3 > 0)
        safe = lambda r: np.where(ok, r, 1.0)  # noqa: E731
        cube = np.cbrt(safe(r1) * safe(r2) * safe(r3))
        s12 = np.where(ok, safe(r1) / cube, 1.0)
        s23 = np.where(ok, cube / safe(r3), 1.0)
        return max(_apply_clamped(a, s12, threshold), _apply_clamped(b, s23, threshold))

    def clamped(self, threshold: float) -> int:
        """Channels whose accumulated scale sits at the threshold."""
        if not threshold:
            return 0
        bound = math.log(threshold)
        return sum(int(np.sum(np.isclose(np.abs(np.log(link.total)), bound))) for link in self.links)


def _apply_clamped(link: Link, s: np.ndarray, threshold: float) -> float:
    if threshold:
        wanted = np.clip(link.total * s, 1.0 / threshold, threshold)
        s = wanted / link.total
    link.apply(s)
    return float(np.max(np.abs(np.log(s)))) if s.size else 0.0


def set_spread(s: ClsSet) -> float:
    """Worst spread among the equalized channel ranges of the set (L1 out, middle, L3 in)."""
    first, last = s.layers[0], s.layers[-1]
    values = [spread(first.out_range()), spread(last.in_range())]
    values += [spread(layer.current()) for layer in s.layers[1:-1]]
    return max(values)


def next_link(model: QModel, layer: Layer, layers: dict[str, Layer]) -> tuple[Layer, gs.Node | None] | None:
    """The layer fed by `layer` through [BN] [activation], and the activation node; None when
    there is nothing to pair with (a branch, a graph output, a non-layer, a layer already
    reported); Declined when a pairing exists but cannot be scaled exactly."""
    tensor = (layer.bn or layer.node).outputs[0]
    node = model.only_consumer(tensor)
    if node is None:
        return None
    activation = None
    if node.op in _HOMOGENEOUS or node.op == "Clip":
        _check_activation(node)
        activation = node
        node = model.only_consumer(node.outputs[0])
        if node is None:
            return None
    if node.op not in _LAYER_OPS:
        return None
    second = layers.get(node.name)
    if second is None:
        return None
    if (layer.kind == "gemm") != (second.kind == "gemm"):
        raise Declined(f"cannot pair {layer.node.op} with {node.op} '{node.name}'")
    if node.inputs[0] is not (activation.outputs[0] if activation is not None else tensor):
        raise Declined(f"'{node.name}' reads the chain tensor as its weight, not its input")
    if second.in_channels != layer.out_channels:
        raise Declined(f"channel count mismatch with '{node.name}'")
    return second, activation


def _check_activation(node: gs.Node) -> None:
    """Declined unless the activation is positive-homogeneous (f(s·x) = s·f(x) for s > 0)."""
    if node.op == "PRelu":
        if not isinstance(node.inputs[1], gs.Constant):
            raise Declined("PRelu slope is not constant")
        return
    if node.op != "Clip":
        return
    low, high = clip_bounds(node)
    if math.isfinite(high):
        raise Declined(f"Clip '{node.name}' ({low:g}, {high:g}) has a finite upper bound: not positive-homogeneous, "
                       "and ONNX Clip bounds are scalars so no per-channel rescale keeps it exact")
    if low not in (0.0, -math.inf):
        raise Declined(f"Clip '{node.name}' lower bound {low:g} is neither 0 nor -inf: not positive-homogeneous")


def find_cls_sets(model: QModel, layers: dict[str, Layer], skipped: list[dict]) -> list[ClsSet]:
    """Pairs and depthwise triplets, in graph order; each link belongs to one set (AIMET's rule)."""
    links: dict[str, Link] = {}
    for name, layer in layers.items():
        try:
            found = next_link(model, layer, layers)
        except Declined as declined:
            skipped.append(skip(name, declined.reason))
            continue
        if found is not None:
            links[name] = Link(layer, *found)
    sets, used = [], set()
    for name in layers:  # graph order (QModel keeps nodes toposorted)
        link = links.get(name)
        if link is None or name in used:
            continue
        middle = link.second
        after = links.get(middle.node.name)
        if middle.kind == "dw" and link.first.kind != "dw" and after is not None and after.second.kind == "conv":
            sets.append(ClsSet([link, after]))
            used.update((name, middle.node.name))
        else:
            sets.append(ClsSet([link]))
            used.add(name)
    return sets


# -- high-bias absorption ----------------------------------------------------------------

def absorb_high_bias(model: QModel, link: Link, skipped: list[dict]) -> int:
    """Move cᵢ = max(0, β − 3|γ|) of L1's BN into L2's bias; returns the channels absorbed."""
    first, second = link.first, link.second
    bn = first.bn
    if bn is None:
        return 0
    gamma, beta = (np.asarray(t.values, dtype=np.float64) for t in bn.inputs[1:3])
    c = np.maximum(0.0, beta - _HBA_SIGMAS * np.abs(gamma))
    if not np.any(c > 0):
        return 0  # no channel has β > 3|γ|: nothing to absorb, nothing to report
    if second.kind != "gemm" and _pads(second.node):
        skipped.append(skip(second.node, f"high-bias absorption {first.node.name}->{second.node.name} skipped "
                            f"({int(np.sum(c > 0))} channels): zero padding would make the absorbed bias wrong "
                            "at the borders"))
        return 0
    w = np.moveaxis(np.asarray(second.weight.values, dtype=np.float64), (second.out_axis, second.in_axis), (0, 1))
    taps = w.sum(axis=tuple(range(2, w.ndim))) if w.ndim > 2 else w
    delta = taps[:, 0] * c if second.kind == "dw" else taps @ c
    bn.inputs[2].values = (beta - c).astype(np.asarray(bn.inputs[2].values).dtype)
    add_to_bias(model, second, delta)
    return int(np.sum(c > 0))


def _pads(node: gs.Node) -> bool:
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return auto not in ("NOTSET", "VALID") or any(int(p) for p in node.attrs.get("pads", []))


def add_to_bias(model: QModel, layer: Layer, delta: np.ndarray) -> None:
    """bias += delta, creating the bias input when the layer has none."""
    if layer.bias is not None:
        values = np.asarray(layer.bias.values)
        new = np.broadcast_to(values.astype(np.float64).reshape(-1), delta.shape) + delta
        layer.bias.values = new.astype(values.dtype)
        return
    layer.bias = model.add_constant(f"{layer.node.name}.bias", delta.astype(np.float32))
    layer.node.inputs.append(layer.bias)
