"""equalize_activations: per-channel activation ranges equalized through a HardSwish into the
depthwise convolution that reads it, exactly.

    L1 (Conv) → x → y = HardSwish(x) → L2 (depthwise Conv)

Per output channel c, with r_c the largest |y_c| and q_c the largest |x_c| on the calibration
data, and s_c = max(r_c / max r, q_c / max q, 1 / max_gain) <= 1:

    W1[c], b1[c]  ÷ s_c                        x'_c = x_c / s_c
    y'_c = x'_c · HardSigmoid(s_c·x'_c) = x'_c · Clip(s_c·x'_c + 3, 0, 6) / 6 = HardSwish(x_c) / s_c
    W2[c]         × s_c                        L2's output unchanged

HardSwish is not positive-homogeneous, so cross-layer equalization (the `equalize` pass) cannot
scale through it; written with its slope per channel it can. Both weights are quantized per
output channel (a depthwise conv's output channel is its input channel), so they absorb the
factors at no cost, and the two activations x' and y' — one per-tensor grid each — see channels
of equal range instead of ranges 1000 times apart. That is what breaks int8 PTQ of
PP-PicoDet-style MobileNets (benchmarks/zoo_models.py `layout_cdla`: its stem's HardSwish output
holds channels of std 0.01 next to channels of 35, which one 8-bit step of 0.14 erases and the
depthwise conv + folded BN after it amplify): with this pass before `ptq`'s insert_qdq, its
worst output cosine to float goes 0.678 → 0.970 and 34 → 53 of 53 float boxes (16 calibration /
32 evaluation sheets). The q term keeps x' within x's own largest channel: HardSwish flattens
x < -3 to 0, so a channel with a small output can have a large input, and scaling it by r alone
widened x''s grid for every channel (the same layout_cdla run with r alone: 0.933, 47 of 53).

The rewritten activation has a per-channel constant, so it is no longer one unary region: the
slope's Mul, the gate (one HardSigmoid op) and the product are quantized and lowered op by op
(the gate reads the unscaled s·x', whose coarse grid matters little: the gate is ~0.5 wherever a
small channel lives). `max_gain` bounds 1/s_c; channels that never leave 0 keep s_c = 1. A site
where no channel would gain `min_gain` (16: a channel at 1/16 of the largest keeps 16 of the
grid's 256 steps) is left alone: there the three quantized ops cost more than the equalization
gains (untrained PP-LCNet/SVTR builders, whose channels sit within 3-12x of each other: worst
cosine 0.766 → 0.605 and 0.358 → 0.151 when every site is equalized, unchanged with the guard).

Sites: HardSwish ops and exported HardSwish regions (idioms.unary_regions, kind hardswish, checked
against HardSwish on a probe) whose input is written by a Conv with constant weights read by
nothing else, and whose output is read only by a depthwise Conv with constant weights. Run after
fuse_conv_bn (BatchNormalization folded into L1 and L2) and before insert_qdq; needs calibration
data where it finds a site. The divided tensors are recorded in `qgraph.rescaled` for analyze.

Invariant: outputs unchanged up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np

from qgraph.annotations import record_rescaled
from qgraph.graph import QModel
from qgraph.idioms import Declined, evaluate_function, skip, unary_regions
from qgraph.pipeline import PassContext, register_pass
from qgraph.quant import EQUALIZE_MIN_GAIN
from qgraph.schema import Range

#: Where a site's activation is compared with HardSwish before it is rewritten.
_PROBE = np.linspace(-8, 8, 1025, dtype=np.float32)


@dataclass
class _Site:
    producer: object        # L1, the Conv writing x
    x: object               # the activation's input
    y: object               # its output, read by L2 alone
    nodes: list             # the activation's nodes (one HardSwish, or an exported region)
    reader: object          # L2, the depthwise Conv


@register_pass("equalize_activations", preserves_outputs=True, tolerance=1e-4)
def equalize_activations(model: QModel, ctx: PassContext, *, max_gain: Annotated[float, Range(1.0)] = 1000.0,
                         min_gain: Annotated[float, Range(1.0)] = EQUALIZE_MIN_GAIN,
                         max_samples: Annotated[int, Range(1)] = 64) -> dict:
    """Equalize the channels of Conv → HardSwish → depthwise Conv activations (see the module docstring)."""
    sites, skipped = _find_sites(model)
    if not sites:
        return {"changed": 0, "summary": "no Conv → HardSwish → depthwise Conv", "skipped": skipped, "warnings": []}
    ctx.require_data("equalize_activations")
    ranges = _channel_ranges(model, ctx, [t.name for site in sites for t in (site.x, site.y)], max_samples)
    divided, gains = {}, []
    for site in sites:
        r, q = ranges[site.y.name], ranges[site.x.name]
        if r.max() <= 0:
            skipped.append(skip(site.reader, "the activation is 0 on every calibration input"))
            continue
        s = np.where(r > 0, np.maximum.reduce([r / r.max(), q / q.max(), np.full_like(r, 1.0 / max_gain)]), 1.0)
        gain = float(1.0 / s.min())
        if gain < min_gain:
            skipped.append(skip(site.reader, f"no channel would gain {min_gain:g}x"))
            continue
        divided.update(_apply(model, site, s))
        gains.append(gain)
    model.cleanup()
    record_rescaled(model, divided, 1)
    summary = (f"{len(gains)} HardSwish activations equalized into depthwise convs (largest channel gain "
               f"{max(gains):.0f}x)" if gains else "no site with a live activation")
    return {"changed": len(gains), "summary": summary, "skipped": skipped, "warnings": []}


def _find_sites(model: QModel) -> tuple[list[_Site], list[dict]]:
    regions = {r.output: r for r in unary_regions(model) if r.kind == "hardswish"}
    sites, skipped = [], []
    for node in model.graph.nodes:
        if node.op == "HardSwish":
            nodes, x, y = [node], node.inputs[0], node.outputs[0]
        elif node.outputs and node.outputs[0].name in regions:
            region = regions[node.outputs[0].name]
            nodes = [model.node(name) for name in region.nodes]
            x, y = model.tensor(region.input), node.outputs[0]
        else:
            continue
        try:
            sites.append(_site(model, nodes, x, y))
        except Declined as exc:
            skipped.append(skip(node, exc.reason))
    return sites, skipped


def _site(model: QModel, nodes: list, x, y) -> _Site:
    readers = list(y.outputs)
    if len(readers) != 1 or not _depthwise(readers[0]) or readers[0].inputs[0] is not y:
        raise Declined("not read by one depthwise Conv alone")
    producer = QModel.producer(x)
    if producer is None or producer.op != "Conv" or not _constant_weights(producer):
        raise Declined("its input is not written by a Conv with constant weights")
    if any(reader not in nodes for reader in x.outputs):
        raise Declined("its input is read elsewhere too")
    if len(nodes) > 1:
        got = evaluate_function(nodes, x.name, y.name, _PROBE)
        if not np.allclose(got, _PROBE * np.clip(_PROBE + 3, 0, 6) / 6, rtol=0, atol=1e-5):
            raise Declined("the region is not HardSwish (an affine after it, or other constants)")
    return _Site(producer, x, y, nodes, readers[0])


def _depthwise(node) -> bool:
    if node.op != "Conv" or not _constant_weights(node):
        return False
    weight = QModel.constant_value(node.inputs[1])
    return weight.ndim >= 3 and weight.shape[1] == 1 and int(node.attrs.get("group", 1)) == weight.shape[0]


def _constant_weights(node) -> bool:
    return all(QModel.constant_value(t) is not None and len(t.outputs) == 1 for t in node.inputs[1:] if t.name)


def _channel_ranges(model: QModel, ctx: PassContext, names: list[str], max_samples: int) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) max |value| of each tensor over the calibration data."""
    from qgraph.runner import Runner
    proto = model.to_onnx()
    runner = Runner(proto, names)
    ranges: dict[str, np.ndarray] = {}
    for feeds in ctx.batches(proto, max_samples):
        for name, value in runner.run(feeds, names).items():
            per_channel = np.abs(value).max(axis=tuple(a for a in range(value.ndim) if a != 1)).astype(np.float64)
            ranges[name] = np.maximum(ranges.get(name, 0.0), per_channel)
    return ranges


def _apply(model: QModel, site: _Site, s: np.ndarray) -> dict[str, np.ndarray]:
    """Divide L1's channels by s, write the activation with its slope s per channel, multiply
    L2's channels by s; return the tensors now divided by s."""
    def along_channels(value):                   # s on a weight's output-channel axis 0
        return s.reshape(-1, *[1] * (value.ndim - 1))
    _replace_constant(model, site.producer, 1, "equalized_w", lambda w: w / along_channels(w))
    if len(site.producer.inputs) > 2 and site.producer.inputs[2].name:
        _replace_constant(model, site.producer, 2, "equalized_b", lambda b: b / s)
    _replace_constant(model, site.reader, 1, "equalized_w", lambda w: w * along_channels(w))
    # y' = x' · HardSigmoid(s·x') (α = 1/6, β = 1/2: Clip(s·x' + 3, 0, 6) / 6), in place of the activation
    for node in site.nodes:
        node.outputs.clear()
        node.inputs.clear()
    name = site.nodes[-1].name or model.unique_name("hardswish")
    rank = np.ndim(QModel.constant_value(site.reader.inputs[1]))      # the maps' rank, as the convs' weights
    slope = model.add_constant(f"{name}_slope", s.reshape(1, -1, *[1] * (rank - 2)).astype(np.float32))
    unscaled, gate = model.add_variable(f"{name}_unscaled", np.float32), model.add_variable(f"{name}_gate", np.float32)
    model.add_node("Mul", [site.x, slope], [unscaled], f"{name}_unscaled")
    model.add_node("HardSigmoid", [unscaled], [gate], f"{name}_gate", {"alpha": 1.0 / 6.0, "beta": 0.5})
    model.add_node("Mul", [site.x, gate], [site.y], f"{name}_product")
    return {site.x.name: s, site.y.name: s}


def _replace_constant(model: QModel, node, index: int, label: str, update) -> None:
    """Input `index` of `node` (a constant) becomes ``update(value)``, computed in float64."""
    value = QModel.constant_value(node.inputs[index]).astype(np.float64)
    node.inputs[index] = model.add_constant(f"{node.name}_{label}", update(value).astype(np.float32))
