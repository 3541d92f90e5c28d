"""Streaming range observers for calibration: each sees batches one at a time and keeps a
state whose size does not depend on how many batches it has seen.

- `minmax`: running min and max.
- `moving_average`: ``r ← r + c·(r_batch − r)`` per batch with averaging constant ``c``
  (HAT / MNN MovingAverage; the first batch sets ``r``).
- `percentile`: the ``p``-th and ``(100−p)``-th percentiles of a streaming histogram.
- `entropy`: TensorRT's KL calibration — the clipping threshold ``T`` over the |x| histogram
  whose ``L``-level quantization ``Q`` minimizes ``KL(P‖Q)`` (2048 bins, L = 128 for int8,
  256 for uint8 non-negative tensors); point masses (exact repeated values) stay whole in Q.
- `mse`: the clipping range ``α·[min, max]`` minimizing the expected quantization MSE
  ``Σ_bins n·err(c)``, with ``err = s²/12`` inside the range and the clipping error outside.

Histograms are uniform over ``[lo, hi]`` (always containing 0). When a batch falls outside,
the range grows to ``k`` times the bin width (``k`` integer) with the new edges on the old
grid, so old bins merge whole into new ones: merging is exact, nothing is re-sampled.
Scales and zero points are computed from the ranges by :mod:`qgraph.quant` (the callers do).

Sharding (calibration over worker processes) gives the single-process result exactly:
`minmax` merges by min/max. A histogram's grid depends only on the sequence of per-batch
(min, max), so with that sequence known (a first pass), `HistogramReplay` gives the grid each
batch was binned on and the growths after it; a shard bins its batches on their grids and maps
the counts forward (integer re-binning, as `_grow` does), and the shards' counts add up to the
sequential histogram bin for bin. `moving_average` depends on the order of all batches and does
not shard.
"""

from __future__ import annotations

import math

import numpy as np

from qgraph.errors import ConfigError
from qgraph.quant import scale_zero_point


class Observer:
    """Base: `update(batch)` then `range()` → (rmin, rmax) floats."""

    def update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        raise NotImplementedError

    def state_nbytes(self) -> int:
        """Bytes of state held (constant in the number of batches seen)."""
        return 16


class MinMaxObserver(Observer):
    def __init__(self):
        self.lo, self.hi = math.inf, -math.inf

    def merge(self, other: "MinMaxObserver") -> None:
        """Exact: the min and max over both shards' batches."""
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def update(self, x):
        x = np.asarray(x)
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def range(self):
        return (0.0, 0.0) if self.lo > self.hi else (self.lo, self.hi)


class MovingAverageObserver(Observer):
    def __init__(self, averaging_constant: float = 0.01):
        self.c = float(averaging_constant)
        self.lo = self.hi = None

    def update(self, x):
        x = np.asarray(x)
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo += self.c * (lo - self.lo)
            self.hi += self.c * (hi - self.hi)

    def range(self):
        return (0.0, 0.0) if self.lo is None else (self.lo, self.hi)


_INDEX_BLOCK = 1 << 16     # elements per block when binning (256 KB of float32 scratch)


class StreamingHistogram:
    """Uniform histogram over a growing range [lo, lo + bins·width] that always contains 0."""

    def __init__(self, bins: int = 2048):
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, dtype=np.float64)
        self.lo = 0.0
        self.width = 0.0           # 0 until a non-zero value was seen
        self.min = math.inf
        self.max = -math.inf

    @property
    def hi(self) -> float:
        return self.lo + self.bins * self.width

    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if not x.size:
            return
        bmin, bmax = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, bmin), max(self.max, bmax)
        if self.width == 0.0:
            lo, hi = min(bmin, 0.0), max(bmax, 0.0)
            if hi == lo:  # all zeros so far
                self.counts[0] += x.size
                return
            zeros = self.counts[0]
            self.counts[:] = 0.0
            self.lo, self.width = lo, (hi - lo) / self.bins
            self.counts[self._index(np.zeros(1))[0]] += zeros
        elif bmin < self.lo or bmax > self.hi:
            self._grow(min(bmin, self.lo), max(bmax, self.hi))
        self.counts += np.bincount(self._index(x), minlength=self.bins)

    def _index(self, x: np.ndarray) -> np.ndarray:
        return _bin_index(x, self.lo, self.width, self.bins)

    def _grow(self, new_min: float, new_max: float) -> None:
        """Widen to cover [new_min, new_max]: new lo on the old grid, width k·old width."""
        j = max(0, math.ceil((self.lo - new_min) / self.width))
        lo = self.lo - j * self.width
        k = max(1, math.ceil((new_max - lo) / (self.bins * self.width)))
        while lo + self.bins * k * self.width < new_max:  # float rounding of the ceil above
            k += 1
        target = (j + np.arange(self.bins)) // k          # old bin n lies inside new bin (j+n)//k
        counts = np.bincount(target, weights=self.counts, minlength=self.bins)
        self.counts = counts[:self.bins].copy()
        self.lo, self.width = lo, self.width * k

    def nbytes(self) -> int:
        return self.counts.nbytes + 40

    def merge(self, other: "StreamingHistogram") -> None:
        """Add a shard's counts made on the same final grid (see HistogramReplay)."""
        if other.width != self.width or other.lo != self.lo or other.bins != self.bins:
            raise ValueError("histograms on different grids do not merge exactly; bin shards with HistogramReplay")
        self.counts = self.counts + other.counts
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """Value below which a fraction `q` of the mass lies (linear inside a bin), clamped to
        the observed [min, max]."""
        total = self.counts.sum()
        if total == 0 or self.width == 0.0:
            return 0.0
        cum = np.cumsum(self.counts)
        target = q * total
        if abs(target - round(target)) <= 1e-9 * total:  # 0.01·300 is 3.0000000000000004 in floats:
            target = float(round(target))                 # without this the 4th value, not the 3rd
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, self.bins - 1)
        before = cum[i - 1] if i else 0.0
        frac = (target - before) / self.counts[i] if self.counts[i] else 0.0
        value = self.lo + (i + frac) * self.width
        return float(min(max(value, self.min), self.max))

    def magnitude(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| on bins of the same width starting at 0 (negative bins folded by
        their centre): returns (counts, width)."""
        centres = self.lo + (np.arange(self.bins) + 0.5) * self.width
        n = max(1, math.ceil(max(-self.lo, self.hi) / self.width))
        idx = np.minimum((np.abs(centres) / self.width).astype(np.int64), n - 1)
        return np.bincount(idx, weights=self.counts, minlength=n)[:n], self.width


class HistogramReplay:
    """The grids a StreamingHistogram goes through for a known sequence of per-batch (min, max),
    so that any subset of the batches can be binned where the sequential run would have binned
    them (`shard`), giving counts that add up exactly to the sequential histogram."""

    def __init__(self, ranges: list[tuple[float, float]], bins: int = 2048):
        self.bins = int(bins)
        probe = StreamingHistogram(bins)
        self.grids: list[tuple[float, float]] = []          # (lo, width) batch i is binned on; width 0: zeros
        self.growths: list[list[tuple[int, int]]] = []      # index maps (j, k) applied when batch i arrives
        self.first_grid: int | None = None                  # batch that set the first non-zero grid
        for i, (bmin, bmax) in enumerate(ranges):
            steps = []
            if probe.width == 0.0:
                lo, hi = min(bmin, 0.0), max(bmax, 0.0)
                if hi != lo:
                    probe.lo, probe.width = lo, (hi - lo) / probe.bins
                    self.first_grid = i
            elif bmin < probe.lo or bmax > probe.hi:
                old_lo, old_width = probe.lo, probe.width
                probe._grow(min(bmin, probe.lo), max(bmax, probe.hi))
                steps.append((round((old_lo - probe.lo) / old_width), round(probe.width / old_width)))
            self.growths.append(steps)
            self.grids.append((probe.lo, probe.width))
            probe.min, probe.max = min(probe.min, bmin), max(probe.max, bmax)
        self.final = probe

    def shard(self, batches: dict[int, np.ndarray]) -> StreamingHistogram:
        """The counts of these batches (index → values) on the final grid."""
        total = np.zeros(self.bins, np.float64)
        for i, x in batches.items():
            x = np.asarray(x, dtype=np.float32).ravel()
            if not x.size:
                continue
            lo, width = self.grids[i]
            counts = np.zeros(self.bins, np.float64)
            if width == 0.0:               # zeros before the first grid: they land where 0 does on it
                if self.first_grid is None:
                    total[0] += x.size
                    continue
                start = self.first_grid
                lo, width = self.grids[start]
                counts[_bin_index(np.zeros(1), lo, width, self.bins)[0]] += x.size
            else:
                start = i
                counts += np.bincount(_bin_index(x, lo, width, self.bins), minlength=self.bins)
            for later in self.growths[start + 1:]:
                for j, k in later:
                    counts = np.bincount((j + np.arange(self.bins)) // k, weights=counts,
                                         minlength=self.bins)[:self.bins]
            total += counts
        hist = StreamingHistogram(self.bins)
        hist.lo, hist.width, hist.counts = self.final.lo, self.final.width, total
        hist.min, hist.max = self.final.min, self.final.max
        return hist


def _bin_index(x: np.ndarray, lo: float, width: float, bins: int) -> np.ndarray:
    """Bin of each element of flat `x`: floor((x - lo) / width) clipped to [0, bins - 1], in
    float32 blocks (calibration spends most of its time here on big activations: float64 took
    1.5x as long), truncation after the clip being the floor. Only values within about 1e-4 of a
    bin of an edge can land one bin over from exact arithmetic; every caller, the sharded replay
    included, bins with this one function, so merged histograms stay identical."""
    out = np.empty(x.size, dtype=np.intp)
    block = np.empty(min(x.size, _INDEX_BLOCK), dtype=np.float32)
    lo32, inverse = np.float32(lo), np.float32(1.0 / width)
    top = np.float32(bins - 1)
    for start in range(0, x.size, _INDEX_BLOCK):
        part = x[start:start + _INDEX_BLOCK]
        buf = block[:part.size]
        np.subtract(part, lo32, out=buf, dtype=np.float32)
        np.multiply(buf, inverse, out=buf)
        np.clip(buf, np.float32(0), top, out=buf)
        out[start:start + part.size] = buf
    return out


class HistogramObserver(Observer):
    """Base of the histogram observers: a StreamingHistogram plus a range rule."""

    def __init__(self, bins: int = 2048):
        self.hist = StreamingHistogram(bins)

    def update(self, x):
        self.hist.update(x)

    def state_nbytes(self):
        return self.hist.nbytes()

    def _empty(self) -> bool:
        return self.hist.width == 0.0


class PercentileObserver(HistogramObserver):
    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        super().__init__(bins)
        self.p = float(percentile)

    def range(self):
        if self._empty():
            return (0.0, 0.0)
        h = self.hist
        lo = h.quantile((100.0 - self.p) / 100.0) if h.min < 0 else h.min
        return (min(lo, 0.0), max(h.quantile(self.p / 100.0), 0.0))


def point_masses(counts: np.ndarray, halfwidth: int = 4, z: float = 4.0) -> np.ndarray:
    """The part of each bin that stands above its neighbourhood: a bin holding more than
    twice the median ``m`` of the `halfwidth` bins on each side, and more than
    ``m + z·√(m+1)`` (beyond Poisson noise), has a point mass of ``count − m``; others 0.

    Exact repeated values are common in activations: ReLU zeros, Clip's saturated bound, and
    in convnets on images with a plain background the folded bias every channel outputs on a
    constant receptive field (on MNIST, 40–70% of the early activations)."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) < 3:
        return np.zeros_like(counts)
    pad = np.concatenate([np.full(halfwidth, np.nan), counts, np.full(halfwidth, np.nan)])
    window = np.lib.stride_tricks.sliding_window_view(pad, 2 * halfwidth + 1).copy()
    window[:, halfwidth] = np.nan                               # the bin itself is not its neighbour
    with np.errstate(all="ignore"):
        level = np.nan_to_num(np.nanmedian(window, axis=1))
    spike = (counts > 2.0 * level) & (counts > level + z * np.sqrt(level + 1.0))
    return np.where(spike, counts - level, 0.0)


def kl_threshold_bin(counts: np.ndarray, levels: int, point_mass: np.ndarray | None = None) -> int:
    """TensorRT's entropy calibration on a magnitude histogram: the number of bins ``i`` (≥
    `levels`) whose clipped distribution P (outliers added to bin i−1) is best approximated,
    in KL divergence, by its `levels`-level quantization Q (each chunk's mass spread evenly
    over the chunk's non-empty bins; an empty Q bin under P mass counts as 1e-12).

    `point_mass` (per bin, ≤ counts) is mass at single values: quantization moves a point
    mass to one grid point, it does not spread it, so Q keeps it in its own bin and only the
    rest of the chunk is spread. Without this, a chunk holding a large point mass scores
    ``m·log(bins per chunk)`` of pure artefact and the search clips to where chunks are one
    bin wide, or to a point mass that hides the outliers in Q's last bin.

    With prefix sums every candidate costs O(levels + point masses), all candidates at once:
    ``KL = ΣP log P / ΣP − log ΣP − Σ P log Q / ΣP + log ΣQ``, with
    ``Σ P log Q = Σ_k m_k log(m_k / n_k)`` over the spread part of the chunks (m_k, n_k its mass
    and non-empty bins), corrected at point-mass bins and the outlier bin."""
    counts = np.asarray(counts, dtype=np.float64)
    n = len(counts)
    if n <= levels:
        return n
    total = counts.sum()
    if total == 0:
        return n
    point = np.zeros(n) if point_mass is None else np.minimum(np.asarray(point_mass, np.float64), counts)
    spread = counts - point                                     # the part Q spreads over its chunk
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    cum_spread = np.concatenate([[0.0], np.cumsum(spread)])
    cum_nz = np.concatenate([[0.0], np.cumsum(spread > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        clogc = np.where(counts > 0, counts * np.log(counts), 0.0)
    cum_clogc = np.concatenate([[0.0], np.cumsum(clogc)])
    i = np.arange(levels, n + 1)                               # candidates
    k = np.arange(levels + 1)
    bounds = -((-k[None, :] * i[:, None]) // levels)          # chunk k = bins [ceil(k·i/L), ceil((k+1)·i/L))
    mass = cum_spread[bounds[:, 1:]] - cum_spread[bounds[:, :-1]]
    support = cum_nz[bounds[:, 1:]] - cum_nz[bounds[:, :-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        q_chunk = np.where(mass > 0, mass / np.maximum(support, 1.0), 1.0)
        plogq = np.sum(np.where(mass > 0, mass * np.log(q_chunk), 0.0), axis=1)
    rows = np.arange(len(i))[:, None]
    spikes = np.flatnonzero(point > 0)
    if len(spikes):                                            # bin b of chunk c: Q_b = point_b + q_c·[spread_b > 0]
        inside = spikes[None, :] < i[:, None]
        chunk = np.minimum(spikes[None, :] * levels // i[:, None], levels - 1)
        q_c = q_chunk[rows, chunk]
        has_spread = spread[spikes] > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            fix = (counts[spikes] * np.log(point[spikes] + np.where(has_spread, q_c, 0.0))
                   - np.where(has_spread, spread[spikes] * np.log(q_c), 0.0))
        plogq += np.sum(np.where(inside, fix, 0.0), axis=1)
    q_total = cum[i]                                           # ΣQ = mass kept inside the range
    tail = total - q_total                                     # outliers, added to bin i−1 of P
    last = counts[i - 1]
    q_last = point[i - 1] + np.where(spread[i - 1] > 0, q_chunk[:, -1], 0.0)   # bin i−1 is in the last chunk
    p_last = last + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = cum_clogc[i - 1] + np.where(p_last > 0, p_last * np.log(p_last), 0.0)
        plogq = plogq + np.where(last > 0, tail * np.log(q_last), 0.0)
        # an empty last bin holding only outliers has Q = 0: it scores p·(log p − log 1e-12)
        # instead of p·(log p − log Q + log ΣQ)
        p_orphan = np.where(last > 0, 0.0, tail / total)
        kl = (plogp / total - np.log(total) - plogq / total + (1.0 - p_orphan) * np.log(q_total)
              - p_orphan * np.log(1e-12))
    kl = np.where(np.isfinite(kl), kl, np.inf)
    return int(i[int(np.argmin(kl))])


class EntropyObserver(HistogramObserver):
    """KL threshold T on |x|; the range is the observed one clipped to [−T, T]. Point masses
    (ReLU's zeros, constant-background outputs) stay whole in Q: see `kl_threshold_bin`."""

    def __init__(self, levels: int = 128, bins: int = 2048):
        super().__init__(bins)
        self.levels = int(levels)

    def range(self):
        if self._empty():
            return (0.0, 0.0)
        counts, width = self.hist.magnitude()
        t = kl_threshold_bin(counts, self.levels, point_masses(counts)) * width
        return max(min(self.hist.min, 0.0), -t), min(max(self.hist.max, 0.0), t)


class MSEObserver(HistogramObserver):
    """Searches α ∈ (0, 1] for the range α·[min, max] of least expected quantization MSE."""

    def __init__(self, bits: int = 8, signed: bool = False, symmetric: bool = False,
                 narrow_range: bool = False, pow2: bool = False, bins: int = 2048, steps: int = 100):
        super().__init__(bins)
        self.grid = dict(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range, pow2=pow2)
        self.steps = int(steps)

    def range(self):
        if self._empty():
            return (0.0, 0.0)
        h = self.hist
        lo, hi = min(h.min, 0.0), max(h.max, 0.0)
        alphas = np.linspace(1.0 / self.steps, 1.0, self.steps)
        centres = h.lo + (np.arange(h.bins) + 0.5) * h.width
        errors = expected_mse(centres, h.counts, alphas * lo, alphas * hi, **self.grid)
        best = int(np.argmin(errors))
        return float(alphas[best] * lo), float(alphas[best] * hi)


def expected_mse(values: np.ndarray, counts: np.ndarray, rmin: np.ndarray, rmax: np.ndarray,
                 **grid) -> np.ndarray:
    """Expected squared quantization error of values (with counts) for each candidate range
    (vectorized over candidates): rounding error s²/12 inside the representable range, the
    squared distance to it outside."""
    from qgraph.quant import qrange
    scale, zp = scale_zero_point(rmin, rmax, **grid)
    qmin, qmax = qrange(grid["bits"], grid["signed"], grid.get("narrow_range", False))
    s = scale.astype(np.float64)[:, None]
    low = (qmin - zp.astype(np.float64))[:, None] * s
    high = (qmax - zp.astype(np.float64))[:, None] * s
    v = values[None, :]
    clipped = np.clip(v, low, high)
    err = np.where(v == clipped, s * s / 12.0, (v - clipped) ** 2)
    return (err * counts[None, :]).sum(axis=1)


def make_observer(kind: str, *, bits: int = 8, signed: bool = False, symmetric: bool = False,
                  narrow_range: bool = False, pow2: bool = False, nonnegative: bool = False,
                  averaging_constant: float = 0.01, percentile: float = 99.99, bins: int = 2048) -> Observer:
    """An activation observer for a quantizer with the given grid and options."""
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "moving_average":
        return MovingAverageObserver(averaging_constant)
    if kind == "percentile":
        return PercentileObserver(percentile, bins)
    if kind == "entropy":
        levels = 2 ** bits if (nonnegative and not signed) else 2 ** (bits - 1)
        return EntropyObserver(levels, bins)
    if kind == "mse":
        return MSEObserver(bits, signed, symmetric or nonnegative, narrow_range, pow2, bins)
    raise ConfigError(f"unknown observer {kind!r}; valid: minmax, moving_average, percentile, entropy, mse")


# -- weights: observed once, per channel or per tensor --------------------------------------

def weight_range(w: np.ndarray, axis: int | None, observer: str = "minmax", *, bits: int = 8,
                 symmetric: bool = True, narrow_range: bool = True, pow2: bool = False,
                 steps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(rmin, rmax) of a weight, per channel along `axis` or per tensor (axis None).
    `mse` shrinks each channel's range by the α that minimizes the channel's own squared
    quantization error (exact values, not a histogram)."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        flat = w.reshape(1, -1)
    else:
        flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    rmin = np.minimum(flat.min(axis=1), 0.0).astype(np.float64)
    rmax = np.maximum(flat.max(axis=1), 0.0).astype(np.float64)
    if observer == "mse":
        rmin, rmax = _weight_mse_search(flat, rmin, rmax, bits, symmetric, narrow_range, pow2, steps)
    elif observer != "minmax":
        raise ConfigError(f"weight observer must be minmax or mse, got {observer!r}")
    if axis is None:
        return rmin[0], rmax[0]
    return rmin, rmax


def _weight_mse_search(flat, rmin, rmax, bits, symmetric, narrow_range, pow2, steps):
    from qgraph.quant import fake_quantize, qrange
    qmin, qmax = qrange(bits, True, narrow_range)
    best_err = np.full(len(flat), np.inf)
    best_lo, best_hi = rmin.copy(), rmax.copy()
    for alpha in np.linspace(1.0 / steps, 1.0, steps):
        lo, hi = alpha * rmin, alpha * rmax
        scale, zp = scale_zero_point(lo, hi, bits, True, symmetric, narrow_range, pow2)
        approx = fake_quantize(flat, scale, zp, qmin, qmax, axis=0)
        err = ((approx.astype(np.float64) - flat) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_lo, best_hi = np.where(better, lo, best_lo), np.where(better, hi, best_hi)
    return best_lo, best_hi
