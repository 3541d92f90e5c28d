"""Zoo benchmark: qgraph `ptq` against ONNX Runtime's quantize_static on real models and real inputs.

    .venv/bin/python benchmarks/zoo.py [--models nudenet_320n,ddddocr_ocr,...] [--images N]
                                       [--calib N] [--eval N] [--methods MinMax,...] [--skip-ort]
                                       [--skip-lowering] [--diff-samples N] [--repeats N]
                                       [--pipeline ptq|FILE.yaml] [--json out.json]

Quick look at one model: `--models pplcnet_textdir --images 8 --repeats 3`; fidelity only:
`--skip-lowering`; qgraph only: `--skip-ort`; no timing: `--repeats 0`; another qgraph pipeline
in place of `ptq` (e.g. a calibration setting, or a repair appended): `--pipeline FILE.yaml`.

Goal: qgraph must quantize what exporters write as faithfully as the peer tool, with quantizers
where a deployment compiler puts them (issue 12), and the lowered model must hold (issue 13).
For every zoo model (benchmarks/zoo_models.py: nine models from five PyPI wheels and five
exporter-style builders) it measures:

Fidelity (issue 12, Deliver 4). The float op count, and for qgraph `ptq` (the bundled pipeline,
`qgraph passes run MODEL --pipeline ptq`: canonicalize, dequantize_dynamic, fuse_conv_bn,
ahead_relu, insert_qdq with W8A8 per-channel symmetric weights and activations on the 99.999th
percentile, calibrate; the model is the one `apply_pipeline(model, "ptq", calib)` builds) and for
ORT quantize_static (QDQ, per-channel int8 weights, uint8 activations; MinMax, Entropy and
Percentile, after quant_pre_process where that works) the Q/DQ node count, the activation
quantizers, the quantization wall time, cosine and SNR of every output against float, and task
agreement with float: detectors the share of float boxes matched at IoU >= 0.5 with the same
class (DB text detectors: the boxes of their maps' connected regions, zoo_models.decode_db, with
the pixel IoU of maps > 0.3 beside), OCR the share of identical CTC greedy strings (PaddleOCR's
without spaces, as its RecMetric; plus the share of MNIST strips read exactly), classifiers the
same top-1. Failures
are caught and reported per setting. Fixed-batch models are fed one sample at a time to ORT's
calibration reader; qgraph gets the calibration set as one data dict, as its users do.

Placement (issue 12, the quantizer-count goal), on qgraph's QDQ model and its two lowerings:
- aQ: activation quantizers, the QuantizeLinear nodes whose input is not computed from
  initializers and Constant nodes alone.
- C: the activation inputs of the compute ops (Conv/ConvTranspose/Gemm/MatMul: input 0, and
  input 1 of a MatMul unless it is computed from constants), each followed back through the ops
  that share their input's quantizer (qgraph.idioms: range-preserving ops and Relu/Clip) to its
  DequantizeLinear and counted once per quantized tensor it reads (once per float tensor if it
  has no quantizer).
- I: the quantized tensors (outputs of the QDQ model's QuantizeLinear nodes; lowered ops write
  the same names) that an integer op of either lowered model reads: an op other than
  Q/DQ/Shape/Size whose outputs are all non-float, reading an int8/uint8 tensor not computed
  from constants, followed back through ops that share their input's grid. Codes the lowering
  makes itself (Concat inputs requantized to one grid in `integer`, ConvTranspose's pixel-shuffle
  planes) are not tensors of the QDQ model and do not count.
- ratio = aQ / |C u I| ("needed"). 1.00 means every activation quantizer sits on a compute input
  or feeds an integer op; a quantizer whose code only goes back to float, or two quantizers on
  one tensor, raise it. ORT's aQ in the fidelity table is on the same float graph, for scale.
- idxQ: activation quantizers on shape/index tensors (qgraph.idioms.index_tensors of the QDQ
  model); must be 0.

Lowering (issue 13, Deliver 5), per target, from qgraph.lowering.lower_model on qgraph's ptq
model and its report:
- lowered: the report's 'lowered' sites (a compute op; a Relu/Clip folded into it; an exported
  activation such as x*Sigmoid(x) lowered as one table; an elementwise, pooling or Concat op)
  plus the range-preserving ops that run on codes after DequantizeLinear sank below them
  ('dequantize_sunk'); out of lowered + 'skipped' (left float although inside the quantized
  region; one exported activation counts once). share = lowered / (lowered + skipped).
- islands: the report's 'float_by_placement', ops inside the region that insert_qdq left float
  on purpose (LayerNorm, Softmax, a float head's post-processing; one exported activation
  counts once); "w/ isl." = lowered / (lowered + skipped + islands), the stricter share.
- outside: ops of the QDQ model in the report's 'outside_region' (float pre/post-processing).
- compute: Conv/ConvTranspose/Gemm/MatMul of the QDQ model not left as float ops in the lowered
  model (all of them must be lowered).
- trips: QuantizeLinear nodes of the lowered model whose input float ops compute from integers
  (a DequantizeLinear, or the Cast of a float head's integer accumulator): the integer -> float
  -> integer round trips left; the per-model lines also give those entering by a
  DequantizeLinear, and apart from them the float activations the qlinear lowering chose
  (DequantizeLinear -> HardSwish -> QuantizeLinear, faster in ORT than a table, with its codes),
  whose DequantizeLinear counts as an integer op reading its input codes in the placement line.
- diff: qgraph.diff.diff_models(lowered, first `--diff-samples` evaluation samples,
  per_layer=False), what `qgraph diff` runs: "exact" (ORT and the interpreter agree bit for
  bit), "pass" (integer tensors exact, float ones within their op's tolerance: exit 0), FAIL.
- interp/ORT: qgraph.interp (the compiled plan `qgraph diff` runs; qgraph.interp.run on its
  cached plan) against ORT on the lowered model, one sample, one thread each (ORT intra-op 1,
  BLAS 1), alternated `--repeats` times after a warm-up, median of the per-pair ratios
  (benchmarks/interp.py's paired_times).
- ORT latency at batch 1 of float / ORT QOperator (quantize_static MinMax, QOperator format,
  from the same quant_pre_process output) / qgraph qlinear / qgraph integer: one thread,
  `--repeats` interleaved rounds, medians (benchmarks/latency.py's time_variants).

Goals table: issue 12: worst-output cosine >= 0.99; cosine and task agreement each at least
ORT's best setting (best of the settings that ran; "yes" when every ORT setting fails); task:
detections (and DB boxes) matched >= 95%, OCR strings >= 90% (none set for classifiers);
ratio <= 1.2; no index quantizer. Issue 13: share >= 95% in both targets (and the stricter
share with islands); every compute op lowered; diff exit 0 in both targets; and the limits of
its point 4 at batch 1: interpreter <= 5x ORT, qgraph qlinear <= ORT QOperator latency,
integer <= 5x qlinear in ORT.

Inputs: `--calib` calibration and `--eval` evaluation samples (`--images` sets both), real
pictures from the scikit-image 0.26.0 wheel (the evaluation split is the 14 pictures whole,
then seeded crops; calibration uses other crops) and text strips (MNIST digits from qgraph's
bundled data, windows on the scanned page.png and the handwritten text.png).

Measured (2 shared cores, `--calib 16 --eval 32 --repeats 0`, 2026-11-29; worst output's cosine /
SNR; ORT = its best of MinMax/Entropy/Percentile by task agreement; t = the tool's quantization
wall time in s, under load; Q/DQ counts nodes, aQ the activation quantizers):

    model              ops Q/DQ qg Q/DQ ort aQ qg aQ ort   cos qg  cos ort SNR qg SNR ort task qg task ort   t qg  t ort
    nudenet_320n       323     398      697   135    283  0.99927  0.99939   28.3    29.1   1.000    0.000    5.4   10.3
    ddddocr_det        279     506      716   170    275  0.99684  0.99398   22.0    19.2   0.852    0.807   11.7   13.7
    ddddocr_ocr        102     124      158    40     57  0.99848  0.99828   25.2    24.6   0.906    0.875    8.0   10.6
    ddddocr_ocr_old    292     124     fail    40   fail  0.99783     fail   23.6    fail   0.875     fail    4.6   fail
    ppocr_det          672     388      813   130    293  0.87183  0.82955    5.9     4.6   0.830    0.830   14.0   49.0
    ppocr_cls          566     322      405   107    148  0.99884  0.99846   26.3    25.0   0.969    0.969    1.4    1.8
    ppocr_rec          860     308      894   101    337  0.94735  0.95009    9.9    10.1   0.656    0.656    5.8   10.6
    pplcnet            192     202      319    68    126  0.75444  0.09286    3.1    -0.8   0.719    0.500    1.2    2.3
    pplcnet_textdir    192     202      319    68    126  0.90441  0.85858    6.9     5.6   0.500    0.500    1.0    0.8
    vit_encoder        320     128      375    38    158  0.98767  0.94574   16.1     9.6   0.906    0.625    2.0    2.5
    db_detector        212     238      363    77    142  0.99029  0.99101   16.8    17.5   0.817    0.902    4.0    4.5
    svtr_recognizer    293     264      513    87    209  0.62529  0.03371    0.1    -3.6   0.438    0.000    0.6    1.4

Since `smooth` joined ptq.yaml (stop 23; SmoothQuant on LayerNorm -> MatMul, qgraph/passes/smooth.py) the
three models with LayerNorm were re-measured with the rest of the qgraph columns unchanged
(`--skip-ort --calib 16 --eval 32 --repeats 0`): vit_encoder 0.97557 -> 0.98767, 25 -> 29 of 32
top-1 (its LayerNorms' outlier channels); ppocr_rec 0.94740 -> 0.94735, 20 -> 21 strings;
svtr_recognizer 0.62449 -> 0.62529. The ORT columns are those of the run above.

Since ahead_relu bounds HardSwish/HardSigmoid inputs (`qgraph.range_bounds`: a HardSwish input's
quantizer covers [-3, max], not the -170 PP-OCRv4's detector reaches), the same command at 66388bd
against 0505810, run one after the other (2026-11-30; every other model and column unchanged, the
ppocr_cls diff still passes, with 1 of its 3 float tensors identical instead of 3): ppocr_det
0.87183 -> 0.89667, 44 -> 46 of 53 boxes (map IoU 0.762 -> 0.800); ppocr_rec 0.94734 -> 0.98092,
21 -> 24 strings; ppocr_cls 0.99884 -> 0.99934; db_detector 0.99017 -> 0.99118, 67 -> 74 of 82
boxes; pplcnet 0.76026 -> 0.76557; pplcnet_textdir 0.90397 -> 0.87437 (16/32 top-1 both);
svtr_recognizer 0.62628 -> 0.35798, 14 -> 9 strings (untrained: its LayerNorms amplify the rounding
noise of near-constant tokens; one HardSwish input's lowest level at -3.7 or -3.6 gives 0.61 or
0.34, tests/test_zoo_quantization.py). The trained PaddleOCR models all gain.

With 64 calibration samples (`--calib 64 --eval 32 --repeats 0 --skip-lowering`, 2026-11-29, both
tools on the same 64; the run was split in two after ORT's Entropy calibration of ppocr_det was
killed by the kernel's OOM killer at 22 GB of memory, so ppocr_det's ORT column is MinMax only):

    model              cos qg  cos ort  task qg              task ort (best)      t qg  t ort
    nudenet_320n      0.99875  0.99911  8/8 boxes            2/8 (MinMax)         13.1   11.0
    ddddocr_det       0.99653  0.99248  85/88 boxes (96.6%)  75/88 (Percentile)   28.0   95.9
    ddddocr_ocr       0.99827  0.99703  28/32 strings        27/32 (MinMax)       12.8   13.5
    ddddocr_ocr_old   0.99812     fail  28/32 strings        fail                 12.8   fail
    ppocr_det         0.88787  0.82806  44/53 boxes          44/53 (MinMax)       66.0   34.6
    ppocr_cls         0.99521  0.99884  32/32 top-1          32/32 (MinMax)        2.0    2.2
    ppocr_rec         0.94662  0.95675  18/32 strings        16/32 (MinMax)       13.0   11.8
    pplcnet           0.73842  0.68556  20/32 top-1          18/32 (Percentile)    3.1    8.9
    pplcnet_textdir   0.87275  0.82021  23/32 top-1          26/32 (MinMax)        0.9    0.7
    vit_encoder       0.97560  0.94034  20/32 top-1          18/32 (Percentile)    4.8   11.8
    db_detector       0.99243  0.99097  70/82 boxes          72/82 (Percentile)   10.3   27.1
    svtr_recognizer   0.63625  0.08144  13/32 strings        0/32 (Percentile)     2.1    5.6

More calibration data is what lifts ddddocr_det's YOLOX over the 95% detection goal (75 -> 85 of
88 boxes from 16 to 64 pictures; 83 with 32), and db_detector from 67 to 70 of 82. It is not
monotone everywhere: ppocr_cls falls from 0.99884 to 0.99521 (a separate run, batch 8: 0.99889 / 0.99911 /
0.99335 at 16 / 32 / 64), where the 99.999th percentile of 64 strips narrows a few
ranges it clipped less at 32 (batch_norm_33.tmp_2: [-16.2, 18.5] -> [-14.6, 16.9]) and minmax ranges
give 0.99724 / 0.9989 / 0.99815: below ORT's cosine there and on ppocr_rec and nudenet, with the
task at least ORT's on every model but pplcnet_textdir and db_detector.

(nudenet: 8 float boxes on the 32 pictures, qgraph keeps all 8 and every ORT setting none: its final
Concat joins boxes and class scores on one uint8 grid. ddddocr_ocr_old: ORT's quantize_static
fails, "Graph is not a DAG".) Placement ratio 1.00 on every model (every activation quantizer's
code is read by a compute op or an integer op; the run above counted 1.03-1.20 because the NHWC
table form writes a code by a Transpose, which the count walked past; fixed, re-measured with
`--calib 16 --eval 8 --skip-ort`); no quantizer on an index tensor; every model lowers 100% in
both targets and `qgraph diff` passes.

What the numbers say:
- The trained PaddleOCR detector and recognizer amplify small perturbations: rounding only the
  detector's input onto ptq's 8-bit grid costs cosine 0.982 and 4 of 18 boxes; an imperceptible
  +-half-step noise on the recognizer's input changes 5 of 32 strings. Both tools lose there;
  docs/exported-models.md gives the repairs (bias correction; W8A16 by mixed_precision).
- The untrained exporter-style nets lose much more than trained ones in both tools (see
  models/exported.py, "Known limit"): read them as qgraph against ORT, not as accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_models as zoo  # noqa: E402

ORT_METHODS = ("MinMax", "Entropy", "Percentile")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TARGETS = ("qlinear", "integer")
QGRAPH_CONFIG = "ptq (bundled, W8A8)"
CODE_TYPES = (TensorProto.INT8, TensorProto.UINT8)
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def _benchmark(name: str):
    """A sibling benchmark module (latency.py, interp.py), imported on first use: latency.py imports
    this module for ORT's quantization tools, so when this file runs as __main__ it is registered
    under its module name first (one copy of it, not two)."""
    sys.modules.setdefault(Path(__file__).stem, sys.modules[__name__])
    import importlib
    return importlib.import_module(name)


@dataclass
class Result:
    """One quantization of one model (or the float reference) and how close it stays to float."""
    model: str
    tool: str
    config: str
    ops: int = 0
    qdq: int = 0
    act_quantizers: int = 0
    weight_quantizers: int = 0
    seconds: float = 0.0
    outputs: list[dict] = field(default_factory=list)   # name, cosine, snr_db
    agreement: float | None = None
    agreement_text: str = ""
    digits_exact: float | None = None                     # ddddocr: MNIST strips read exactly
    note: str = ""
    error: str = ""

    @property
    def min_cosine(self) -> float:
        return min((o["cosine"] for o in self.outputs), default=float("nan"))

    @property
    def min_snr(self) -> float:
        return min((o["snr_db"] for o in self.outputs), default=float("nan"))


@dataclass
class Lowered:
    """qgraph's ptq model lowered to one target (see the module docstring for each number)."""
    target: str
    lowered: int = 0            # ops lowered: the report's 'lowered' sites + ops run on codes after DQ sinking
    left_float: int = 0         # the report's 'skipped' (a declined exported activation counts once)
    float_islands: int = 0      # the report's 'float_by_placement' (one exported activation counts once)
    outside: int = 0            # ops of the QDQ model in the report's 'outside_region'
    compute: int = 0            # Conv/ConvTranspose/Gemm/MatMul of the QDQ model
    compute_float: int = 0      # ... of them still float in the lowered model
    round_trips: int = 0        # integer -> float ops -> QuantizeLinear transitions left (see round_trips)
    dq_round_trips: int = 0     # ... of them entering float by a DequantizeLinear
    float_activations: int = 0  # DQ -> activation -> Q the lowering chose (qlinear's HardSwish), not round trips
    lowering_codes: int = 0     # 8-bit tensors integer ops read that the lowering made itself
    diff_passed: bool | None = None
    diff_bit_exact: bool | None = None
    diff_summary: str = ""
    ort_ms: float | None = None       # batch 1, one thread
    interp_ms: float | None = None
    interp_ratio: float | None = None  # median of the per-pair interp/ORT ratios
    error: str = ""

    @property
    def share(self) -> float:
        """Lowered share of the ops lowering had to convert (float islands by placement aside)."""
        total = self.lowered + self.left_float
        return self.lowered / total if total else float("nan")

    @property
    def share_with_islands(self) -> float:
        """Lowered share when the float islands insert_qdq left count as region ops too."""
        total = self.lowered + self.left_float + self.float_islands
        return self.lowered / total if total else float("nan")


@dataclass
class Deployment:
    """Issue 12's placement numbers and issue 13's lowering numbers of qgraph's ptq model."""
    model: str
    act_quantizers: int = 0     # activation QuantizeLinear nodes of qgraph's QDQ model
    compute_inputs: int = 0     # C: quantized tensors (or float tensors) compute ops read
    integer_inputs: int = 0     # I: quantized tensors integer ops of either lowered model read
    needed: int = 0             # |C u I|
    index_quantizers: int = 0   # activation quantizers on shape/index tensors (qgraph.idioms.index_tensors)
    targets: list[Lowered] = field(default_factory=list)
    latency_ms: dict = field(default_factory=dict)   # batch 1: variant -> ms, or an error line
    error: str = ""

    @property
    def ratio(self) -> float:
        return self.act_quantizers / self.needed if self.needed else float("nan")


def error_line(exc: BaseException) -> str:
    """The exception in one line (ORT puts the useful part on its second and third lines)."""
    text = " ".join(part.strip() for part in str(exc).strip().splitlines()[:3])
    return f"{type(exc).__name__}: {text[:300]}"


def count_ops(model: onnx.ModelProto) -> tuple[int, int]:
    """(all nodes, QuantizeLinear + DequantizeLinear nodes) of the main graph."""
    nodes = model.graph.node
    return len(nodes), sum(n.op_type in QDQ_OPS for n in nodes)


def count_quantizers(model: onnx.ModelProto) -> tuple[int, int]:
    """(activation quantizers, weight quantizers): node counts alone do not compare, since ORT stores
    weights as int8 initializers + DequantizeLinear and qgraph keeps float weights + Q + DQ."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    quantized_constants = {n.output[0] for n in model.graph.node
                           if n.op_type == "QuantizeLinear" and n.input[0] in constants}
    weights = sum(n.op_type == "DequantizeLinear" and (n.input[0] in constants or n.input[0] in quantized_constants)
                  for n in model.graph.node)
    activations = sum(n.op_type == "QuantizeLinear" and n.input[0] not in constants for n in model.graph.node)
    return activations, weights


# --- placement (issue 12) and lowering (issue 13) --------------------------------------------------

def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}


def constant_derived(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from initializers and Constant nodes alone (weights, their Q/DQ, folded shapes)."""
    constant = {t.name for t in model.graph.initializer}
    for node in model.graph.node:    # ONNX graphs are topologically sorted
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in constant for i in inputs)):
            constant.update(o for o in node.output if o)
    return constant


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX shape inference (or the file) knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the file's own value_info then
        inferred = model
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {vi.name: vi.type.tensor_type.elem_type for vi in infos if vi.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _shares_grid(node: onnx.NodeProto, constant: set[str], index: set[str]) -> bool:
    """A range-preserving op or clamp (qgraph.idioms) whose other inputs are constants or shapes:
    its output keeps the quantizer of its first input."""
    from qgraph.idioms import CLAMPS, RANGE_PRESERVING
    return (node.op_type in RANGE_PRESERVING + CLAMPS and bool(node.input) and node.input[0] not in constant
            and all(i in constant or i in index for i in node.input[1:] if i))


def compute_inputs(qdq: onnx.ModelProto, index: set[str]) -> set[str]:
    """C: per activation input of a compute op (input 0; input 1 of a MatMul unless computed from
    constants), the quantized tensor its DequantizeLinear reads, followed back through ops that
    share their input's quantizer; the float tensor itself when no quantizer is found."""
    producers, constant = _producers(qdq), constant_derived(qdq)
    found = set()
    for node in qdq.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        for name in (node.input[:2] if node.op_type == "MatMul" else node.input[:1]):
            if not name or name in constant:
                continue
            while name in producers:
                producer = producers[name]
                if producer.op_type == "DequantizeLinear":
                    name = producer.input[0]
                    break
                if not _shares_grid(producer, constant, index):
                    break
                name = producer.input[0]
            found.add(name)
    return found


def integer_inputs(lowered: onnx.ModelProto, qdq_tensors: set[str], codes: frozenset[str] = frozenset()
                   ) -> tuple[set[str], set[str]]:
    """(I, lowering codes): the 8-bit non-constant tensors read by integer ops of `lowered` (ops
    other than Q/DQ/Shape/Size whose outputs are all non-float, and the DequantizeLinear of a float
    activation, which computes from the codes), followed back through ops that
    share their input's grid until a quantizer's code tensor (`codes`); split into tensors of the
    QDQ model and codes the lowering made (Concat inputs requantized to one grid, ConvTranspose's
    pixel-shuffle planes)."""
    from qgraph.describe import float_activation_nodes
    from qgraph.graph import QModel
    from qgraph.idioms import index_tensors
    producers, constant, types = _producers(lowered), constant_derived(lowered), tensor_types(lowered)
    index = index_tensors(QModel.from_onnx(lowered))
    activations = float_activation_nodes(lowered)     # their DequantizeLinear reads codes as an integer op would
    found = set()
    for node in lowered.graph.node:
        outputs = [o for o in node.output if o]
        reads_codes = node.op_type == "DequantizeLinear" and node.name in activations
        if not reads_codes and (node.op_type in QDQ_OPS + ("Shape", "Size") or not outputs
                                or any(types.get(o, TensorProto.FLOAT) in FLOAT_TYPES for o in outputs)):
            continue
        for name in node.input:
            if not name or name in constant or types.get(name) not in CODE_TYPES:
                continue
            # back through grid-sharing ops to a quantizer's code tensor (not past it: the NHWC table
            # form writes a code tensor by a Transpose of a tensor the lowering made)
            while name not in codes and name in producers and _shares_grid(producers[name], constant, index) \
                    and types.get(producers[name].input[0]) in CODE_TYPES:
                name = producers[name].input[0]
            found.add(name)
    return found & qdq_tensors, found - qdq_tensors


def round_trips(lowered: onnx.ModelProto, activations: set[str]) -> tuple[int, int]:
    """(all, through DequantizeLinear): QuantizeLinear nodes of `lowered` whose input float ops
    compute from integers, i.e. integer -> float -> integer transitions left. "All" counts a
    DequantizeLinear and a float head's Cast of an integer accumulator (MatMulInteger -> Cast ->
    Mul) alike as the way into float; the second number only DequantizeLinear -> float op(s) ->
    QuantizeLinear. A float activation's QuantizeLinear is not counted (it computes an activation
    the lowering chose to run in float: `activations`, qgraph.describe.float_activation_nodes)."""
    producers, constant, types = _producers(lowered), constant_derived(lowered), tensor_types(lowered)

    def dequantization(node: onnx.NodeProto, through_cast: bool) -> bool:
        return node.op_type == "DequantizeLinear" or (
            through_cast and node.op_type == "Cast" and types.get(node.input[0], TensorProto.FLOAT) not in FLOAT_TYPES)

    def reaches(name: str, memo: dict[str, bool], through_cast: bool) -> bool:
        stack = [name]
        while stack:                 # iterative: deep graphs exceed the recursion limit
            t = stack.pop()
            if t in memo:
                continue
            producer = producers.get(t)
            if producer is None or t in constant or producer.op_type == "QuantizeLinear" \
                    or types.get(t, TensorProto.FLOAT) not in FLOAT_TYPES:
                memo[t] = False
            elif dequantization(producer, through_cast):
                memo[t] = True
            else:
                pending = [i for i in producer.input if i and i not in memo]
                if pending:
                    stack.append(t)
                    stack.extend(pending)
                    continue
                memo[t] = any(memo[i] for i in producer.input if i)
        return memo[name]

    quantized = [n.input[0] for n in lowered.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constant
                 and n.name not in activations]
    counts = []
    for through_cast in (True, False):
        memo: dict[str, bool] = {}
        counts.append(sum(reaches(name, memo, through_cast) for name in quantized))
    return counts[0], counts[1]


def _ops_counted_once(entries: list[dict], regions: dict[str, str]) -> int:
    """Report entries (one per node) with the nodes of one exported activation counted once."""
    return len({regions.get(e["node"], e["node"]) for e in entries})


def lowering_numbers(target: str, qdq: onnx.ModelProto, lowered: onnx.ModelProto, report: dict,
                     regions: dict[str, str]) -> Lowered:
    from qgraph.describe import float_activation_nodes
    qdq_nodes = {n.name for n in qdq.graph.node}
    in_activations = float_activation_nodes(lowered)
    trips, dq_trips = round_trips(lowered, in_activations)
    activations = sum(n.op_type == "QuantizeLinear" and n.name in in_activations for n in lowered.graph.node)
    return Lowered(
        target,
        lowered=sum(report["lowered"].values()) + report.get("dequantize_sunk", 0),
        left_float=_ops_counted_once(report["skipped"], regions),
        float_islands=_ops_counted_once(report["float_by_placement"], regions),
        outside=sum(e["node"] in qdq_nodes for e in report["outside_region"]),
        compute=sum(n.op_type in COMPUTE_OPS for n in qdq.graph.node),
        compute_float=sum(n.op_type in COMPUTE_OPS for n in lowered.graph.node),
        round_trips=trips, dq_round_trips=dq_trips, float_activations=activations)


def deployment(key: str, entry: zoo.ZooEntry, float_model: onnx.ModelProto, qdq: onnx.ModelProto,
               qoperator: onnx.ModelProto | None, x_eval: np.ndarray, diff_samples: int, repeats: int,
               echo) -> Deployment:
    """Placement counts of `qdq` (qgraph's ptq model), both lowerings, their diff verdicts,
    interpreter/ORT time and ORT latency at batch 1."""
    from qgraph.diff import diff_models
    from qgraph.graph import QModel
    from qgraph.idioms import index_tensors, unary_regions
    from qgraph.lowering import lower_model

    result = Deployment(key)
    qmodel = QModel.from_onnx(qdq)
    index = index_tensors(qmodel)
    regions = {node: region.output for region in unary_regions(qmodel) for node in region.nodes}
    constant = constant_derived(qdq)
    quantizers = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constant]
    result.act_quantizers = len(quantizers)
    result.index_quantizers = sum(n.input[0] in index for n in quantizers)
    needed = compute_inputs(qdq, index)
    result.compute_inputs = len(needed)
    codes = {n.output[0] for n in quantizers}
    consumed: set[str] = set()
    lowered_models = {}
    for target in TARGETS:
        try:
            model, report = lower_model(qdq, target)
        except Exception as exc:  # noqa: BLE001 - a failing lowering is a result
            result.targets.append(Lowered(target, error=f"lowering failed: {error_line(exc)} [{_where(exc)}]"))
            continue
        lowered_models[target] = model
        numbers = lowering_numbers(target, qdq, model, report, regions)
        mine, made = integer_inputs(model, codes | {t for n in qdq.graph.node for t in n.output}, frozenset(codes))
        consumed |= mine
        numbers.lowering_codes = len(made)
        try:
            data = {entry.input_name: x_eval[:diff_samples]}
            verdict = diff_models(model, data, per_layer=False)
            numbers.diff_passed, numbers.diff_bit_exact = verdict.passed, verdict.bit_exact
            numbers.diff_summary = verdict.summary()
        except Exception as exc:  # noqa: BLE001
            numbers.diff_summary = f"diff failed: {error_line(exc)} [{_where(exc)}]"
        result.targets.append(numbers)
    result.integer_inputs = len(consumed)
    result.needed = len(needed | consumed)
    if repeats:
        time_interpreter(entry, lowered_models, result.targets, x_eval[:1], repeats)
        variants = {"float": (float_model, 0)}
        if qoperator is not None:
            variants["ORT QOperator"] = (qoperator, None)
        variants.update({f"qgraph {t}": (m, None) for t, m in lowered_models.items()})
        result.latency_ms = _benchmark("latency").time_variants(entry, variants, x_eval, 1, repeats, 1)
    for line_ in deployment_lines(result):
        echo(line_)
    return result


def time_interpreter(entry: zoo.ZooEntry, models: dict, targets: list[Lowered], x1: np.ndarray,
                     repeats: int) -> None:
    """interp/ORT on one sample, one thread each (ORT intra-op 1, BLAS 1), alternated: the
    interpreter as `qgraph diff` runs it (a compiled plan; qgraph.interp.run on a cached plan)."""
    from qgraph.interp import compile_model, set_blas_threads
    from qgraph.runner import Runner
    paired_times = _benchmark("interp").paired_times
    feeds = {entry.input_name: x1}
    previous = set_blas_threads(1)
    try:
        for numbers in targets:
            if numbers.target not in models:
                continue
            ort, plan = Runner(models[numbers.target], threads=1), compile_model(models[numbers.target])
            try:
                numbers.ort_ms, numbers.interp_ms, numbers.interp_ratio = paired_times(
                    lambda: ort.run(feeds), lambda: plan.run(feeds), repeats)
            except Exception as exc:  # noqa: BLE001
                numbers.error = f"timing failed: {error_line(exc)}"
    finally:
        if previous is not None:
            set_blas_threads(previous)


def deployment_lines(d: Deployment) -> list[str]:
    lines = [f"{d.model:<17} placement: {d.act_quantizers} activation quantizers / {d.needed} needed "
             f"({d.compute_inputs} compute inputs + {d.needed - d.compute_inputs} more that integer ops read) "
             f"= {d.ratio:.2f}; {d.index_quantizers} on index tensors"]
    for t in d.targets:
        if t.error and not t.lowered:
            lines.append(f"{d.model:<17} {t.target:<8} ERROR {t.error}")
            continue
        timing = "" if t.interp_ratio is None else \
            f"; interp {t.interp_ms:.1f} ms / ORT {t.ort_ms:.1f} ms = {t.interp_ratio:.1f}x"
        lines.append(f"{d.model:<17} {t.target:<8} lowered {t.lowered}/{t.lowered + t.left_float} "
                     f"({100 * t.share:.0f}%), float islands {t.float_islands}, outside {t.outside}, compute "
                     f"{t.compute - t.compute_float}/{t.compute}, round trips {t.round_trips} ({t.dq_round_trips} from DQ)"
                     + (f", float activations {t.float_activations}" if t.float_activations else "")
                     + f"{timing}; {t.diff_summary}" + (f" ERROR {t.error}" if t.error else ""))
    if d.latency_ms:
        lines.append(f"{d.model:<17} ORT batch 1: " + ", ".join(
            f"{k} {v:.2f} ms" if isinstance(v, float) else f"{k} fail ({v})" for k, v in d.latency_ms.items()))
    return lines


# --- fidelity ------------------------------------------------------------------------------------

def score(result: Result, entry: zoo.ZooEntry, model: onnx.ModelProto, x_eval: np.ndarray,
          reference: list[np.ndarray], samples: list[zoo.Sample], names: list[str]) -> Result:
    """Run `model` on the evaluation inputs and fill in fidelity and task agreement."""
    outputs = zoo.run_entry(entry, zoo.ort_session(model), x_eval)
    result.outputs = [{"name": name, "cosine": zoo.cosine(ref, got), "snr_db": zoo.snr_db(ref, got)}
                      for name, ref, got in zip(names, reference, outputs)]
    result.agreement, result.agreement_text = zoo.task_agreement(entry, reference, outputs)
    result.digits_exact = digits_exact(entry, outputs, samples)
    return result


def digits_exact(entry: zoo.ZooEntry, outputs: list[np.ndarray], samples: list[zoo.Sample]) -> float | None:
    """Share of MNIST strips a ddddocr model reads exactly (labels are known only for those)."""
    if not entry.charset:
        return None
    decoded = zoo.decode(entry, outputs)
    pairs = [(s.text, text) for s, text in zip(samples, zoo.ocr_text(entry, decoded)) if s.text]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def qgraph_ptq(float_path: Path, calib: dict, batch_size: int = 64,
               pipeline: str = "ptq") -> tuple[onnx.ModelProto, float]:
    """The bundled `ptq` pipeline (or `pipeline`, a bundled name or a YAML path) on the saved float
    model, as `qgraph passes run --pipeline ptq` does (load_model, then the pipeline; the same
    model as apply_pipeline(model, "ptq", calib))."""
    from qgraph.api import apply_pipeline
    from qgraph.model_io import load_model
    start = time.perf_counter()
    model = apply_pipeline(load_model(float_path), pipeline, calib, batch_size=batch_size)
    return model, time.perf_counter() - start


class _Reader:
    """ORT CalibrationDataReader over the calibration set (one sample per batch for fixed-batch models)."""

    def __init__(self, entry: zoo.ZooEntry, data: np.ndarray, batch_size: int = 8):
        step = 1 if entry.fixed_batch else batch_size
        self._batches = iter([{entry.input_name: data[i:i + step]} for i in range(0, len(data), step)])

    def get_next(self):
        return next(self._batches, None)


@contextlib.contextmanager
def working_directory(path: Path):
    """Run ORT's quantization tools inside the temp dir: when symbolic shape inference fails,
    quant_pre_process leaves a weights file named by a UUID in the current directory."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def root_log_level(level: int):
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)


ORT_MIN_OPSET = 13  # quantize_static refuses per-channel QDQ below opset 13


def ort_source(float_model: onnx.ModelProto, float_path: Path, tmp: Path) -> tuple[Path, str]:
    """The file ORT starts from: the float model, its opset raised with onnx's version converter when
    quantize_static would refuse it (as an ORT user does; qgraph's load_model does the same)."""
    opset = next(o.version for o in float_model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= ORT_MIN_OPSET:
        return float_path, ""
    from onnx import version_converter
    path = tmp / "float_opset17.onnx"
    onnx.save(version_converter.convert_version(float_model, 17), str(path))
    return path, f"opset {opset} -> 17 (onnx.version_converter)"


def ort_preprocess(float_path: Path, tmp: Path) -> tuple[Path, str]:
    """quant_pre_process with symbolic shape inference, else without it, else the raw model."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    notes = []
    for skip_symbolic in (False, True):
        out = tmp / f"pre_{int(skip_symbolic)}.onnx"
        try:
            with working_directory(tmp):
                quant_pre_process(str(float_path), str(out), skip_symbolic_shape=skip_symbolic)
            label = "quant_pre_process" + (" (skip_symbolic_shape)" if skip_symbolic else "")
            return out, "; ".join([*notes, label])
        except Exception as exc:  # report why, then try the next, weaker form
            notes.append(f"quant_pre_process{' (skip_symbolic_shape)' if skip_symbolic else ''} failed: "
                         f"{error_line(exc)}")
    return float_path, "; ".join([*notes, "raw model"])


def ort_quantize(entry: zoo.ZooEntry, source: Path, method: str, calib: np.ndarray, tmp: Path,
                 quant_format: str = "QDQ") -> onnx.ModelProto:
    """ORT quantize_static: per-channel int8 weights, uint8 activations, `method` calibration,
    `quant_format` QDQ or QOperator (benchmarks/latency.py times the QOperator form)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(entry, calib)
    out = tmp / f"ort_{method}_{quant_format}.onnx"
    # calibrators print progress; QOperator logs a multi-line warning per int64 shape tensor on the root logger
    with contextlib.redirect_stdout(io.StringIO()), working_directory(tmp), root_log_level(logging.ERROR):
        quantize_static(str(source), str(out), reader, quant_format=getattr(QuantFormat, quant_format),
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    return onnx.load(str(out))


@dataclass
class Options:
    n_calib: int
    n_eval: int
    methods: list[str]
    ort: bool = True
    lowering: bool = True
    diff_samples: int = 4
    repeats: int = 15
    pipeline: str = "ptq"


def benchmark_model(key: str, options: Options, echo) -> tuple[list[Result], Deployment | None]:
    entry = zoo.zoo_entry(key)
    float_model = zoo.zoo_model(key)
    calib = zoo.zoo_inputs(key, options.n_calib, "calib")
    samples = zoo.zoo_samples(key, options.n_eval, "eval")
    x_eval = np.stack([s.array for s in samples])
    names = [o.name for o in float_model.graph.output]
    reference = zoo.run_entry(entry, zoo.ort_session(float_model), x_eval)
    ops, qdq = count_ops(float_model)
    base = Result(key, "float", "fp32", ops, qdq, note=entry.source)
    results = [score(base, entry, float_model, x_eval, reference, samples, names)]
    echo(line(results[-1]))
    with tempfile.TemporaryDirectory(prefix=f"zoo-{key}-") as tmp_name:
        tmp = Path(tmp_name)
        float_path = tmp / "float.onnx"
        onnx.save(float_model, str(float_path))
        config = QGRAPH_CONFIG if options.pipeline == "ptq" else f"pipeline {options.pipeline}"
        result, ptq_model = run_setting(key, "qgraph", config,
                                        lambda: qgraph_ptq(float_path, calib, pipeline=options.pipeline),
                                        entry, x_eval, reference, samples, names)
        results.append(result)
        echo(line(results[-1]))
        qoperator = None
        if options.ort:
            start = time.perf_counter()
            source, opset_note = ort_source(float_model, float_path, tmp)
            prepared, pre_note = ort_preprocess(source, tmp)
            pre_note = "; ".join(n for n in (opset_note, pre_note) if n)
            pre_seconds = time.perf_counter() - start
            for method in options.methods:
                def quantize(method=method):
                    begin = time.perf_counter()
                    model = ort_quantize(entry, prepared, method, calib[entry.input_name], tmp)
                    return model, pre_seconds + time.perf_counter() - begin
                result, _ = run_setting(key, "ort", f"QDQ per-channel {method}", quantize, entry, x_eval,
                                        reference, samples, names)
                result.note = pre_note
                results.append(result)
                echo(line(results[-1]))
            if options.lowering and options.repeats:
                try:
                    qoperator = ort_quantize(entry, prepared, "MinMax", calib[entry.input_name], tmp, "QOperator")
                except Exception as exc:  # noqa: BLE001 - a failing tool is a result
                    echo(f"{key:<17} ort     QOperator MinMax            ERROR {error_line(exc)}")
    if not options.lowering:
        return results, None
    if ptq_model is None:
        return results, Deployment(key, error="ptq failed")
    found = deployment(key, entry, float_model, ptq_model, qoperator, x_eval, options.diff_samples,
                       options.repeats, echo)
    if options.ort and options.repeats and qoperator is None:
        found.latency_ms.setdefault("ORT QOperator", "quantize_static QOperator failed")
    return results, found


def run_setting(key, tool, config, quantize, entry, x_eval, reference, samples, names
                ) -> tuple[Result, onnx.ModelProto | None]:
    """Quantize and score one setting; any failure becomes the result's error line."""
    result = Result(key, tool, config)
    try:
        model, result.seconds = quantize()
    except Exception as exc:
        result.error = f"quantization failed: {error_line(exc)}"
        result.note = _where(exc)
        return result, None
    result.ops, result.qdq = count_ops(model)
    result.act_quantizers, result.weight_quantizers = count_quantizers(model)
    try:
        return score(result, entry, model, x_eval, reference, samples, names), model
    except Exception as exc:
        result.error = f"quantized model does not run: {error_line(exc)}"
        return result, model


def _where(exc: BaseException) -> str:
    """file:line of the innermost qgraph (else innermost) frame, so a failure names the code that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/qgraph/" in f.filename.replace("\\", "/")] or frames
    if not ours:
        return ""
    frame = ours[-1]
    path = frame.filename.split("/qgraph/", 1)[-1] if "/qgraph/" in frame.filename else Path(frame.filename).name
    return f"{'qgraph/' + path if '/qgraph/' in frame.filename else path}:{frame.lineno} in {frame.name}"


def line(r: Result) -> str:
    if r.error:
        return f"{r.model:<17} {r.tool:<7} {r.config:<27} ERROR {r.error}" + (f" [{r.note}]" if r.note else "")
    agreement = "-" if r.agreement is None or r.tool == "float" else f"{r.agreement:6.3f} ({r.agreement_text})"
    digits = "" if r.digits_exact is None else f"  digits exact {r.digits_exact:.2f}"
    fidelity = "" if r.tool == "float" else f"cos {r.min_cosine:8.5f}  SNR {r.min_snr:6.1f} dB  "
    quantizers = f"(a {r.act_quantizers:3d}, w {r.weight_quantizers:3d})" if r.tool != "float" else " " * 16
    return (f"{r.model:<17} {r.tool:<7} {r.config:<27} ops {r.ops:4d}  Q/DQ {r.qdq:4d} {quantizers} "
            f"{r.seconds:6.1f}s  {fidelity}{agreement}{digits}")


def best_ort(results: list[Result]) -> Result | None:
    """The ORT setting with the best task agreement, then the best worst-output SNR."""
    done = [r for r in results if r.tool == "ort" and not r.error]
    return max(done, key=lambda r: (np.nan_to_num(r.agreement, nan=-1.0), r.min_snr)) if done else None


def summary(results: list[Result]) -> list[str]:
    rows = [f"{'model':<17} {'ops':>4} {'Q/DQ qg':>7} {'Q/DQ ort':>8} {'aQ qg':>5} {'aQ ort':>6} {'cos qg':>8} {'cos ort':>8} "
            f"{'SNR qg':>6} {'SNR ort':>7} {'task qg':>7} {'task ort':>8} {'t qg':>6} {'t ort':>6}  ort best"]
    for model in dict.fromkeys(r.model for r in results):
        mine = [r for r in results if r.model == model]
        base = next(r for r in mine if r.tool == "float")
        qg = next((r for r in mine if r.tool == "qgraph"), None)
        ort = best_ort(mine)

        def cell(r, attr, fmt):
            if r is None or r.error:
                return "fail"
            value = getattr(r, attr)
            return "-" if value is None else format(value, fmt)
        if base.error:
            rows.append(f"{model:<17} unavailable: {base.error}")
            continue
        ran_ort = any(r.tool == "ort" for r in mine)     # not with --skip-ort
        ort_cells = [cell(ort, a, f) if ran_ort else "-" for a, f in (
            ("qdq", "d"), ("act_quantizers", "d"), ("min_cosine", ".5f"), ("min_snr", ".1f"),
            ("agreement", ".3f"), ("seconds", ".1f"))]
        rows.append(f"{model:<17} {base.ops:4d} {cell(qg, 'qdq', 'd'):>7} {ort_cells[0]:>8} "
                    f"{cell(qg, 'act_quantizers', 'd'):>5} {ort_cells[1]:>6} "
                    f"{cell(qg, 'min_cosine', '.5f'):>8} {ort_cells[2]:>8} "
                    f"{cell(qg, 'min_snr', '.1f'):>6} {ort_cells[3]:>7} "
                    f"{cell(qg, 'agreement', '.3f'):>7} {ort_cells[4]:>8} "
                    f"{cell(qg, 'seconds', '.1f'):>6} {ort_cells[5]:>6}  "
                    f"{ort.config.split()[-1] if ort else '-'}")
    return rows


def deployment_summary(deployments: list[Deployment]) -> list[str]:
    """Per model: placement ratio and index quantizers; per target: lowering, diff, interp/ORT."""
    rows = [f"{'model':<17} {'aQ':>4} {'C':>4} {'needed':>6} {'ratio':>5} {'idxQ':>4}  {'target':<8} {'lowered':>9} "
            f"{'share':>6} {'islands':>7} {'w/ isl.':>7} {'outside':>7} {'compute':>8} {'trips':>5} "
            f"{'diff':>10} {'interp/ORT':>10}"]
    for d in deployments:
        head = (f"{d.model:<17} {d.act_quantizers:4d} {d.compute_inputs:4d} {d.needed:6d} {d.ratio:5.2f} "
                f"{d.index_quantizers:4d}")
        if d.error:
            rows.append(f"{head}  {d.error}")
            continue
        for i, t in enumerate(d.targets):
            lead = head if i == 0 else " " * len(head)
            if t.error and not t.lowered:
                rows.append(f"{lead}  {t.target:<8} {t.error}")
                continue
            verdict = "-" if t.diff_passed is None else \
                ("exact" if t.diff_bit_exact else "pass") if t.diff_passed else "FAIL"
            ratio = "-" if t.interp_ratio is None else f"{t.interp_ratio:.1f}x"
            rows.append(f"{lead}  {t.target:<8} {t.lowered:4d}/{t.lowered + t.left_float:<4d} "
                        f"{100 * t.share:5.1f}% {t.float_islands:7d} {100 * t.share_with_islands:6.1f}% "
                        f"{t.outside:7d} {t.compute - t.compute_float:3d}/{t.compute:<4d} {t.round_trips:5d} "
                        f"{verdict:>10} {ratio:>10}")
    return rows


def latency_summary(deployments: list[Deployment]) -> list[str]:
    variants = _benchmark("latency").VARIANTS
    rows = [f"{'model':<17} {'float ms':>9} " + " ".join(f"{v:>14}" for v in variants[1:])
            + "   (ms per sample, batch 1, one thread; x = ratio to float)"]
    for d in deployments:
        if not d.latency_ms:
            continue
        base = d.latency_ms.get("float")
        cells = []
        for name in variants[1:]:
            value = d.latency_ms.get(name)
            if isinstance(value, float) and isinstance(base, float):
                cells.append(f"{value:6.2f} {value / base:5.2f}x")
            else:
                cells.append(f"{'fail' if value is not None else '-':>13}")
        rows.append(f"{d.model:<17} {base if isinstance(base, str) else format(base, '9.2f'):>9} "
                    + " ".join(f"{c:>14}" for c in cells))
    return rows


TASK_GOALS = {"yolov8": 0.95, "yolox": 0.95, "probmap": 0.95, "ctc": 0.90}  # issue 12: boxes matched, OCR strings


def goals(results: list[Result], deployments: list[Deployment]) -> list[str]:
    """Issue 12's and 13's goals per model: yes / NO / - (not measured or not applicable)."""
    def mark(ok):
        return "-" if ok is None else "yes" if ok else "NO"
    by_model = {d.model: d for d in deployments}
    rows = [f"{'model':<17} {'cos.99':>6} {'cos>=ORT':>8} {'task':>4} {'task>=ORT':>9} {'ratio':>5} {'idx0':>4} | "
            f"{'low95':>5} {'w/isl':>5} {'comp':>4} {'diff':>4} {'interp5x':>8} {'ql<=QOp':>7} {'int5xql':>7}"]
    for model in dict.fromkeys(r.model for r in results):
        mine = [r for r in results if r.model == model]
        qg = next((r for r in mine if r.tool == "qgraph" and not r.error), None)
        orts = [r for r in mine if r.tool == "ort" and not r.error]
        ran_ort = any(r.tool == "ort" for r in mine)
        cos = cos_ort = task = task_ort = None
        if qg is not None:
            cos = qg.min_cosine >= 0.99
            goal = TASK_GOALS.get(zoo.ZOO[model].decoder)
            task = None if goal is None else qg.agreement >= goal
            if ran_ort:                      # every ORT setting failed: qgraph is ahead
                cos_ort = not orts or qg.min_cosine >= max(r.min_cosine for r in orts)
                task_ort = not orts or np.nan_to_num(qg.agreement, nan=-1) >= max(
                    np.nan_to_num(r.agreement, nan=-1) for r in orts)
        d = by_model.get(model)
        targets = d.targets if d and not d.error else []
        done = bool(targets) and all(not (t.error and not t.lowered) for t in targets)
        ratio = None if not d or d.error else d.ratio <= 1.2
        index = None if not d or d.error else d.index_quantizers == 0
        lowered = with_islands = compute = diff = interp = None
        if done:
            lowered = all(t.share >= 0.95 for t in targets)
            with_islands = all(t.share_with_islands >= 0.95 for t in targets)
            compute = all(t.compute_float == 0 for t in targets)
            diff = None if any(t.diff_passed is None for t in targets) else all(t.diff_passed for t in targets)
            interp = None if any(t.interp_ratio is None for t in targets) else all(t.interp_ratio <= 5 for t in targets)
        ms = d.latency_ms if d else {}
        qlinear, integer, qoperator = (ms.get(k) for k in ("qgraph qlinear", "qgraph integer", "ORT QOperator"))
        fast = None if not isinstance(qlinear, float) or qoperator is None else \
            not isinstance(qoperator, float) or qlinear <= qoperator      # ORT's QOperator failed: nothing to beat
        integer_fast = None if not isinstance(qlinear, float) or not isinstance(integer, float) else \
            integer <= 5 * qlinear
        rows.append(f"{model:<17} {mark(cos):>6} {mark(cos_ort):>8} {mark(task):>4} {mark(task_ort):>9} "
                    f"{mark(ratio):>5} {mark(index):>4} | {mark(lowered):>5} {mark(with_islands):>5} "
                    f"{mark(compute):>4} {mark(diff):>4} {mark(interp):>8} {mark(fast):>7} {mark(integer_fast):>7}")
    return rows


def finite(value):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return [finite(v) for v in value] if isinstance(value, list) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.ZOO), help="comma-separated zoo keys")
    parser.add_argument("--images", type=int, default=24, help="calibration and evaluation samples each")
    parser.add_argument("--calib", type=int, help="calibration samples (default: --images)")
    parser.add_argument("--eval", type=int, help="evaluation samples (default: --images)")
    parser.add_argument("--methods", default=",".join(ORT_METHODS), help="ORT calibration methods")
    parser.add_argument("--skip-ort", action="store_true",
                        help="no ORT quantize_static (neither the QDQ peers nor the QOperator latency)")
    parser.add_argument("--skip-lowering", action="store_true",
                        help="fidelity only: no placement ratio, lowering, diff or timing")
    parser.add_argument("--diff-samples", type=int, default=4, help="evaluation samples `qgraph diff` compares")
    parser.add_argument("--repeats", type=int, default=15,
                        help="timing rounds (interp/ORT and ORT latency at batch 1); 0: no timing")
    parser.add_argument("--pipeline", default="ptq",
                        help="qgraph's pipeline in place of the bundled ptq: a bundled name or a YAML file")
    parser.add_argument("--json", default="zoo_results.json", help="where to write all numbers")
    args = parser.parse_args()
    n_calib, n_eval = args.calib or args.images, args.eval or args.images
    keys = args.models.split(",")
    unknown = [key for key in keys if key not in zoo.ZOO]
    if unknown:  # before any work
        parser.error(f"unknown zoo model {unknown[0]!r}; choose from: {', '.join(zoo.ZOO)}")
    for flag in ("diff_samples", "repeats"):
        if getattr(args, flag) < (1 if flag == "diff_samples" else 0):
            parser.error(f"--{flag.replace('_', '-')} must be >= {1 if flag == 'diff_samples' else 0}")
    options = Options(n_calib, n_eval, args.methods.split(","), ort=not args.skip_ort,
                      lowering=not args.skip_lowering, diff_samples=min(args.diff_samples, n_eval),
                      repeats=args.repeats, pipeline=args.pipeline)

    def echo(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results: list[Result] = []
    deployments: list[Deployment] = []
    for key in keys:
        try:
            found, deployed = benchmark_model(key, options, echo)
            results += found
            if deployed is not None:
                deployments.append(deployed)
        except zoo.ZooUnavailable as exc:
            results.append(Result(key, "float", "fp32", error=str(exc)))
            echo(line(results[-1]))
    print("\nall settings:")
    print("\n".join(line(r) for r in results))
    print(f"\nfidelity ({n_calib} calibration / {n_eval} evaluation samples; worst output's cosine and SNR; "
          "ORT: best setting by task agreement):")
    print("\n".join(summary(results)))
    if deployments:
        print(f"\nplacement and lowering (qgraph ptq; diff on {options.diff_samples} evaluation samples; "
              "interp/ORT at batch 1, one thread):")
        print("\n".join(deployment_summary(deployments)))
        if any(d.latency_ms for d in deployments):
            print(f"\nORT latency at batch 1 (median of {options.repeats} interleaved rounds):")
            print("\n".join(latency_summary(deployments)))
    print("\ngoals (issue 12 | issue 13; see the module docstring):")
    print("\n".join(goals(results, deployments)))
    Path(args.json).write_text(json.dumps(finite({
        "calib": n_calib, "eval": n_eval, "diff_samples": options.diff_samples, "repeats": options.repeats,
        "results": [{**asdict(r), "min_cosine": r.min_cosine, "min_snr": r.min_snr} for r in results],
        "deployments": [{**asdict(d), "ratio": d.ratio,
                         "targets": [{**asdict(t), "share": t.share, "share_with_islands": t.share_with_islands}
                                     for t in d.targets]} for d in deployments]}), indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
