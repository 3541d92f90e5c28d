"""How far the interpreter's float results may be from ONNX Runtime's, per op: the one table that
`qgraph diff` gates on and the interpreter's tests assert.

Integer and boolean results are always exact. A float result is compared with ORT's in float32
ulp ("units in the last place"): ``ulp`` of each reference element, ``range_ulp`` of the largest
reference magnitude in the tensor, or an absolute bound; an element passes when

    |interp - ort| <= max(ulp · ulp(ort), range_ulp · ulp(max|ort|), atol)

and NaN/±Inf sit in the same places. The families, measured against ORT 1.19 (CPU, x86-64) by
tests/test_interp_ops.py and tests/test_interp_conformance.py:

| family | bound | ops | why they differ |
|---|---|---|---|
| exact | 0 | data movement, selection, IEEE arithmetic (Add…Div, Relu, Clip, HardSwish, …), Cast, quantization ops, MLAS transcriptions (Sigmoid, Tanh, Erf, Gelu) | same operations in the same order |
| libm | 3 ulp (Mish 6; Log also 2⁻²² absolute) | Exp, Log, Pow, Softplus, trigonometric and hyperbolic functions | ORT: Eigen's vectorized exp/log; NumPy: correctly rounded libm/SIMD |
| rsqrt | 8 ulp | Sqrt | ORT: Eigen's fast-math sqrt, ``x·r₁`` with ``r₁`` one Newton step from the CPU's 12-bit rsqrt estimate (below); NumPy: correctly rounded |
| exp-minus-one | 3 ulp or 4·2⁻²³·alpha(·gamma) | Elu, Selu, Celu | exp(x) − 1 in float32: near 0 a few ulp of 1.0, not of the cancelled result |
| recursive sum | max(16, n) range ulp | GlobalAveragePool | ORT's NCHWc layout pass may run it as one sequential float32 sum per channel (below) |
| accumulation | max(16, 2√n) range ulp or ulp of the partial sums' scale | Conv, ConvTranspose, MatMul, Gemm, Einsum, windowed pooling averages, reductions, Softmax, LogSoftmax, normalizations, Resize cubic / crop / antialiased, GridSample bicubic, RoiAlign, CumSum, DFT, STFT, windows | the same sums in another order (OpenBLAS or float64 here, MLAS/Eigen float32 in ORT) |
| recurrent | max(16, 2√n) range ulp or ulp of the gate inputs' scale | LSTM, GRU, RNN | GEMM summation order, compounded per step |

n is the number of terms summed into one output element, from the op's input shapes
(:func:`summed_terms`): C/group·kh·kw for a Conv, K for a MatMul or Gemm, I + H for a recurrent
step, the reduced size for a reduction, Softmax or normalization; 1 where it is not known. The
rounding errors of a float32 sum grow like a random walk, so with √n: on the developers' zoo
(YOLOv8n, YOLOX, CRNN+LSTM, PP-LCNet, ViT, DB, SVTR; real images) the worst Conv reached 1.1·√K
range ulp (28.5 at K = 864), the CRNN's 512-wide bidirectional LSTM 1.4·√(I + H) (44 at 1024),
and a 6480-term ReduceSum of ONNX's NLL-loss tests 18; small shapes stay within 16.

A range ulp measures the error against the result's magnitude, but two summation orders differ
by about √n ulp of the partial sums, whose magnitude is that of the terms: where the terms
cancel (a classifier's last 1x1 conv, mixed-sign weights on ReLU features) or a recurrent op's
bounded outputs (tanh, sigmoid) read large inputs, that is more. So `qgraph diff` also allows
``max(16, 2√n)`` ulp of S, a bound on the partial sums from the node's actual inputs
(:func:`sum_scale`: ``max|x|·max Σ|w|`` per output for Conv, ConvTranspose, MatMul, Gemm; the
gates' ``max|X|·max Σ|W| + max(1, |H₀|)·max Σ|R| + |b|`` for LSTM, GRU, RNN). Measured: Silero
VAD's decoder LSTM reads ReLU features up to 5·10³ and differs from ORT by up to 7.8·10⁻⁵ (655 range
ulp of its cell state); its 128-to-1 output conv by 30 range ulp (22.6 allowed by n alone).

Log: Eigen's ``plog`` computes log(m) + e·ln 2 with m in [√½, √2), to an absolute error of about
2⁻²⁴ near the result's larger terms: where the result is small (x near 1, log of ±0.35 or less)
that is more than 3 of its ulp. Measured: 4 ulp (6·10⁻⁸ absolute) at log(0.78) on DNSMOS's
log-power spectrum; the bound adds 2⁻²² absolute.

Sqrt: ORT's float Sqrt is Eigen's ``psqrt`` under EIGEN_FAST_MATH: ``r₀ = rsqrt_ps(x)`` (relative
error at most 1.5·2⁻¹², and CPU-specific, so not transcribable), ``r₁ = r₀·(1.5 − 0.5x·r₀²)``, ``x·r₁``.
One Newton step leaves 1.5·e₀² ≤ 2.0·10⁻⁷, four float32 roundings at most 2.4·10⁻⁷ more: 4.4·10⁻⁷
relative, under 8 ulp of the result (an ulp is at least 2⁻²⁴ of it). Measured: 4 ulp on 564 thousand
of basic-pitch's CQT magnitudes (Spotify's transcription model, real-valued sums of squares).

GlobalAveragePool: the interpreter sums in MLAS's order (four lanes, MlasPoolGlobalKernel) and
matches ORT's plain kernel bit for bit, but ORT's NCHWc layout pass (ORT_ENABLE_ALL, AVX2/AVX-512)
rewrites some pools — which ones depends on its graph transforms, not on the model's ops — into
blocked-channel kernels that add each channel's n elements one after another. A recursive float32
sum is off by at most ``(n−1)·2⁻²⁴·Σ|x|``; for the mean of values of one sign ``Σ|x|/n ≤
max|out|`` and ``ulp(max|out|) > 2⁻²⁴·max|out|``, so the mean is off by less than n−1 range ulp,
plus half an ulp for the division: hence n. Measured on PP-OCRv4's detector: 1798 range ulp at
n = 14400 (a 120×120 map; 2√n would allow 240), 0 where ORT kept MLAS's kernel.

A bound applies to one op on identical inputs. How `qgraph diff` charges differences that flow
from op to op is in qgraph/diff.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Tolerance", "FAMILIES", "SUM_REDUCTIONS", "tolerance_for", "node_tolerance", "summed_terms", "EXACT",
           "sum_scale"]

_EPS32 = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Tolerance:
    """A per-element bound ``max(ulp · ulp(ref), range_ulp · ulp(max|ref|), atol)``."""
    family: str
    ulp: float = 0.0
    range_ulp: float = 0.0
    atol: float = 0.0

    @property
    def exact(self) -> bool:
        return not (self.ulp or self.range_ulp or self.atol)

    def for_terms(self, terms: int) -> "Tolerance":
        """This bound for sums of ``terms`` terms per output (see the module docstring)."""
        if self.family == "recursive-sum" and terms > self.range_ulp:
            return Tolerance(self.family, self.ulp, float(terms), self.atol)
        if self.range_ulp and terms > 64:
            return Tolerance(self.family, self.ulp, max(self.range_ulp, 2 * float(np.sqrt(terms))), self.atol)
        return self

    def describe(self) -> str:
        parts = []
        if self.ulp:
            parts.append(f"{self.ulp:g} ulp")
        if self.range_ulp:
            parts.append(f"{self.range_ulp:g} range ulp")
        if self.atol:
            parts.append(f"{self.atol:.2g} abs")
        return " or ".join(parts) if parts else "exact"

    def allowed(self, ref: np.ndarray) -> np.ndarray | float:
        """The bound per element of the (finite) reference values ``ref``."""
        if self.exact:
            return 0.0
        mag = np.abs(np.asarray(ref))
        dtype = mag.dtype if mag.dtype.kind == "f" else np.dtype(np.float32)
        bound = self.atol
        if self.range_ulp:
            top = mag.max(initial=0)
            bound = max(bound, self.range_ulp * float(np.spacing(dtype.type(top))))
        if self.ulp:
            return np.maximum(self.ulp * np.spacing(mag.astype(dtype)).astype(np.float64), bound)
        return bound

    def measure(self, ref: np.ndarray, got: np.ndarray) -> tuple[float, int]:
        """(worst |got - ref| / bound, elements beyond the bound). Non-finite values must sit in
        the same places with the same values; an element with a zero bound that differs counts
        as infinitely far."""
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.dtype.kind != "f" or got.dtype.kind != "f":
            beyond = int(np.count_nonzero(ref != got))
            return (float("inf") if beyond else 0.0), beyond
        finite = np.isfinite(ref)
        special = ~finite | ~np.isfinite(got)
        beyond = 0
        if special.any():
            same = (np.isnan(ref) & np.isnan(got)) | (ref == got)
            beyond = int(np.count_nonzero(special & ~same))
            keep = ~special
            ref, got = ref[keep], got[keep]
        if not ref.size:
            return (float("inf") if beyond else 0.0), beyond
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        bound = self.allowed(ref)
        if np.isscalar(bound) or np.ndim(bound) == 0:
            if float(bound) == 0.0:
                over = int(np.count_nonzero(diff))
                return (float("inf") if over or beyond else 0.0), over + beyond
            worst = float(diff.max()) / float(bound)
            over = int(np.count_nonzero(diff > bound))
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(diff == 0, 0.0, diff / bound)
            worst = float(ratio.max())
            over = int(np.count_nonzero(diff > bound))
        return (float("inf") if beyond else worst), over + beyond


EXACT = Tolerance("exact")

#: The families of the module docstring.
FAMILIES: dict[str, Tolerance] = {
    "exact": EXACT,
    "libm": Tolerance("libm", ulp=3),
    "libm-mish": Tolerance("libm", ulp=6),
    "rsqrt": Tolerance("rsqrt", ulp=8),
    "libm-log": Tolerance("libm", ulp=3, atol=2.0 ** -22),
    "accumulation": Tolerance("accumulation", range_ulp=16),
    "recursive-sum": Tolerance("recursive-sum", range_ulp=16),
    "recurrent": Tolerance("recurrent", range_ulp=16),
}

#: Elementwise functions whose ORT kernel has a bound of its own (the module docstring says why).
_OWN_BOUND = {"Mish": "libm-mish", "Sqrt": "rsqrt", "Log": "libm-log"}
_LIBM = ("Exp", "Pow", "Softplus", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh",
         "Asinh", "Acosh", "Atanh")
_ACCUMULATION = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "AveragePool", "LpPool",
                 "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "LayerNormalization",
                 "GroupNormalization", "MeanVarianceNormalization", "LRN", "Softmax", "LogSoftmax", "ReduceSum",
                 "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum",
                 "ReduceLogSumExp", "CumSum", "Col2Im", "DFT", "STFT", "Det", "RoiAlign", "AffineGrid",
                 "MelWeightMatrix", "HannWindow", "HammingWindow", "BlackmanWindow")
_RECURRENT = ("LSTM", "GRU", "RNN")

#: Sums over whole axes: the number of terms per output is input size / output size.
SUM_REDUCTIONS = frozenset({"ReduceSum", "ReduceMean", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum",
                            "ReduceLogSumExp", "GlobalAveragePool", "GlobalLpPool"})
_ALONG_AXIS = {"Softmax": -1, "LogSoftmax": -1, "LayerNormalization": -1, "CumSum": None}


def summed_terms(node, shapes: list, output_shape=None) -> int:
    """Terms summed into one output element of ``node`` given its input ``shapes`` (None where
    unknown) and, for reductions, its output's shape; 1 when the op sums nothing or a shape is
    missing."""
    op = node.op_type
    first = shapes[0] if shapes else None
    second = shapes[1] if len(shapes) > 1 else None
    attrs = {a.name: a for a in node.attribute}
    if op in ("Conv", "ConvInteger") and second is not None:
        return int(np.prod(second[1:]))
    if op == "ConvTranspose" and second is not None:
        group = attrs["group"].i if "group" in attrs else 1
        return max(1, second[0] // group) * int(np.prod(second[2:]))
    if op == "MatMul" and first is not None and len(first):
        return int(first[-1])
    if op == "Gemm" and first is not None and len(first) == 2:
        return int(first[0] if "transA" in attrs and attrs["transA"].i else first[1])
    if op in ("LSTM", "GRU", "RNN") and first is not None and second is not None:
        return int(first[-1]) + int(second[1]) // {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    if op in SUM_REDUCTIONS and first is not None and output_shape is not None:
        return max(1, int(np.prod(first)) // max(1, int(np.prod(output_shape))))
    if op in _ALONG_AXIS and first is not None and len(first):
        axis = attrs["axis"].i if "axis" in attrs else -1
        return int(first[axis])
    return 1


def _resize(attrs: dict) -> str:
    mode = attrs.get("mode", "nearest")
    crop = attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"
    antialias = attrs.get("antialias", 0) and mode != "nearest"   # a filter over many taps
    return "accumulation" if mode == "cubic" or crop or antialias else "exact"


def _grid_sample(attrs: dict) -> str:
    return "accumulation" if attrs.get("mode") in ("bicubic", "cubic") else "exact"


def _scatter(attrs: dict) -> str:
    return "exact" if attrs.get("reduction", "none") in ("none", "max", "min") else "accumulation"


#: Ops whose family depends on their attributes.
_BY_ATTRIBUTES: dict[str, Callable[[dict], str]] = {
    "Resize": _resize, "Upsample": _resize, "GridSample": _grid_sample, "ScatterElements": _scatter,
    "ScatterND": _scatter,
}


def _exp_minus_one(op: str, attrs: dict) -> Tolerance:
    alpha = float(attrs.get("alpha", {"Selu": 1.67326319217681884765625}.get(op, 1.0)))
    gamma = float(attrs.get("gamma", 1.05070102214813232421875)) if op == "Selu" else 1.0
    return Tolerance("exp-minus-one", ulp=3, atol=4 * _EPS32 * abs(alpha) * abs(gamma))


def family_of(op_type: str, domain: str = "", attrs: dict | None = None) -> str:
    """The tolerance family name of an op (``attrs``: decoded attribute values, for the ops whose
    family depends on them); ops not listed are exact."""
    attrs = attrs or {}
    if domain not in ("", "ai.onnx"):
        return "exact"   # com.microsoft: quantized kernels and MLAS transcriptions
    if op_type in _BY_ATTRIBUTES:
        return _BY_ATTRIBUTES[op_type](attrs)
    if op_type in _OWN_BOUND:
        return _OWN_BOUND[op_type]
    if op_type in _LIBM:
        return "libm"
    if op_type in ("Elu", "Selu", "Celu"):
        return "exp-minus-one"
    if op_type in ("Sum", "Mean"):
        return "accumulation" if attrs.get("_inputs", 2) > 2 else "exact"
    if op_type == "GlobalAveragePool":
        return "recursive-sum"
    if op_type in _ACCUMULATION:
        return "accumulation"
    if op_type in _RECURRENT:
        return "recurrent"
    return "exact"


def tolerance_for(op_type: str, domain: str = "", attrs: dict | None = None) -> Tolerance:
    """The bound on the float results of one op (integer results are always exact)."""
    attrs = attrs or {}
    family = family_of(op_type, domain, attrs)
    if family == "exp-minus-one":
        return _exp_minus_one(op_type, attrs)
    return FAMILIES[family]


def node_tolerance(node, terms: int = 1) -> Tolerance:
    """:func:`tolerance_for` of an ``onnx.NodeProto`` (its attributes decoded), for ``terms``
    summed terms per output (:func:`summed_terms`)."""
    from onnx import helper
    attrs = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        attrs[a.name] = value.decode() if isinstance(value, bytes) else value
    attrs["_inputs"] = sum(1 for t in node.input if t)
    return tolerance_for(node.op_type, node.domain, attrs).for_terms(terms)


def sum_scale(node, inputs: list) -> float | None:
    """A bound S on the partial sums of a Conv, ConvTranspose, MatMul, Gemm (``max|x|·max Σ|w|``
    over one output's terms) or an LSTM, GRU, RNN's gate pre-activations (``max|X|·max_g Σ|W_g| +
    max(1, max|H₀|)·max_g Σ|R_g| + max|Wb + Rb|``, the hidden state staying within ±1 after the
    first step with sigmoid and tanh activations) from the node's input values; None for other
    ops, a missing input, or other recurrent activations."""
    op = node.op_type
    if len(inputs) < 2 or any(v is None for v in inputs[:2]):
        return None
    a, b = (np.abs(np.asarray(v, np.float64)) for v in inputs[:2])
    attrs = {x.name: x for x in node.attribute}
    if op in ("Conv", "ConvTranspose") and b.ndim >= 2:
        axis = 1 if op == "ConvTranspose" else 0          # output channels of W
        per_output = np.moveaxis(b, axis, 0).reshape(b.shape[axis], -1).sum(axis=1)
        return float(a.max(initial=0)) * float(per_output.max(initial=0))
    if op == "MatMul" and a.ndim >= 1 and b.ndim >= 1:
        return float(a.max(initial=0)) * float((b.sum(axis=-2) if b.ndim >= 2 else b.sum()).max(initial=0))
    if op == "Gemm" and b.ndim == 2:
        trans_b = "transB" in attrs and attrs["transB"].i
        alpha = abs(attrs["alpha"].f) if "alpha" in attrs else 1.0
        return alpha * float(a.max(initial=0)) * float(b.sum(axis=1 if trans_b else 0).max(initial=0))
    if op not in _RECURRENT or len(inputs) < 3 or inputs[2] is None:
        return None
    for x in node.attribute:
        if x.name == "activations" and any((y.decode() if isinstance(y, bytes) else y).lower() not in
                                           ("sigmoid", "tanh") for y in x.strings):
            return None                      # a state other activations may push beyond ±1
    r = np.abs(np.asarray(inputs[2], np.float64))
    scale = float(a.max(initial=0)) * float(b.sum(axis=-1).max(initial=0))
    state = inputs[5] if len(inputs) > 5 else None
    h0 = 1.0 if state is None else max(1.0, float(np.abs(np.asarray(state, np.float64)).max(initial=0)))
    scale += h0 * float(r.sum(axis=-1).max(initial=0))
    if len(inputs) > 3 and inputs[3] is not None:
        bias = np.asarray(inputs[3], np.float64)
        half = bias.shape[-1] // 2
        scale += float(np.abs(bias[..., :half] + bias[..., half:]).max(initial=0))
    return scale
