"""The zoo through `ptq` and both lowering targets: real models from PyPI wheels and the
exporter-style builders (benchmarks/zoo_models.py), on real pictures and text strips.

Thresholds come from benchmarks/zoo.py and the measurements quoted in FIDELITY (16
calibration / 8 evaluation samples, the sizes used here), with a margin for ORT version drift:
a placement or calibration change that costs fidelity fails here. The builders are untrained
(models/exported.py, "Known limit"), so their floors are lower; they guard the graph idioms.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import pytest
import yaml

import zoo_models as zoo  # benchmarks/ is on sys.path (conftest)
from conftest import zoo_or_skip
from qgraph.api import apply_pipeline, bundled_pipeline
from qgraph.graph import QModel
from qgraph.idioms import CLAMPS, index_tensors, is_range_preserving, unary_regions
from qgraph.lowering import lower_model
from qgraph.profile import node_roles

CALIBRATION, EVALUATION = 16, 8
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Floor:
    """Lowest accepted worst-output cosine and task agreement with float; measured in comments."""
    cosine: float
    task: float


FIDELITY = {
    "nudenet_320n": Floor(0.9985, 0.66),      # measured 0.99942, 3/3 boxes
    "ddddocr_det": Floor(0.995, 0.70),        # 0.99753, 6/7 boxes
    "ddddocr_ocr": Floor(0.997, 0.87),        # 0.99876, 8/8 strings
    "ddddocr_ocr_old": Floor(0.996, 0.87),    # 0.99835, 8/8 strings (against the dynamic model)
    "ppocr_det": Floor(0.88, 0.70),           # 0.91389, 14/18 boxes (map IoU 0.827; 0.86487 before range_bounds)
    "ppocr_cls": Floor(0.999, 0.87),          # 0.99997, 8/8 top-1
    "ppocr_rec": Floor(0.97, 0.5),            # 0.98491, 5/8 strings (0.96634 before range_bounds)
    # int8 PTQ breaks this trained detector for every tool (ORT quantize_static: cosine 0.60-0.64 on 32
    # sheets): its stem's HardSwish output holds channels whose ranges differ 1000-fold under one
    # per-tensor grid, and the depthwise conv + BN after it amplify the lost small ones
    "layout_cdla": Floor(0.45, 0.45),         # 0.53921, 9/15 boxes
    "doc_orientation": Floor(0.99, 0.75),     # 0.99432, 7/8 top-1 (the miss: handwriting, float 0.53 vs 0.40)
    "pplcnet": Floor(0.85, 0.75),             # 0.91697, 7/8 top-1 (untrained)
    "pplcnet_textdir": Floor(0.80, 0.50),     # 0.91519, 5/8 top-1 (untrained)
    "vit_encoder": Floor(0.98, 0.62),         # 0.99035, 7/8 top-1 (untrained; 0.98206 before smooth)
    "db_detector": Floor(0.94, 0.70),         # 0.97775, 31/35 boxes (map IoU 0.779) (untrained)
    # untrained; its LayerNorms normalize near-constant tokens, which amplifies the rounding noise
    # of whatever grid feeds them: one HardSwish input's lowest level at -3.7 or at -3.6 (its step
    # 0.194 or 0.193) gives 0.61 or 0.34 on 32 strips, a cliff, not a trend (ahead_relu's range_bounds
    # put it at -3.3: 0.32 here, 0.62409 before)
    "svtr_recognizer": Floor(0.25, 0.25),     # 0.32181, 2/8 strings
}
TRAINED = [key for key, entry in zoo.ZOO.items() if entry.wheel]
# Lowered against QDQ, worst output cosine: 0.999 unless measured lower. Every lowered op of the
# PP-OCR models is within 1 LSB of the QDQ model on the same integer inputs; most of those LSBs
# come from the int32 bias grid (s_x·s_w) QLinearConv and ConvInteger need, which flips whole flat
# text backgrounds across a rounding edge, and these two models amplify it (an imperceptible
# ±half-step input noise alone costs the recognizer 5 of 32 strings). Since range_bounds the QDQ
# model is much closer to float (recognizer 0.9663 -> 0.9849) and its lowerings are too (qlinear
# 0.9656 -> 0.9873, integer 0.9654 -> 0.9788), but the two now part by their own LSB noise.
STAYS = {"ppocr_det": 0.98, "ppocr_rec": 0.975,  # measured 0.9844 and 0.9850 (qlinear; integer 0.9845, 0.9813)
         "doc_orientation": 0.997,              # 0.99893 (qlinear), 0.99913 (integer): a 4-way softmax output
         "layout_cdla": 0.95}                   # 0.97179, 0.96887: its stem amplifies every LSB (see FIDELITY)


@dataclass
class Case:
    entry: zoo.ZooEntry
    float_model: onnx.ModelProto
    quantized: onnx.ModelProto
    inputs: np.ndarray
    float_outputs: list[np.ndarray]
    quantized_outputs: list[np.ndarray]


@pytest.fixture(scope="module")
def quantized():
    cache: dict[str, Case] = {}

    def get(key: str) -> Case:
        if key not in cache:
            entry = zoo.ZOO[key]
            model = zoo_or_skip(lambda: zoo.zoo_model(key))
            calib = zoo.zoo_inputs(key, CALIBRATION, "calib")
            inputs = np.stack([s.array for s in zoo.zoo_samples(key, EVALUATION, "eval")])
            q = apply_pipeline(model, "ptq", calib)
            cache[key] = Case(entry, model, q, inputs, run(entry, model, inputs), run(entry, q, inputs))
        return cache[key]
    return get


def run(entry: zoo.ZooEntry, model: onnx.ModelProto, inputs: np.ndarray) -> list[np.ndarray]:
    return zoo.run_entry(entry, zoo.ort_session(model), inputs)


def worst_cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return min(zoo.cosine(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("key", list(zoo.ZOO))
def test_ptq_keeps_the_model_close_to_float(key, quantized):
    case = quantized(key)
    floor = FIDELITY[key]
    cosine = worst_cosine(case.float_outputs, case.quantized_outputs)
    agreement, what = zoo.task_agreement(case.entry, case.float_outputs, case.quantized_outputs)
    assert cosine >= floor.cosine, f"{key}: worst output cosine {cosine:.5f} < {floor.cosine}"
    assert agreement >= floor.task, f"{key}: task agreement {what} < {floor.task}"


@pytest.mark.parametrize("key", list(zoo.ZOO))
def test_quantizers_sit_where_a_deployment_compiler_puts_them(key, quantized, float_part):
    """No quantizer on shape/index computation or between the ops of one exported activation;
    every compute op reads quantized activations; no quantizer on a graph output."""
    case = quantized(key)
    prepared = QModel.from_onnx(apply_pipeline(case.float_model, float_part, zoo.zoo_inputs(key, CALIBRATION, "calib")))
    index = index_tensors(prepared)
    inner = {out.name for region in unary_regions(prepared) for node in region.nodes
             for out in prepared.node(node).outputs if out.name != region.output}
    q = QModel.from_onnx(case.quantized)
    activations = [n.inputs[0].name for n in q.graph.nodes if n.op == "QuantizeLinear"
                   and QModel.constant_value(n.inputs[0]) is None]
    assert activations, f"{key}: no activation quantizers"
    assert not set(activations) & index, f"{key}: quantizers on index tensors {sorted(set(activations) & index)[:5]}"
    assert not set(activations) & inner, f"{key}: quantizers inside activations {sorted(set(activations) & inner)[:5]}"
    outputs = {o.name for o in q.graph.outputs}
    assert not any(q.producer(t) is not None and q.producer(t).op == "DequantizeLinear" for t in q.graph.outputs), \
        f"{key}: a graph output {sorted(outputs)} is quantized"
    computed = index_tensors(q)        # shapes computed at run time (Reshape targets)
    for node in q.graph.nodes:
        if node.op in COMPUTE_OPS:
            producer = q.producer(node.inputs[0])
            # Split, Reshape, ... and Relu/Clip(0, ·) of a tensor quantized over [0, max] share its grid
            while producer is not None and (is_range_preserving(producer, computed) or producer.op in CLAMPS):
                producer = q.producer(producer.inputs[0])
            assert producer is not None and producer.op == "DequantizeLinear", \
                f"{key}: {node.op} {node.name} reads a float activation {node.inputs[0].name}"


@pytest.fixture(scope="module")
def float_part() -> dict:
    """The float passes of the bundled ptq pipeline (what insert_qdq sees) as a pipeline document."""
    steps = yaml.safe_load(Path(bundled_pipeline("ptq")).read_text())["passes"]
    names = [next(iter(step)) if isinstance(step, dict) else step for step in steps]
    return {"passes": steps[:names.index("insert_qdq")]}


@pytest.mark.parametrize("target", ["qlinear", "integer"])
@pytest.mark.parametrize("key", list(zoo.ZOO))
def test_lowering_leaves_no_compute_op_float_and_stays_with_the_qdq_model(key, target, quantized):
    case = quantized(key)
    lowered, report = lower_model(case.quantized, target)
    float_compute = collections.Counter(n.op_type for n in lowered.graph.node if n.op_type in COMPUTE_OPS)
    assert not float_compute, f"{key} {target}: float compute left {dict(float_compute)}; skipped {report['skipped'][:3]}"
    assert not report["skipped"], f"{key} {target}: left float: {report['skipped'][:5]}"
    if target == "integer":
        assert not report["float_nodes"], f"{key}: float nodes inside the integer region {report['float_nodes'][:5]}"
    # every activation quantizer of the QDQ model feeds an integer op after lowering, or the
    # DequantizeLinear of a float activation (qlinear's HardSwish: DQ -> HardSwish -> Q)
    roles = node_roles(lowered)
    readers = collections.defaultdict(list)
    for node in lowered.graph.node:
        for name in node.input:
            activation = node.op_type == "DequantizeLinear" and roles.get(node.name) == "float activation"
            readers[name].append("float activation" if activation else node.op_type)
    constants = {i.name for i in case.quantized.graph.initializer}
    for node in case.quantized.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            ops = readers.get(node.output[0], [])
            assert not ops or any(op != "DequantizeLinear" for op in ops), \
                f"{key} {target}: the quantizer of {node.input[0]} feeds no integer op"
    if target == "integer":
        assert "float activation" not in set(roles.values())
    # the lowered model computes what the QDQ model computes, up to requantization rounding;
    # untrained builders amplify those LSB differences, so they are held to float fidelity instead
    got = run(case.entry, lowered, case.inputs)
    if key in TRAINED:
        stays = worst_cosine(case.quantized_outputs, got)
        assert stays >= STAYS.get(key, 0.999), f"{key} {target}: lowered cosine to the QDQ model {stays:.5f}"
    lowered_fidelity = worst_cosine(case.float_outputs, got)
    assert lowered_fidelity >= FIDELITY[key].cosine, f"{key} {target}: lowered cosine to float {lowered_fidelity:.5f}"


@pytest.mark.parametrize("key", ["nudenet_320n", "ddddocr_ocr"])
def test_ptq_is_at_least_as_faithful_as_onnxruntime_quantize_static(key, quantized, tmp_path):
    """The peer on the same samples: ORT quantize_static, QDQ, per-channel int8 weights, uint8
    activations, MinMax (its default) after quant_pre_process."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    case = quantized(key)
    entry = case.entry
    source = tmp_path / "float.onnx"
    # ORT's QDQ per-channel needs opset >= 13: raise it as an ORT user would (qgraph does the same)
    onnx.save(onnx.version_converter.convert_version(case.float_model, 17), source)
    prepared = tmp_path / "pre.onnx"
    quantization.shape_inference.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    calib = zoo.zoo_inputs(key, CALIBRATION, "calib")[entry.input_name]
    feeds = iter([{entry.input_name: calib[i:i + 1]} for i in range(len(calib))])

    class Reader(quantization.CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    out = tmp_path / "ort.onnx"
    quantization.quantize_static(str(prepared), str(out), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True, activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8)
    ort_outputs = run(entry, onnx.load(out), case.inputs)
    ours = worst_cosine(case.float_outputs, case.quantized_outputs)
    theirs = worst_cosine(case.float_outputs, ort_outputs)
    # the task first: boxes and strings at least as often as ORT's; the cosine may trail by
    # 2e-4, the price of the percentile range on nudenet (0.99942 against ORT's 0.99952 here,
    # where min-max matched ORT but kept 6 of the 8 benchmark boxes against the percentile's 8)
    task, peer_task = (zoo.task_agreement(entry, case.float_outputs, out)[0] for out in (case.quantized_outputs, ort_outputs))
    assert task >= peer_task, f"{key}: task agreement {task:.3f}, ORT {peer_task:.3f}"
    assert ours >= theirs - 2e-4, f"{key}: qgraph cosine {ours:.5f}, ORT {theirs:.5f}"



def test_bias_correction_brings_back_the_yolov8n_boxes_whose_scores_ptq_sank(quantized):
    """nudenet's YOLOv8n: ptq lowers class scores near the 0.25 threshold under it (15 of 19 float
    boxes found on 64 held-out photos); bias correction restores them (18 of 19) though its output
    SNR falls (the coordinates, in pixels, weigh more than the scores), so the default guard would
    revert it: `revert_if_worse: false` keeps it."""
    from qgraph.pipeline import PassContext, run_pass
    case = quantized("nudenet_320n")
    entry = case.entry
    photos = np.stack([s.array for s in zoo.zoo_samples("nudenet_320n", 64, "eval")])
    reference = run(entry, case.float_model, photos)
    before, _ = zoo.task_agreement(entry, reference, run(entry, case.quantized, photos))
    model = QModel.from_onnx(case.quantized)
    report = run_pass(model, "bias_correction", {"revert_if_worse": False},
                      PassContext(data=zoo.zoo_inputs("nudenet_320n", CALIBRATION, "calib"), batch_size=16))
    assert not report["reverted"] and report["output_snr_db_after"] < report["output_snr_db_before"]
    corrected = run(entry, model.to_onnx(), photos)
    after, what = zoo.task_agreement(entry, reference, corrected)
    assert after >= 0.89 and after >= before + 0.1, (before, what)     # measured 0.79 -> 0.95
    assert worst_cosine(reference, corrected) >= 0.995                    # measured 0.99669


def test_gptq_wins_back_what_rounding_8_bit_weights_costs_the_paddleocr_recognizer(quantized):
    """PP-OCR's recognizer: its SVTR neck's 1x1 convolutions lose more to round-to-nearest 8-bit
    weights than to anything else; GPTQ's compensated rounding wins a third of what is left back
    on held-out text strips (measured on these 8: worst cosine 0.9849 -> 0.9894; before ahead_relu
    bounded its HardSwish inputs, 0.9663 -> 0.9855)."""
    from qgraph.pipeline import PassContext, run_pass
    case = quantized("ppocr_rec")
    model = QModel.from_onnx(case.quantized)
    report = run_pass(model, "gptq", {}, PassContext(data=zoo.zoo_inputs("ppocr_rec", CALIBRATION, "calib"),
                                                      batch_size=16))
    assert report["changed"] >= 40
    rounded = run(case.entry, model.to_onnx(), case.inputs)
    before = worst_cosine(case.float_outputs, case.quantized_outputs)
    after = worst_cosine(case.float_outputs, rounded)
    assert after >= before + 0.003 and after >= 0.987, (before, after)


def test_silu_placed_as_onnxruntime_does_runs_as_its_qlinear_pair_on_yolov8n(quantized):
    """insert_qdq's `split_regions: [silu]` on nudenet's YOLOv8n: every one of its 57 SiLUs gets a
    quantizer on σ and lowers to QLinearSigmoid → QLinearMul (no table: what makes ORT's
    QOperator model faster), the model stays as close to float as the default placement (measured
    0.99938 against 0.99927 on 32 pictures), and `qgraph diff` finds the lowered model exact."""
    from qgraph.diff import diff_models
    case = quantized("nudenet_320n")
    pipeline = yaml.safe_load(bundled_pipeline("ptq").read_text())
    for step in pipeline["passes"]:
        if "insert_qdq" in step:
            step["insert_qdq"]["split_regions"] = ["silu"]
    split = apply_pipeline(case.float_model, pipeline, zoo.zoo_inputs("nudenet_320n", CALIBRATION, "calib"))
    lowered, report = lower_model(split, "qlinear")
    ops = collections.Counter(n.op_type for n in lowered.graph.node)
    sites = sum(r.kind == "silu" for r in unary_regions(QModel.from_onnx(case.float_model)))
    assert sites == 57 and ops["QLinearSigmoid"] == sites and ops["QLinearMul"] >= sites
    assert ops["GatherElements"] == 0 and not report["skipped"]
    assert worst_cosine(case.float_outputs, run(case.entry, split, case.inputs)) >= FIDELITY["nudenet_320n"].cosine
    got = run(case.entry, lowered, case.inputs)
    assert worst_cosine(case.float_outputs, got) >= FIDELITY["nudenet_320n"].cosine
    diff = diff_models(lowered, {case.entry.input_name: case.inputs[:2]})
    assert diff.passed, diff.summary()


def test_smooth_moves_the_vit_encoders_layernorm_outliers_into_its_weights(quantized):
    """The ViT-style builder's LayerNorms have a few outlier channels (γ = 8, as trained
    transformers grow them): ptq's `smooth` (SmoothQuant) divides them into the next MatMuls'
    weights, where per-channel grids absorb them; without it the per-tensor activation grids
    spend their levels on the outliers (measured on these 8 pictures: worst cosine 0.98206 ->
    0.99035, 6 -> 7 of 8 top-1; benchmarks/zoo.py on 32: 0.976 -> 0.988, 25 -> 29)."""
    case = quantized("vit_encoder")
    pipeline = yaml.safe_load(bundled_pipeline("ptq").read_text())
    without = {"passes": [step for step in pipeline["passes"] if "smooth" not in step]}
    assert len(without["passes"]) == len(pipeline["passes"]) - 1
    plain = apply_pipeline(case.float_model, without, zoo.zoo_inputs("vit_encoder", CALIBRATION, "calib"))
    before = worst_cosine(case.float_outputs, run(case.entry, plain, case.inputs))
    after = worst_cosine(case.float_outputs, case.quantized_outputs)
    assert after >= before + 0.004 and after >= 0.988, (before, after)


def test_equalize_activations_repairs_the_layout_detector(quantized):
    """PP-PicoDet's HardSwish outputs hold channels 1000x apart in range (FIDELITY's comment):
    `equalize_activations` after fuse_conv_bn equalizes them into the depthwise convs that read
    them, exactly, and int8 PTQ then keeps the detector (measured on these 8 sheets: 0.96480 and
    15 of 15 boxes, lowered to qlinear 0.95884; on 16: 0.96576 and 28 of 28 against 0.61743 and 17);
    the qlinear lowering keeps what the QDQ model gains."""
    case = quantized("layout_cdla")
    pipeline = yaml.safe_load(bundled_pipeline("ptq").read_text())
    at = next(i for i, step in enumerate(pipeline["passes"]) if "fuse_conv_bn" in step)
    pipeline["passes"].insert(at + 1, {"equalize_activations": {}})
    repaired = apply_pipeline(case.float_model, pipeline, zoo.zoo_inputs("layout_cdla", CALIBRATION, "calib"))
    plain = worst_cosine(case.float_outputs, case.quantized_outputs)
    outputs = run(case.entry, repaired, case.inputs)
    cosine = worst_cosine(case.float_outputs, outputs)
    agreement, what = zoo.task_agreement(case.entry, case.float_outputs, outputs)
    assert cosine >= 0.94 and cosine >= plain + 0.25, (plain, cosine)
    assert agreement >= 0.95, what
    lowered, _ = lower_model(repaired, "qlinear")
    assert worst_cosine(case.float_outputs, run(case.entry, lowered, case.inputs)) >= 0.94
