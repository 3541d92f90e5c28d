"""bias_correction: empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2).

    E[y_q]_c − E[y]_c = ε_c      (per output channel c, over the calibration data)
    b_c ← b_c − ε_c

Quantizing weights (and the activations before a layer) shifts the mean of the layer's output:
ε = E[W̃x̃] − E[Wx] is a biased error that every later layer inherits. The empirical form
measures it: the QDQ model and its float form (every quantizer bypassed, qparams.bypassed) run
on the calibration data, and each Conv/Gemm output's per-channel mean difference is subtracted
from that layer's float bias (a zero bias is added where the layer has none). A correction
changes the inputs of every later layer, so layers are corrected in waves, in order: a wave
holds the layers with the same number of corrected layers upstream, and is measured on the
model with every earlier wave corrected (correcting all layers from one measurement
overshoots through the ReLUs and diverges). `iterations` repeats the sweep.

The float reference is measured once, before any bias changes (the float form shares the
biases): run the pass once per model, with more `iterations` rather than twice.

The correction is kept only if it brings the graph outputs closer to float on the calibration
data (output SNR, every output): matching each layer's mean can still move the outputs away
(measured: nudenet's YOLOv8n, output cosine 0.9992 → 0.9961 on held-out photos, where the
PaddleOCR recognizer gains 0.945 → 0.973); otherwise the biases are restored and the report says
`reverted`. The SNR is not always the task: YOLOv8n's output holds box coordinates in pixels
beside class scores in [0, 1], the SNR sees the coordinates, and the "worse" corrected model
finds 37 of the float model's 38 boxes on 128 held-out photos where the uncorrected one finds 29
(its class scores had sunk under the 0.25 threshold). `revert_if_worse: false` keeps the
correction whatever the SNR says — for outputs whose SNR does not measure what matters.

Invariant: changes outputs (moves each quantized layer's output mean onto the float one) and,
with `revert_if_worse` (the default), never lowers the output SNR to float on the calibration
data; only bias initializers change, quantizers and scales do not. Run it after calibrate.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from qgraph.annotations import require_quantizers
from qgraph.errors import PassError
from qgraph.graph import QModel
from qgraph.idioms import Declined, layer_waves, skip
from qgraph.pipeline import PassContext, register_pass
from qgraph.qparams import bypassed
from qgraph.schema import Range

LAYERS = ("Conv", "Gemm")


@register_pass("bias_correction", preserves_outputs=False)
def bias_correction(model: QModel, ctx: PassContext, *, iterations: Annotated[int, Range(1, 20)] = 1,
                    max_samples: Annotated[int, Range(0)] = 256, revert_if_worse: bool = True) -> dict:
    """Subtract each quantized layer's measured output-mean shift from its bias (Nagel et al. 2019)."""
    records = require_quantizers(model, "bias_correction")
    ctx.require_data("bias_correction")
    layers, skipped = [], []
    for record in records.values():
        if record.kind != "weight":
            continue
        node = model.node(record.node)
        try:
            layers.append((node, _bias_of(model, node)))
        except Declined as exc:
            skipped.append(skip(node, exc.reason))
    if not layers:
        return {"changed": 0, "summary": "no Conv/Gemm with a quantized weight", "skipped": skipped, "warnings": []}
    outputs = {node.name: node.outputs[0].name for node, _ in layers}
    float_form = bypassed(model)
    reference = _channel_means(float_form, list(outputs.values()), ctx, max_samples)
    from qgraph.diff import OutputFidelity
    proto = model.to_onnx()
    plan = ctx.feed_plan(proto)
    fidelity = OutputFidelity(float_form.to_onnx(),
                              lambda: (feeds for feeds, _ in plan.batches(ctx.batch_size, max_samples or None)))
    snr_before = fidelity.snr_db(proto)
    before = [(bias, np.array(bias.values, copy=True)) for _, bias in layers]
    waves = layer_waves(model, [node.name for node, _ in layers])
    shifts = []
    for _ in range(iterations):
        worst = 0.0
        for wave in waves:
            names = [outputs[n] for n in wave]
            measured = _channel_means(model, names, ctx, max_samples)
            for node, bias in layers:
                if node.name in wave:
                    eps = measured[outputs[node.name]] - reference[outputs[node.name]]
                    bias.values = (np.asarray(bias.values, np.float64) - eps).astype(np.float32)
                    worst = max(worst, float(np.max(np.abs(eps))))
        shifts.append(worst)
    snr_after = fidelity.snr_db(model.to_onnx())
    summary = (f"{len(layers)} biases corrected in {len(waves)} waves, {iterations} sweep(s); largest mean "
               f"shift {shifts[0]:.3g}" + (f", {shifts[-1]:.3g} in the last sweep" if iterations > 1 else ""))
    reverted = revert_if_worse and snr_after < snr_before
    if reverted:
        # matching every layer's output mean can still move the outputs away from float (a few
        # samples' means, nonlinearities between the layers): keep the model that is closer
        for bias, values in before:
            bias.values = values
        summary = (f"reverted: the corrected model's output SNR on the calibration data fell from "
                   f"{snr_before:.1f} to {snr_after:.1f} dB ({summary})")
    else:
        summary += f"; output SNR {snr_before:.1f} -> {snr_after:.1f} dB on the calibration data"
    return {"changed": 0 if reverted else len(layers), "summary": summary, "largest_shift": shifts,
            "reverted": reverted, "output_snr_db_before": snr_before, "output_snr_db_after": snr_after,
            "skipped": skipped, "warnings": []}


def _bias_of(model: QModel, node):
    """The bias constant of a Conv/Gemm (created as zeros when absent); Declined when it cannot
    be changed alone."""
    if node.op not in LAYERS:
        raise Declined(f"{node.op} is not a Conv or Gemm")
    channels = _channels(node)
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = node.inputs[2]
        value = QModel.constant_value(bias)
        if value is None or not hasattr(bias, "values"):
            raise Declined(f"bias '{bias.name}' is computed in the graph, not an initializer")
        if np.asarray(value).reshape(-1).size != channels or len(bias.outputs) > 1:
            raise Declined(f"bias '{bias.name}' is shared or broadcast; correcting it would change other layers")
        bias.values = np.asarray(value, np.float32).reshape(-1)
        return bias
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
        raise Declined("Gemm without bias and with beta != 1")
    bias = model.add_constant(f"{node.name}_bias_corrected", np.zeros(channels, np.float32))
    node.inputs = list(node.inputs[:2]) + [bias]
    return bias


def _channels(node) -> int:
    weight = QModel.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    shape = weight.shape if weight is not None else node.inputs[1].shape
    if shape is None:
        raise Declined(f"the weight shape of '{node.name}' is unknown")
    if node.op == "Conv":
        return int(shape[0])
    return int(shape[0] if node.attrs.get("transB", 0) else shape[1])


def _channel_means(model: QModel, outputs: list[str], ctx: PassContext, limit: int) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of `outputs` over the calibration data."""
    from qgraph.runner import Runner
    proto = model.to_onnx()
    runner = Runner(proto, outputs)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feeds, _ in ctx.feed_plan(proto).batches(ctx.batch_size, limit or None):
        values = runner.run(feeds, outputs)
        for name in outputs:
            v = np.moveaxis(values[name].astype(np.float64), 1, 0).reshape(values[name].shape[1], -1)
            sums[name] = sums.get(name, 0.0) + v.sum(axis=1)
            counts[name] = counts.get(name, 0) + v.shape[1]
    if not counts:
        raise PassError("bias_correction: no calibration sample was run; give at least one full batch")
    return {name: sums[name] / counts[name] for name in outputs}
