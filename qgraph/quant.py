"""Quantization math: the one place for ranges, scales, zero points, rounding, saturation and
fixed-point multipliers. Every other module calls this one. NumPy only.

    q = saturate(round_half_even(x / scale) + zero_point, qmin, qmax)      (QuantizeLinear)
    x' = (q - zero_point) * scale                                          (DequantizeLinear)
    real ≈ M0 · 2^-31 · 2^-shift,  M0 ∈ [2^30, 2^31)                       (fixed-point multiplier)

Bit-exactness with ONNX Runtime 1.19 (CPU, MLAS) — what its kernels do, and what this module does:

- QuantizeLinear (mlas/lib/quantize.cpp, MlasQuantizeLinearKernel): a float32 *division*
  ``x / scale`` (MlasDivideFloat32x4, not a multiplication by the reciprocal), clamp to
  ``[qmin - zp, qmax - zp]`` (MAXPS/MINPS: NaN becomes qmin), convert with ``cvtps2dq`` (round
  half to even under the default MXCSR), then add the zero point. :func:`quantize` does the same.
- QLinearConv / QLinearMatMul (providers/cpu/quantization/qlinearconv.cc,
  quantize_linear_matmul.cc): the per-channel multiplier is computed in float32 as
  ``(x_scale * w_scale) / y_scale`` (that order), the int32 GEMM result plus int32 bias is
  converted to float32 (``cvtdq2ps``, round to nearest even beyond 2^24), multiplied by the
  multiplier in float32, clamped to ``[qmin - zp, qmax - zp]``, rounded half to even and the zero
  point added (MlasRequantizeOutput in quantize.cpp; the fused symmetric-weight path of
  convsym.cpp uses the same post-processing: MinimumValue/MaximumValue/OutputZeroPoint).
  :func:`ort_requant_multiplier` and :func:`requantize_float` model this.

Integer-only requantization (the ``integer`` lowering target), :func:`requantize_fixed_point`:
``y = clip(((acc · M0) + 2^(n-1)) >> n) + zp, qmin, qmax)`` with ``n = 31 + shift``, a 64-bit
product and an arithmetic (flooring) shift, i.e. round half *up* (toward +inf), one rounding.
ONNX ``BitShift`` only takes unsigned tensors and ORT's integer ``Div`` truncates toward zero,
so the lowering expresses the floor shift exactly with int64 Mul/Add/Mod/Sub/Div:
``floor(v / 2^n) = (v - Mod(v, 2^n)) / 2^n`` where ONNX ``Mod`` with ``fmod=0`` takes the
divisor's sign (a non-negative remainder), so the Div is exact. :func:`requantize_fixed_point_onnx_form`
lists these steps with their int64 constants; tests/test_quant.py runs them in ORT and checks
them bit for bit against :func:`requantize_fixed_point`.

The same function in fewer and cheaper ops, :func:`fixed_point_steps` (the form the lowering
emits; the Mod/Div form stays for multipliers below about 2^-22, where it does not fit):
the product, rounding constant, bias and zero point become one int64 ``v = acc·M + D`` that
bounds on the accumulator prove non-negative, and the floor shift becomes ORT's unsigned
``BitShift`` (its integer Div and Mod are scalar loops: the Mod/Div chain took 8.1 ms on a
64×80×80 accumulator, this one 2.1 ms). Cheaper still where a bound on the accumulator lets int32
hold it, :func:`division_steps`: the rule is a step function with at most 255 steps, and a
fraction ``p/q`` with a small numerator (a few hundred) puts every step on the same accumulator
value, so ``clip((acc·p + r) / q)`` — int32 Mul, Add and one Div — equals it bit for bit on the
bounded range (one Div on 4-byte tensors beats five ops on 8-byte ones).

16-bit grids (mixed precision keeps sensitive activations at 16 bits): ONNX allows int16/uint16
QuantizeLinear/DequantizeLinear only from opset 21, and qgraph writes opset 17. ORT 1.19 runs the
``com.microsoft`` QuantizeLinear/DequantizeLinear with int16/uint16 zero points at opset 17, with
the same float32 division and round-half-even as for 8 bits (probed with and without graph
optimizations); :func:`qdq_domain` names the domain a pair of a storage type needs.

AdaRound (Nagel et al. 2020) learns, per weight, whether to round down or up:
``W̃ = s·(clip(floor(W/s) + h(V) + z, qmin, qmax) − z)`` with the rectified sigmoid
``h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1)``, ζ = 1.1, γ = −0.1; after training h is 0 or 1
(:func:`rectified_sigmoid`, :func:`adaround_init`, :func:`quantize_rounded`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qgraph.errors import ConfigError

__all__ = [
    "qrange",
    "storage_dtype",
    "storage_range",
    "all_codes",
    "dtype_for_range",
    "UNSIGNED_OFFSET",
    "int8_as_uint8",
    "grid_bounds",
    "requant_multiplier",
    "bias_scale",
    "quantize_bias",
    "INT32_BIAS_RANGE",
    "coarsen_weights_for_int32_bias",
    "scale_zero_point",
    "round_half_even",
    "saturate",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_multiplier",
    "shared_shift_multipliers",
    "requantize_fixed_point",
    "requantize_fixed_point_onnx_form",
    "FixedPointSteps",
    "accumulator_bound",
    "fixed_point_steps",
    "DivisionSteps",
    "division_steps",
    "DIVISION_MAX_MULTIPLIER",
    "MEAN_MAX_COUNT",
    "MeanRequant",
    "mean_requant",
    "ort_requant_multiplier",
    "requantize_float",
    "ZERO_RANGE_SCALE",
    "GRID_BITS",
    "qdq_domain",
    "rectified_sigmoid",
    "adaround_init",
    "quantize_rounded",
    "ADAROUND_ZETA",
    "ADAROUND_GAMMA",
    "EQUALIZE_MIN_GAIN",
]

#: Scale used when a tensor's range is exactly zero (all values 0): any positive scale
#: represents 0 exactly; 1.0 keeps later arithmetic (x / scale, products of scales) tame.
ZERO_RANGE_SCALE = np.float32(1.0)

#: Smallest scale ever returned for a non-zero range: the smallest normal float32, so that
#: ``x / scale`` never divides by a denormal or by zero.
MIN_SCALE = np.float32(np.finfo(np.float32).tiny)


#: Channel equalization (the equalize_activations pass, and analyze's hint for it) pays where the
#: smallest channel would be expanded at least this much: at 1/16 of the largest it keeps only
#: 16 of an 8-bit grid's 256 steps.
EQUALIZE_MIN_GAIN = 16.0

#: Grid widths a quantizer may have: 2..8 bits in int8/uint8 storage, 16 bits in int16/uint16.
GRID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def qrange(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide grid; ``narrow_range`` drops the lowest
    code (``[-127, 127]`` for int8, ``[1, 255]`` for uint8)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in GRID_BITS:
        raise ConfigError(f"bits must be in 2..8 or 16, got {bits}")
    bits = int(bits)
    if signed:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        qmin, qmax = 0, (1 << bits) - 1
    if narrow_range:
        qmin += 1
    return qmin, qmax


def storage_dtype(signed: bool, bits: int = 8) -> type:
    """Storage type of quantized values: int8 or uint8 (sub-8-bit grids use a narrower qmin/qmax),
    int16 or uint16 for 16-bit grids."""
    if bits > 8:
        return np.int16 if signed else np.uint16
    return np.int8 if signed else np.uint8


#: The domain of a QuantizeLinear/DequantizeLinear pair per storage type at opset 17 (see the
#: module docstring: ai.onnx has int16 pairs only from opset 21).
MS_QDQ_DOMAIN = "com.microsoft"


def qdq_domain(dtype) -> str:
    """"" (ai.onnx) for 8-bit storage, ``com.microsoft`` for int16/uint16 storage."""
    return MS_QDQ_DOMAIN if np.dtype(dtype).itemsize > 1 else ""


def storage_range(dtype) -> tuple[int, int]:
    """Saturation range ``(qmin, qmax)`` of an integer storage type (int8, uint8, int16, ...):
    where QuantizeLinear saturates and where a Q→DQ pair's grid ends."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise ConfigError(f"{dtype.name} is not an integer storage type")
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def all_codes(dtype) -> np.ndarray:
    """Every code of an integer storage type, ascending (what a lookup table is indexed by:
    code q sits at index q − qmin)."""
    qmin, qmax = storage_range(dtype)
    return np.arange(qmin, qmax + 1).astype(dtype)


def dtype_for_range(qmin: int, qmax: int) -> type:
    """The smallest of uint8, int8 and int32 holding ``[qmin, qmax]``."""
    if qmin >= 0 and qmax <= 255:
        return np.uint8
    if qmin >= -128 and qmax <= 127:
        return np.int8
    return np.int32


_dtype_for_range = dtype_for_range

#: int8 code q and uint8 code q + 128 (zero point + 128) stand for the same real value:
#: ``(q − z)·s == ((q + 128) − (z + 128))·s``, and QuantizeLinear rounds the same way for both.
UNSIGNED_OFFSET = 128


def int8_as_uint8(q) -> np.ndarray:
    """int8 codes (or zero points) as the uint8 codes of the same real values: q + 128."""
    return (np.asarray(q).astype(np.int16) + UNSIGNED_OFFSET).astype(np.uint8)


def grid_bounds(scale, zero_point, qmin: int, qmax: int, axis: int | None = None, ndim: int = 1):
    """Real values ``((qmin − z)·s, (qmax − z)·s)`` of a grid's ends, in float32 as
    DequantizeLinear computes them; per channel along `axis` of an `ndim`-dimensional tensor."""
    scale = np.asarray(scale, np.float32)
    zero_point = np.broadcast_to(np.asarray(zero_point), scale.shape)
    lo = dequantize(np.full(scale.shape, qmin), scale, zero_point)
    hi = dequantize(np.full(scale.shape, qmax), scale, zero_point)
    if axis is None or scale.size == 1:
        return np.float32(lo.reshape(-1)[0]), np.float32(hi.reshape(-1)[0])
    return _along(lo, ndim, axis), _along(hi, ndim, axis)


def requant_multiplier(in_scale, w_scale, out_scale, divisor: int = 1) -> np.ndarray:
    """The real multiplier ``s_in · s_w / (divisor · s_out)`` of an integer accumulator, in
    float64 from the float32 scales (the integer target turns it into a fixed-point M0·2^-n with
    :func:`quantize_multiplier`; ORT's kernels use :func:`ort_requant_multiplier` instead).
    `w_scale` may be per channel; `divisor` counts the summed terms of an average."""
    s_in = np.float64(np.asarray(in_scale, np.float32).reshape(-1)[0])
    s_out = np.float64(np.asarray(out_scale, np.float32).reshape(-1)[0])
    return s_in * np.asarray(w_scale, np.float32).astype(np.float64) / (int(divisor) * s_out)


#: int32 bias range, kept 128 inside int32 so that its float32 clamp bounds are exact.
INT32_BIAS_RANGE = (-(2**31) + 128, 2**31 - 128)


def bias_scale(in_scale, w_scale) -> np.ndarray:
    """Scale of an int32 bias: ``s_in · s_w`` in float32 (what ORT's QDQ fusion and
    quantize_static use), per channel when `w_scale` is."""
    return (np.float32(np.asarray(in_scale, np.float32).reshape(-1)[0])
            * np.asarray(w_scale, np.float32)).astype(np.float32)


def quantize_bias(bias, in_scale, w_scale) -> np.ndarray:
    """A float bias as int32 at scale ``s_in · s_w`` per output channel (zero point 0)."""
    bias = np.asarray(bias, np.float32).reshape(-1)
    scale = np.broadcast_to(bias_scale(in_scale, w_scale), bias.shape)
    return quantize(bias, scale, 0, INT32_BIAS_RANGE[0], INT32_BIAS_RANGE[1], axis=0, dtype=np.int32)


def coarsen_weights_for_int32_bias(bias, in_scale, in_reach: int, codes, w_scale, w_zero_point,
                                   qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weight codes and scales with which every output channel's int32 accumulator holds its bias:
    ``|round(b / (s_in·s_w'))| + Σ|c' − z|·in_reach ≤ INT32_BIAS_RANGE[1]``. A channel that fails
    it (a near-dead channel with a tiny weight scale and a real bias: its bias at ``s_in·s_w``
    leaves int32) gets ``s_w' = s_w·2^k`` and ``c' = clip(round_half_even((c − z)/2^k) + z)`` with
    the least such k — the same bias, weights moved by at most ``2^(k−1)·s_w`` each, i.e. a
    channel output moved by at most ``Σ|x − z_x|·s_in·2^(k−1)·s_w < |b|·n·in_reach / 2^31``.
    `codes` has the output channel first; returns (codes, scales, k per channel); a per-tensor
    scale stays per tensor (every channel takes the largest k)."""
    codes = np.asarray(codes)
    channels = codes.shape[0]
    flat = codes.reshape(channels, -1).astype(np.int64)
    zp = np.broadcast_to(np.asarray(w_zero_point, np.int64).reshape(-1), (channels,))
    scale = np.asarray(w_scale, np.float32)
    scales = np.broadcast_to(scale.reshape(-1), (channels,)).astype(np.float64)
    b = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (channels,))
    s_in = np.float64(np.asarray(in_scale, np.float32).reshape(-1)[0])
    shifts = np.zeros(channels, np.int64)
    for c in range(channels):
        while True:
            step = 2.0 ** int(shifts[c])
            moved = np.clip(np.rint((flat[c] - zp[c]) / step) + zp[c], qmin, qmax)
            room = abs(b[c]) / (s_in * scales[c] * step) + np.abs(moved - zp[c]).sum() * in_reach
            if room <= INT32_BIAS_RANGE[1] or not np.isfinite(scales[c] * step * 2):
                break
            shifts[c] += 1
    if scale.size == 1:
        shifts[:] = shifts.max()
    steps = 2.0 ** shifts
    moved = np.clip(np.rint((flat - zp[:, None]) / steps[:, None]) + zp[:, None], qmin, qmax)
    new_scale = (scale * steps[:1].astype(np.float32)).reshape(scale.shape) if scale.size == 1 \
        else (scale.reshape(-1) * steps.astype(np.float32)).reshape(scale.shape)
    return moved.astype(codes.dtype).reshape(codes.shape), new_scale.astype(np.float32), shifts


def round_half_even(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even (IEEE default; ``cvtps2dq``, ``std::nearbyint``)."""
    return np.rint(x)


def saturate(q: np.ndarray, qmin: int, qmax: int, dtype=None) -> np.ndarray:
    """Clamp integers (or integral floats) to ``[qmin, qmax]`` and cast to ``dtype``
    (default: the smallest of uint8/int8/int32 holding the range)."""
    dtype = dtype or _dtype_for_range(qmin, qmax)
    return np.clip(q, qmin, qmax).astype(dtype)


def scale_zero_point(rmin, rmax, bits: int = 8, signed: bool = True, symmetric: bool = True,
                     narrow_range: bool = False, pow2: bool = False):
    """Scale (float32) and zero point (int32) covering ``[rmin, rmax]``, vectorized per channel.

    The range is first widened to include 0 so that 0 is exact. Symmetric signed: zp 0 and
    ``scale = max|r| / qmax``. Symmetric unsigned (a non-negative tensor, e.g. after ReLU): zp
    ``qmin`` (0) and ``scale = rmax / (qmax - qmin)``; negative values saturate to 0.
    Asymmetric: ``scale = (rmax - rmin) / (qmax - qmin)``, ``zp = clamp(round(qmin - rmin/scale))``.
    ``pow2`` rounds the scale *up* to a power of two so no extra clipping appears. A zero range
    gives :data:`ZERO_RANGE_SCALE`; a scale never falls below :data:`MIN_SCALE`.
    """
    qmin, qmax = qrange(bits, signed, narrow_range)
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(rmin)) and np.all(np.isfinite(rmax))):
        raise ConfigError("scale_zero_point: the range must be finite; check calibration data for inf/NaN")
    if symmetric and signed:
        scale = np.maximum(-rmin, rmax) / qmax
    elif symmetric:
        scale = rmax / (qmax - qmin)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
    zero = scale == 0.0
    scale = np.where(zero, float(ZERO_RANGE_SCALE), np.maximum(scale, float(MIN_SCALE)))
    if pow2:
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale32 = scale.astype(np.float32)
    # float32 rounding may have made the scale a hair smaller than the exact value; that only
    # moves rmax/scale by far less than half a step (no clipping beyond rounding).
    if symmetric:
        zp = np.full(scale32.shape, 0 if signed else qmin, dtype=np.int32)
    else:
        zp = np.clip(np.rint(qmin - rmin / scale32.astype(np.float64)), qmin, qmax).astype(np.int32)
    return scale32, zp


def _along(v, ndim: int, axis: int | None):
    """Reshape a per-channel vector so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    v = np.asarray(v)
    if v.size == 1 and (axis is None or v.ndim == 0):
        return v.reshape(())
    if axis is None:
        return v
    shape = [1] * ndim
    shape[axis % ndim] = v.size
    return v.reshape(shape)


def quantize(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None, dtype=None):
    """ONNX/ORT QuantizeLinear: ``saturate(round_half_even(x / scale) + zp)`` with a float32
    division, exactly as MLAS does it (NaN → qmin, ±inf → saturate). ``axis`` selects
    per-channel scale/zero point."""
    x = np.asarray(x, dtype=np.float32)
    s = _along(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    zp = _along(np.asarray(zero_point).astype(np.int32), x.ndim, axis)
    v = np.empty(np.broadcast_shapes(x.shape, s.shape), np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.divide(x, s, out=v)
    lo = (qmin - zp).astype(np.float32)
    hi = (qmax - zp).astype(np.float32)
    if qmax - qmin <= 1 << 16:
        # 8/16-bit grids: every step below is exact in float32, in place (the interpreter's hot path)
        np.fmax(v, lo, out=v)  # NaN -> lo: MAXPS returns its second operand for NaN
        np.fmin(v, hi, out=v)
        np.rint(v, out=v)      # round half to even, as round_half_even
        v += zp.astype(np.float32)
        q = v.astype(dtype or _dtype_for_range(qmin, qmax))
        return q[()] if q.ndim == 0 else q
    v = np.where(np.isnan(v), lo, v)  # MAXPS returns its second operand for NaN
    v = np.minimum(np.maximum(v, lo), hi)
    q = round_half_even(v).astype(np.int32) + zp
    return q.astype(dtype or _dtype_for_range(qmin, qmax))


def dequantize(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """ONNX/ORT DequantizeLinear: ``float32(q - zp) * scale`` in float32."""
    q = np.asarray(q)
    s = _along(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    zp = _along(np.asarray(zero_point).astype(np.int32), q.ndim, axis)
    return (q.astype(np.int32) - zp).astype(np.float32) * s


def fake_quantize(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> np.ndarray:
    """Quantize then dequantize (what a QuantizeLinear→DequantizeLinear pair computes)."""
    q = quantize(x, scale, zero_point, qmin, qmax, axis=axis, dtype=np.int32)
    return dequantize(q, scale, zero_point, axis=axis)


def quantize_multiplier(real_multiplier):
    """Fixed-point form of positive multipliers: ``real ≈ M0 · 2^-31 · 2^-shift`` with int32
    ``M0 ∈ [2^30, 2^31)`` (relative error ≤ 2^-31). A zero multiplier gives ``M0 = 0, shift = 0``.
    ``shift`` is a right shift (negative for multipliers ≥ 1)."""
    real = np.asarray(real_multiplier, dtype=np.float64)
    if np.any(~np.isfinite(real)) or np.any(real < 0):
        raise ConfigError("quantize_multiplier: multipliers must be finite and >= 0")
    mant, exp = np.frexp(real)  # real = mant · 2^exp, mant ∈ [0.5, 1)
    m0 = np.rint(mant * 2.0**31).astype(np.int64)
    carry = m0 == (1 << 31)
    m0 = np.where(carry, m0 // 2, m0)
    exp = np.where(carry, exp + 1, exp)
    shift = np.where(real == 0, 0, -exp).astype(np.int32)
    return m0.astype(np.int32), shift


def shared_shift_multipliers(ratios) -> tuple[np.ndarray, int]:
    """Integers ``K_i`` and one shift ``n`` with ``K_i · 2^-n ≈ ratio_i`` and ``max K_i < 2^31``
    (the largest ratio keeps 31 significant bits), for sums of differently-scaled terms such as a
    residual Add. Built on :func:`quantize_multiplier` of the largest ratio."""
    ratios = np.asarray(ratios, dtype=np.float64)
    _, shift = quantize_multiplier(ratios.max())
    n = 31 + int(shift)
    k = np.rint(ratios * 2.0**n).astype(np.int64)
    return k, n


def _total_shift(shift):
    n = 31 + np.asarray(shift, dtype=np.int64)
    if np.any(n < 1):
        raise ConfigError("requantize_fixed_point: multiplier >= 2^30 cannot be represented; "
                          "check the scales of this layer")
    # |acc · M0| < 2^62: a right shift by more than 62 rounds everything to 0 already.
    return np.minimum(n, 62)


def requantize_fixed_point(acc, m0, shift, zero_point, qmin: int, qmax: int, dtype=None):
    """Integer-only requantization: ``clip(((acc·M0 + 2^(n-1)) >> n) + zp)``, ``n = 31 + shift``,
    64-bit product, arithmetic shift: ``round_half_up(acc · M0 / 2^n)`` exactly. ``m0``,
    ``shift`` and ``zero_point`` broadcast against ``acc`` (reshape per-channel values first)."""
    acc = np.asarray(acc).astype(np.int64)
    n = _total_shift(shift)
    prod = acc * np.asarray(m0, dtype=np.int64)
    y = (prod + (np.int64(1) << (n - 1))) >> n
    y = y + np.asarray(zero_point, dtype=np.int64)
    return saturate(y, qmin, qmax, dtype)


def requantize_fixed_point_onnx_form(m0, shift, zero_point, qmin: int, qmax: int):
    """The ONNX integer ops that compute :func:`requantize_fixed_point` exactly in ORT 1.19.

    Returns a list of ``(op_type, constant_or_None, attributes)`` applied in order to the int32
    accumulator; each constant is the op's second input (int64, already broadcastable — reshape
    per-channel arrays along the channel axis). Steps: Cast→int64, Mul M0, Add 2^(n-1),
    Mod 2^n (fmod=0, non-negative remainder) subtracted, Div 2^n (exact), Add zp, Clip,
    Cast to the storage type. ``("SubMod", D)`` means ``v - Mod(v, D)`` (two nodes)."""
    n = _total_shift(shift)
    d = (np.int64(1) << n).astype(np.int64)
    return [
        ("Cast", None, {"to": "int64"}),
        ("Mul", np.asarray(m0, dtype=np.int64), {}),
        ("Add", (np.int64(1) << (n - 1)).astype(np.int64), {}),
        ("SubMod", d, {"fmod": 0}),
        ("Div", d, {}),
        ("Add", np.asarray(zero_point, dtype=np.int64), {}),
        ("Clip", (np.int64(qmin), np.int64(qmax)), {}),
        ("Cast", None, {"to": "int8" if qmin < 0 else "uint8"}),
    ]


def accumulator_bound(weight, weight_zero_point, input_zero_point, input_dtype, axis: int = 0) -> np.ndarray:
    """The largest ``|Σ (x − z_x)(w − z_w)|`` of an integer dot product per output channel
    (`axis` of the constant `weight` codes; every other axis is summed): ``Σ |w − z_w| ·
    max|x − z_x|`` over the input's storage range. Padding with z_x or 0 stays within it."""
    w = np.moveaxis(np.asarray(weight).astype(np.int64), axis, 0)
    zw = np.asarray(weight_zero_point).astype(np.int64).reshape(-1, *([1] * (w.ndim - 1)))
    qmin, qmax = storage_range(input_dtype)
    zx = int(np.asarray(input_zero_point).reshape(-1)[0])
    return np.abs(w - zw).reshape(w.shape[0], -1).sum(axis=1) * max(zx - qmin, qmax - zx)


_INT32 = (-(2**31), 2**31 - 1)
_INT64_LIMIT = 2**63


@dataclass(frozen=True)
class FixedPointSteps:
    """:func:`requantize_fixed_point` of ``acc + bias`` (clipped to ``[qlo, qhi]``) as wide
    integer steps, bit for bit (:func:`fixed_point_steps` builds them):

        a = clip(acc, acc_lo, acc_hi)          int32, per channel; only when acc is unbounded
        v = int64(a) · multiplier + offset     int64, never negative, never overflowing
        s = uint64(v) >> shift                 one shift for every channel where it fits
        y = storage(clip(s, *clip))            the cast keeps s mod 256, which is y's code

    ``multiplier = m0 · 2^(shift − n)`` is the same fraction ``m0 / 2^n`` on the common shift,
    ``offset = bias·multiplier + 2^(shift−1) + (zp − base)·2^shift`` with ``base`` a multiple of
    256 below every reachable result, so that ``s = y − base`` and the cast drops ``base``.
    Per-channel values are 1-d (the caller reshapes them along the channel axis)."""
    multiplier: np.ndarray
    offset: np.ndarray
    shift: np.ndarray
    clip: tuple[int, int] | None
    storage: type
    acc_lo: np.ndarray | None = None
    acc_hi: np.ndarray | None = None

    def apply(self, acc, channel_shape=(-1,)) -> np.ndarray:
        """The steps in NumPy (the reference the ONNX form is tested against); per-channel values
        are reshaped to `channel_shape` to broadcast against `acc`."""
        def along(v, dtype=np.int64):
            v = np.asarray(v, dtype)
            return v.reshape(channel_shape) if v.size > 1 else v.reshape(())
        a = np.asarray(acc).astype(np.int64)
        if self.acc_lo is not None:
            a = np.minimum(np.maximum(a, along(self.acc_lo)), along(self.acc_hi))
        s = (a * along(self.multiplier) + along(self.offset)).astype(np.uint64) >> along(self.shift, np.uint64)
        if self.clip is not None:
            s = np.clip(s, np.uint64(self.clip[0]), np.uint64(self.clip[1]))
        return (s & np.uint64(0xFF)).astype(np.uint8).view(self.storage)


def fixed_point_steps(m0, shift, zero_point: int, qlo: int, qhi: int, storage, bias=None,
                      acc_bound=None) -> FixedPointSteps | None:
    """The :class:`FixedPointSteps` of ``clip(requantize_fixed_point(acc + bias, m0, shift, zp), qlo,
    qhi)`` for int32 accumulators with ``|acc| <= acc_bound`` (per channel, or None: any int32,
    then the accumulator is clipped first to where the result saturates). Prefers one shift for
    all channels and no clip of the accumulator (fewer, vectorized ops); all arithmetic on Python
    integers, so every bound is checked exactly. None when no int64 form fits (multipliers below
    about 2^-22: use :func:`requantize_fixed_point_onnx_form`)."""
    m0, n, b, bound = _rule_per_channel(m0, shift, bias, acc_bound)
    m0 = np.array(m0, np.int64)
    for common in (True, False):
        shifts = [max(n)] * len(n) if common else n
        mult = [int(m) << (k - nk) for m, k, nk in zip(m0, shifts, n)]
        for preclip in ((False, True) if bound is not None else (True,)):
            steps = _steps_if_fit(mult, shifts, int(zero_point), qlo, qhi, storage, b, None if preclip else bound)
            if steps is not None:
                return steps
    return None


def _rule_per_channel(m0, shift, bias, acc_bound) -> tuple[list[int], list[int], list[int], list[int] | None]:
    """Multiplier, total shift, bias and accumulator bound (None stays None) as Python integers,
    one per channel (a per-tensor value repeated)."""
    channels = max(np.size(m0), np.size(0 if bias is None else bias), np.size(0 if acc_bound is None else acc_bound))

    def per_channel(v) -> list[int]:
        return [int(x) for x in np.broadcast_to(np.asarray(v, np.int64).reshape(-1), (channels,))]
    return (per_channel(m0), per_channel(_total_shift(np.asarray(shift))), per_channel(0 if bias is None else bias),
            None if acc_bound is None else per_channel(acc_bound))


def _first_reaching(code: int, m: int, n: int, zp: int) -> int:
    """The smallest x with ``floor((x·m + 2^(n−1)) / 2^n) + zp >= code`` (m > 0): where the
    fixed-point rule's step to `code` lies, exactly on Python integers."""
    return -(((1 << (n - 1)) - (code - zp) * (1 << n)) // m)


def _steps_if_fit(mult, shifts, zp, qlo, qhi, storage, b, bound) -> FixedPointSteps | None:
    """fixed_point_steps for given per-channel multipliers and shifts (the fraction mult/2^shift),
    clipping the accumulator first when `bound` is None; None when a value leaves int64."""
    def f(a: int, c: int) -> int:                      # the reference rule, on exact integers
        return ((a * mult[c] + (1 << (shifts[c] - 1))) >> shifts[c]) + zp

    spans = []                                        # reachable acc + bias, and acc itself
    for c, m in enumerate(mult):
        if bound is not None:
            spans.append((-bound[c] + b[c], bound[c] + b[c]))
            continue
        lo = _first_reaching(qlo + 1, m, shifts[c], zp) - 1 if m else 0   # largest a with f(a) <= qlo
        hi = _first_reaching(qhi, m, shifts[c], zp) if m else 0            # smallest a with f(a) >= qhi
        spans.append((max(lo, _INT32[0] + b[c]), min(hi, _INT32[1] + b[c])))
    f_lo = min(f(lo, c) for c, (lo, _) in enumerate(spans))
    f_hi = max(f(hi, c) for c, (_, hi) in enumerate(spans))
    base = 256 * (min(qlo, f_lo) // 256)
    offset = [b[c] * m + (1 << (k - 1)) + (zp - base) * (1 << k) for c, (m, k) in enumerate(zip(mult, shifts))]
    widest = max([max(abs(lo - b[c]), abs(hi - b[c])) * mult[c] for c, (lo, hi) in enumerate(spans)]
                 + [abs(o) for o in offset] + [(f_hi - base + 1) << max(shifts)])
    if widest >= _INT64_LIMIT:
        return None
    clip = None if f_lo >= qlo and f_hi <= qhi else (qlo - base, qhi - base)
    acc_lo = acc_hi = None
    if bound is None:
        acc_lo = np.array([lo - b[c] for c, (lo, _) in enumerate(spans)], np.int64)
        acc_hi = np.array([hi - b[c] for c, (_, hi) in enumerate(spans)], np.int64)
    return FixedPointSteps(np.array(mult, np.int64), np.array(offset, np.int64), np.array(shifts, np.int64), clip,
                           np.dtype(storage).type, acc_lo, acc_hi)


@dataclass(frozen=True)
class DivisionSteps:
    """:func:`requantize_fixed_point` of ``acc + bias`` (clipped to ``[qlo, qhi]``) in int32, bit
    for bit for every ``|acc| <= acc_bound`` (:func:`division_steps` builds them):

        a = clip(acc, -c, c)                   only where the bound alone leaves int32 too little room
        v = a · p + r                          int32, never overflowing
        y = storage(clip(v / q, lo, hi))       ORT's truncating int32 Div; lo = qlo + K >= 0

    The fixed-point rule is a monotone step function of the accumulator with at most 255 steps
    (one per output code): ``p/q`` is a fraction with a small numerator next to ``M0 / 2^n`` and
    ``r`` an offset that put every step on the same accumulator value, checked exactly on the
    steps. Where ``v < 0`` the result clips to ``lo`` whether Div floors or truncates, so
    truncation is exact. ``K`` is 0 for unsigned codes and 256 for signed ones (the cast keeps y
    mod 256). ``c`` lies past every channel's last step, so that clip changes no result. Against
    :class:`FixedPointSteps`: 4-byte tensors instead of 8-byte ones and four ops instead of seven
    (ORT 1.19, one thread, 64×120×120: 2.3 ms against 3.5 ms; 8×64×120×120: 22 against 59)."""
    multiplier: np.ndarray
    offset: np.ndarray
    divisor: np.ndarray
    clip: tuple[int, int] | None
    storage: type
    acc_clip: int | None = None

    def apply(self, acc, channel_shape=(-1,)) -> np.ndarray:
        """The steps in NumPy (the reference the ONNX form is tested against)."""
        def along(v):
            v = np.asarray(v, np.int64)
            return v.reshape(channel_shape) if v.size > 1 else v.reshape(())
        a = np.asarray(acc).astype(np.int64)
        if self.acc_clip is not None:
            a = np.clip(a, -self.acc_clip, self.acc_clip)
        v = a * along(self.multiplier) + along(self.offset)
        if np.any(v < _INT32[0]) or np.any(v > _INT32[1]):
            raise ValueError("DivisionSteps.apply: the accumulator is beyond the bound it was built for")
        q = along(self.divisor)
        y = np.where(v >= 0, v // q, -((-v) // q))                 # truncating, as ORT's Div
        if self.clip is not None:
            y = np.clip(y, *self.clip)
        return (y & 0xFF).astype(np.uint8).view(self.storage)


#: The largest numerator :func:`division_steps` tries per channel (a few hundred suffice for
#: 8-bit outputs; the search stops at the first that fits).
DIVISION_MAX_MULTIPLIER = 1 << 14


def division_steps(m0, shift, zero_point: int, qlo: int, qhi: int, storage, bias=None,
                   acc_bound=None) -> DivisionSteps | None:
    """The :class:`DivisionSteps` of ``clip(requantize_fixed_point(acc + bias, m0, shift, zp), qlo,
    qhi)`` for int32 accumulators with ``|acc| <= acc_bound`` (per channel; None: any int32);
    None when some channel has no fraction whose int32 arithmetic fits. Tries the bound as it is,
    then the accumulator clipped to where every channel's rule has saturated."""
    m, n, b, bound = _rule_per_channel(m0, shift, bias, _INT32[1] if acc_bound is None else acc_bound)
    k = 0 if qlo >= 0 else 256 * -(-(-qlo) // 256)

    def fractions():
        found = [_division_fraction(m[c], n[c], b[c], bound[c], int(zero_point), qlo, qhi, k) for c in range(len(m))]
        return None if any(f is None for f in found) else found
    acc_clip, found = None, fractions()
    if found is None:
        acc_clip = _saturation_reach(m, n, b, int(zero_point), qlo, qhi)
        if acc_clip is None or acc_clip >= max(bound):
            return None
        bound = [min(x, acc_clip) for x in bound]
        if (found := fractions()) is None:
            return None
    p, q, r = (np.array(v, np.int64) for v in zip(*found))
    bound = np.array(bound, np.int64)
    low = np.floor_divide(-bound * p + r, q)                      # reachable results, floored
    high = np.floor_divide(bound * p + r, q)
    clip = None if low.min() >= qlo + k and high.max() <= qhi + k else (qlo + k, qhi + k)
    return DivisionSteps(p, r, q, clip, np.dtype(storage).type, acc_clip)


def _saturation_reach(m, n, b, zp: int, qlo: int, qhi: int) -> int | None:
    """The smallest c with every channel's rule at qlo for acc <= -c and at qhi for acc >= c."""
    reach = 0
    for mc, nc, bc in zip(m, n, b):
        if mc <= 0 or nc < 1:
            continue                                # constant rule: any clip keeps it
        first = _first_reaching(qlo + 1, mc, nc, zp) - bc           # smallest acc reaching qlo + 1
        last = _first_reaching(qhi, mc, nc, zp) - bc                # smallest acc reaching qhi
        reach = max(reach, abs(first - 1), abs(last))
    return reach if reach < _INT32[1] else None


def _division_fraction(m: int, n: int, b: int, bound: int, zp: int, qlo: int, qhi: int,
                       k: int) -> tuple[int, int, int] | None:
    """``(p, q, r)`` with ``floor((a·p + r) / q) >= v + k  <=>  F(a) >= v`` for every code step v
    and every ``|a| <= bound``, F the unclipped fixed-point rule; the smallest p, int32-safe."""
    if n < 1 or m < 0:
        return None
    if qhi <= qlo:                               # a clip to one code: the rule is that constant
        return 0, 1, qlo + k
    levels = np.arange(qlo + 1, qhi + 1, dtype=np.int64)
    if m == 0:                                   # F is the constant floor(2^(n-1) / 2^n) + zp = zp
        breakpoints = np.where(levels <= zp, -bound, bound + 1)
    elif n <= 52 and max(abs(qlo - zp), abs(qhi - zp)) < 1 << 9:   # int64 holds (v − zp)·2^n
        # smallest a with (a + b)·m + 2^(n-1) >= (v − zp)·2^n: _first_reaching on every level at once
        reach = -(((1 << (n - 1)) - (levels - zp) * (1 << n)) // m) - b
        breakpoints = np.clip(reach, -bound, bound + 1)
    else:
        breakpoints = np.array([min(max(_first_reaching(v, m, n, zp) - b, -bound), bound + 1)
                                for v in range(qlo + 1, qhi + 1)], np.int64)
    reached, left = breakpoints <= bound, breakpoints - 1 >= -bound      # which constraints apply
    # A few telling levels first (the extremes, and those whose step sits farthest either side of
    # the exact line a = (v − zp − ½)/ratio − b): a (p, q) that fails on them fails on all, so the
    # full check of every level runs only on the numerators that pass (the same first fit).
    sample = _telling_levels(levels, breakpoints, m, n, b, zp)
    limit = min(DIVISION_MAX_MULTIPLIER, (_INT32[1] // max(bound, 1)))
    ratio = m / 2.0**n
    for start in range(0, limit + 1, 64):
        p = np.arange(start, min(start + 64, limit + 1), dtype=np.int64)
        centre = p / ratio if m else np.ones_like(p, dtype=np.float64)
        q = np.minimum(np.floor(centre), 2.0**40)[:, None] + np.arange(-2, 4)[None, :]   # q next to p / ratio
        # and q beyond the range, for a rule with at most one step on it (a near-dead channel's huge
        # bias: p / ratio would overflow the offset); p = 0 covers a constant rule
        q = np.concatenate([q, (p * (2 * bound + 2))[:, None].astype(np.float64)], axis=1)
        q = np.clip(q, 1, _INT32[1]).astype(np.int64)                       # (P, J)
        lo, hi = _step_window(levels[sample] + k, breakpoints[sample], reached[sample], left[sample], p, q)
        rows = np.flatnonzero((lo < hi).any(axis=1))
        for block in range(0, rows.size, 8):     # the passing numerators, smallest first
            at = rows[block:block + 8]
            lo, hi = _step_window(levels + k, breakpoints, reached, left, p[at], q[at])
            r = np.clip(0, lo, hi - 1)
            fits = (lo < hi) & (bound * p[at, None] + np.abs(r) <= _INT32[1])
            if fits.any():
                i, j = np.argwhere(fits)[0]
                return int(p[at[i]]), int(q[at[i], j]), int(r[i, j])
    return None


def _step_window(targets, breakpoints, reached, left, p, q):
    """For numerators p (P,) and divisors q (P, J): the bounds [lo, hi) of the offsets r with
    ``floor((B_v·p + r) / q) >= t_v`` at every reached step B_v and ``< t_v`` one before it."""
    need = targets[None, None, :] * q[:, :, None] - breakpoints[None, None, :] * p[:, None, None]
    lo = np.where(reached, need, np.iinfo(np.int64).min).max(axis=2)
    hi = np.where(left, need + p[:, None, None], np.iinfo(np.int64).max).min(axis=2)   # exclusive
    return lo, hi


def _telling_levels(levels, breakpoints, m: int, n: int, b: int, zp: int, each: int = 8) -> np.ndarray:
    """Indices of the levels most likely to rule a fraction out: the first and last few, and
    those whose integer step lies farthest before or after the real one."""
    count = levels.size
    if count <= 4 * each or m <= 0:
        return np.arange(count)
    exact = ((levels - zp).astype(np.float64) * 2.0**n - 2.0**(n - 1)) / m - b
    order = np.argsort(breakpoints - exact, kind="stable")
    ends = np.r_[np.arange(each), np.arange(count - each, count)]
    return np.unique(np.r_[ends, order[:each], order[-each:]])


#: The largest element count an integer mean (:func:`mean_requant`) is exact for: its int32 sum
#: of 8-bit codes stays below 2^31 (255 · 2^23), e.g. a 2896 × 2896 map.
MEAN_MAX_COUNT = 2**23


@dataclass(frozen=True)
class MeanRequant:
    """The mean of ``count`` codes requantized with integers only, ``count`` known at run time:

        y = clip(floor((T·M + count·C) / (count·2^n)) − k + zp_y, qlo, qhi)

    with ``T`` the sum of the codes, which is ``round_half_up((T − count·z_x)·M / (count·2^n)) +
    zp_y`` exactly (``C = 2^(n−1) − z_x·M + k·2^n``, ``k = ceil(z_x·M / 2^n)`` keeps the
    numerator non-negative, so ORT's truncating int64 Div floors). ``M·2^-n ≈ s_x/s_y``; n is as
    large as the int64 numerator allows for ``count <= MEAN_MAX_COUNT`` (≥ 28 significant bits of
    M for multipliers down to 2^-9). Against the QDQ model's float GlobalAveragePool and
    QuantizeLinear: the exact mean rounded half up instead of a float32 sum in MLAS's order
    divided by count and rounded half to even — the same up to one LSB where the mean lies
    within float rounding of a half."""
    multiplier: int
    shift: int
    offset: int
    base: int

    def apply(self, total, count: int, zero_point: int, qlo: int, qhi: int, dtype=None) -> np.ndarray:
        """The rule in NumPy (the reference the ONNX form is tested against)."""
        num = np.asarray(total).astype(np.int64) * np.int64(self.multiplier) + np.int64(count * self.offset)
        y = num // np.int64(count << self.shift) - self.base + zero_point
        return saturate(y, qlo, qhi, dtype)


def mean_requant(ratio: float, in_zero_point: int, in_qmax: int = 255,
                 max_count: int = MEAN_MAX_COUNT) -> MeanRequant:
    """The :class:`MeanRequant` of multiplier ``ratio = s_x/s_y`` for codes in ``[0, in_qmax]``
    with zero point `in_zero_point`: the largest shift n ≤ 62 whose numerator fits int64 for
    every count up to `max_count` (checked on Python integers)."""
    ratio = float(ratio)
    if not (np.isfinite(ratio) and ratio > 0):
        raise ConfigError("mean_requant: the multiplier must be finite and > 0")
    zx = int(in_zero_point)
    for n in range(62, 0, -1):
        m = int(round(ratio * 2.0**n))
        if m < 1 or m >= 2**62:
            continue
        k = -((-zx * m) // (1 << n))
        c = (1 << (n - 1)) - zx * m + k * (1 << n)
        if max_count * (in_qmax * m + c) < _INT64_LIMIT and max_count << n < _INT64_LIMIT:
            return MeanRequant(m, n, c, k)
    raise ConfigError(f"mean_requant: multiplier {ratio:g} has no 64-bit integer form; check the scales")


def ort_requant_multiplier(in_scale, w_scale, out_scale) -> np.ndarray:
    """ORT's QLinearConv/QLinearMatMul output multiplier: ``(in_scale * w_scale) / out_scale``
    evaluated in float32 in that order (qlinearconv.cc ComputeOutputScale)."""
    a = np.float32(np.asarray(in_scale, dtype=np.float32).reshape(-1)[0])
    y = np.float32(np.asarray(out_scale, dtype=np.float32).reshape(-1)[0])
    w = np.asarray(w_scale, dtype=np.float32)
    return (a * w) / y


def requantize_float(acc, multiplier, zero_point, qmin: int, qmax: int, dtype=None, *, overwrite=False):
    """ORT MlasRequantizeOutput: ``clip(round_half_even(float32(acc) * m), qmin - zp, qmax - zp) + zp``
    with a float32 conversion and product (``multiplier`` broadcasts against ``acc``).
    ``overwrite=True`` lets a float32 ``acc`` be used as the scratch buffer."""
    acc = np.asarray(acc)
    if overwrite and acc.dtype == np.float32 and acc.flags.writeable:
        f = acc
    else:
        f = acc.astype(np.float32)  # float32 accumulators must hold exact integers
    f *= np.asarray(multiplier, dtype=np.float32)
    # clamp-then-round-then-add equals round-then-add-then-clamp because the bounds are
    # integers; a huge |f| may round when zp is added but saturates identically.
    np.rint(f, out=f)
    f += np.asarray(zero_point).astype(np.float32)
    np.clip(f, np.float32(qmin), np.float32(qmax), out=f)
    return f.astype(dtype or _dtype_for_range(qmin, qmax))


# -- AdaRound: learned rounding ----------------------------------------------------------------

ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def rectified_sigmoid(v) -> np.ndarray:
    """AdaRound's ``h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1)`` (float64)."""
    sig = 1.0 / (1.0 + np.exp(-np.asarray(v, np.float64)))
    return np.clip(sig * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)


def adaround_init(w, scale, axis: int | None = None) -> np.ndarray:
    """V with ``h(V) = frac(W/s)``: training starts at the unrounded weight (float64)."""
    w = np.asarray(w, np.float32)
    ratio = (w / _along(np.asarray(scale, np.float32), w.ndim, axis)).astype(np.float64)  # as quantize_rounded
    frac = ratio - np.floor(ratio)
    ratio = np.clip((frac - ADAROUND_GAMMA) / (ADAROUND_ZETA - ADAROUND_GAMMA), 1e-6, 1 - 1e-6)
    return np.log(ratio / (1.0 - ratio))


def quantize_rounded(w, scale, zero_point, qmin: int, qmax: int, up, axis: int | None = None,
                     dtype=None) -> np.ndarray:
    """Codes ``clip(floor(W/s) + up + z, qmin, qmax)``: rounding down (`up` 0) or up (`up` 1) per
    weight, chosen by AdaRound instead of round-to-nearest. The floor uses the float32
    division of :func:`quantize`."""
    w = np.asarray(w, np.float32)
    s = _along(np.asarray(scale, np.float32), w.ndim, axis)
    zp = _along(np.asarray(zero_point).astype(np.int64), w.ndim, axis)
    q = np.floor(w / s).astype(np.int64) + np.asarray(up).astype(np.int64) + zp
    return np.clip(q, qmin, qmax).astype(dtype or _dtype_for_range(qmin, qmax))
