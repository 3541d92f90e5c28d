"""Signal-processing kernels (ONNX domain, opset 17+): DFT, STFT, the Hann/Hamming/Blackman
windows and MelWeightMatrix — what audio front ends exported into models use.

Transforms run in float64 (NumPy's FFT) and are rounded once to the input type; ORT's own FFT
sums in another order, so results agree to a few ulp of the output range.
"""

from __future__ import annotations

import numpy as np

from qgraph.interp.registry import np_dtype, register


def _scalar_int(v, default=None):
    if v is None or np.asarray(v).size == 0:
        return default
    return int(np.asarray(v).reshape(-1)[0])


def _complex(x):
    """(..., 1) real or (..., 2) real/imaginary pairs -> complex128 array without the last axis."""
    x64 = x.astype(np.float64)
    return x64[..., 0] if x.shape[-1] == 1 else x64[..., 0] + 1j * x64[..., 1]


def _pairs(z, dtype):
    return np.stack([z.real, z.imag], axis=-1).astype(dtype)


@register("DFT")
def dft(ctx, x, dft_length=None, axis=None):
    """Discrete Fourier transform along ``axis`` (opset 17: attribute, default 1; opset 20: input,
    default -2) of a real (…, 1) or complex (…, 2) signal, zero-padded or truncated to
    ``dft_length``; ``inverse`` divides by the length; ``onesided`` keeps the first n/2 + 1 bins."""
    ax = ctx.attr("axis", 1) if ctx.opset < 20 else _scalar_int(axis, -2)
    ax %= x.ndim
    if ax == x.ndim - 1:
        raise ctx.error("axis must not be the last (real/imaginary) axis")
    n = _scalar_int(dft_length, x.shape[ax])
    z = _complex(x)
    if ctx.attr("inverse", 0):
        y = np.fft.ifft(z, n=n, axis=ax)
    else:
        y = np.fft.fft(z, n=n, axis=ax)
    if ctx.attr("onesided", 0):
        y = np.take(y, np.arange(n // 2 + 1), axis=ax)
    return _pairs(y, x.dtype)


@register("STFT")
def stft(ctx, signal, frame_step, window=None, frame_length=None):
    """Short-time Fourier transform of (batch, length, 1|2): frames of ``frame_length`` (or the
    window's length) every ``frame_step`` samples, multiplied by ``window``, each transformed;
    output (batch, frames, bins, 2), ``onesided`` (default 1) keeping n/2 + 1 bins."""
    step = _scalar_int(frame_step)
    length = _scalar_int(frame_length, None if window is None else np.asarray(window).size)
    if length is None:
        raise ctx.error("needs a window or a frame_length")
    z = _complex(signal)                                       # (batch, samples)
    frames = (z.shape[1] - length) // step + 1
    idx = np.arange(frames)[:, None] * step + np.arange(length)[None, :]
    seg = z[:, idx]                                            # (batch, frames, length)
    if window is not None:
        seg = seg * np.asarray(window, np.float64).reshape(-1)
    y = np.fft.fft(seg, axis=-1)
    if ctx.attr("onesided", 1):
        y = y[..., :length // 2 + 1]
    return _pairs(y, signal.dtype)


def _window(ctx, size, coefficients):
    n = _scalar_int(size)
    dt = np_dtype(ctx.attr("output_datatype", 1))
    denom = n if ctx.attr("periodic", 1) else n - 1
    k = np.arange(n, dtype=np.float64)
    w = np.zeros(n)
    for m, a in enumerate(coefficients):
        w += a * np.cos(2 * np.pi * m * k / denom) if denom else (a if m == 0 else 0.0)
    return w.astype(dt)


@register("HannWindow")
def hann_window(ctx, size):
    """0.5 - 0.5·cos(2πk/N), N = size (periodic, default) or size - 1 (symmetric)."""
    return _window(ctx, size, (0.5, -0.5))


@register("HammingWindow")
def hamming_window(ctx, size):
    """25/46 - 21/46·cos(2πk/N)."""
    return _window(ctx, size, (25 / 46, -21 / 46))


@register("BlackmanWindow")
def blackman_window(ctx, size):
    """0.42 - 0.5·cos(2πk/N) + 0.08·cos(4πk/N)."""
    return _window(ctx, size, (0.42, -0.5, 0.08))


@register("MelWeightMatrix")
def mel_weight_matrix(ctx, num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz):
    """(dft_length/2 + 1, num_mel_bins) triangular filters between mel-spaced points, the spec's
    construction: ``num_mel_bins + 2`` points spaced (high - low)/(num_mel_bins + 2) in mel, mapped
    to FFT bins by ``floor((dft_length + 1)·hz / sample_rate)``."""
    mels = _scalar_int(num_mel_bins)
    n_fft = _scalar_int(dft_length)
    rate = _scalar_int(sample_rate)
    lo = float(np.asarray(lower_edge_hertz).reshape(-1)[0])
    hi = float(np.asarray(upper_edge_hertz).reshape(-1)[0])
    lo_mel, hi_mel = (2595 * np.log10(1 + f / 700) for f in (lo, hi))
    points = np.arange(mels + 2) * ((hi_mel - lo_mel) / (mels + 2)) + lo_mel
    hz = 700 * (np.power(10, points / 2595) - 1)
    bins = (((n_fft + 1) * hz) // rate).astype(np.int64)
    j = np.arange(n_fft // 2 + 1)[:, None]
    left, centre, right = bins[None, :-2], bins[None, 1:-1], bins[None, 2:]
    rise = np.where(centre > left, (j - left) / np.maximum(centre - left, 1), (j == centre).astype(float))
    up = (j >= left) & (j <= centre)
    fall = (right - j) / np.maximum(right - centre, 1)
    down = (j >= centre) & (j < right) & (right > centre)
    w = np.where(down, fall, np.where(up, rise, 0.0))
    return w.astype(np_dtype(ctx.attr("output_datatype", 1)))
