"""Streaming observers against plain NumPy over all the data at once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from qgraph.observers import (EntropyObserver, MinMaxObserver, MovingAverageObserver, MSEObserver,
                              PercentileObserver, StreamingHistogram, kl_threshold_bin, make_observer,
                              point_masses, weight_range)
from qgraph.quant import fake_quantize, qrange, scale_zero_point
from qgraph.models.datasets import load_dataset

batches_st = st.lists(
    st.tuples(st.floats(-50, 50), st.floats(0.01, 20), st.integers(1, 300), st.integers(0, 2**31 - 1)),
    min_size=1, max_size=8)


def _make_batches(spec):
    return [np.random.default_rng(seed).normal(loc, scale, n).astype(np.float32) for loc, scale, n, seed in spec]


@settings(max_examples=40, deadline=None)
@given(batches_st)
def test_minmax_is_exact(spec):
    batches = _make_batches(spec)
    obs = MinMaxObserver()
    for b in batches:
        obs.update(b)
    data = np.concatenate(batches)
    assert obs.range() == (float(data.min()), float(data.max()))


def test_moving_average_follows_hat_formula():
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, 1 + i, 100).astype(np.float32) for i in range(5)]
    obs = MovingAverageObserver(0.01)
    for b in batches:
        obs.update(b)
    lo, hi = float(batches[0].min()), float(batches[0].max())
    for b in batches[1:]:
        lo += 0.01 * (float(b.min()) - lo)
        hi += 0.01 * (float(b.max()) - hi)
    assert obs.range() == pytest.approx((lo, hi))


@settings(max_examples=40, deadline=None)
@given(batches_st)
@example([(0.0, 1.0, 3, 0)] * 3 + [(1.0, 1.0, 1, 0)])   # three copies of a value on an edge (CI, stop 24)
def test_streaming_histogram_equals_one_shot(spec):
    """Merging batch by batch (range growing) gives the one-shot histogram on the final grid:
    every value lands in the bin np.histogram puts it in, up to edge rounding."""
    batches = _make_batches(spec)
    hist = StreamingHistogram(256)
    for b in batches:
        hist.update(b)
    data = np.concatenate(batches).astype(np.float64)
    assert hist.counts.sum() == len(data)
    assert hist.lo <= min(data.min(), 0) and hist.hi >= max(data.max(), 0) - 1e-9 * max(1.0, abs(hist.hi))
    assume(hist.width > 0)   # all-zero data has no grid to compare
    one_shot, _ = np.histogram(data, bins=256, range=(hist.lo, hist.hi))
    # a value within float32 rounding of an edge may go either way (observers._bin_index), and an edge
    # value is common: a batch's max is an edge of its grid, which later grids keep; the cumulative
    # counts agree up to those values (each copy of one counts) and a few more
    positions = (data - hist.lo) / hist.width
    on_edge = int((np.abs(positions - np.rint(positions)) < 1e-4).sum())
    moved = np.abs(np.cumsum(one_shot) - np.cumsum(hist.counts)).max()
    assert moved <= max(2, 0.001 * len(data)) + on_edge
    for q in (0.01, 0.5, 0.99):
        assert abs(hist.quantile(q) - np.quantile(data, q, method="inverted_cdf")) <= hist.width * 1.001 + 1e-6


@settings(max_examples=25, deadline=None)
@given(batches_st, st.sampled_from([99.0, 99.9, 99.99]))
def test_percentile_within_bin_width_of_numpy(spec, p):
    batches = _make_batches(spec)
    obs = PercentileObserver(p, bins=2048)
    for b in batches:
        obs.update(b)
    data = np.concatenate(batches).astype(np.float64)
    lo, hi = obs.range()
    width = obs.hist.width
    tol = width * 1.001 + 1e-6
    assert hi == pytest.approx(max(np.percentile(data, p, method="inverted_cdf"), 0.0), abs=tol)
    if data.min() < 0:
        assert lo == pytest.approx(min(np.percentile(data, 100 - p, method="inverted_cdf"), 0.0), abs=tol)


@settings(max_examples=15, deadline=None)
@given(batches_st, st.sampled_from(["entropy", "mse"]))
def test_entropy_and_mse_choose_a_range_inside_the_data(spec, kind):
    batches = _make_batches(spec)
    obs = make_observer(kind, bits=8, signed=False, bins=512)
    for b in batches:
        obs.update(b)
    data = np.concatenate(batches)
    lo, hi = obs.range()
    assert min(data.min(), 0) - 1e-6 <= lo <= hi <= max(data.max(), 0) + 1e-6
    assert hi > lo


def test_entropy_clips_a_long_tail():
    """A Laplacian with a few huge outliers: KL keeps the bulk, not the outliers (TensorRT's point)."""
    rng = np.random.default_rng(1)
    obs = EntropyObserver(levels=128, bins=2048)
    for _ in range(5):
        x = np.abs(rng.laplace(0, 1, 20000)).astype(np.float32)
        x[:3] = 100.0
        obs.update(x)
    lo, hi = obs.range()
    assert lo == pytest.approx(0.0, abs=1e-3)
    assert 5.0 < hi < 50.0


def test_kl_threshold_of_uniform_data_keeps_everything():
    counts = np.ones(1024)
    assert kl_threshold_bin(counts, 128) >= 1000


def test_mse_beats_minmax_on_outliers():
    rng = np.random.default_rng(2)
    data = rng.laplace(0, 1, 50000).astype(np.float32)  # long tails: clipping pays
    grid = dict(bits=8, signed=False, symmetric=False, narrow_range=False, pow2=False)
    obs = MSEObserver(**grid, bins=2048)
    obs.update(data)
    qmin, qmax = qrange(8, False)

    def mse(lo, hi):
        s, z = scale_zero_point(lo, hi, **grid)
        return float(np.mean((fake_quantize(data, s, z, qmin, qmax) - data) ** 2))

    lo, hi = obs.range()
    assert hi < data.max()
    assert mse(lo, hi) < mse(float(data.min()), float(data.max()))
    # the histogram estimate picks (nearly) the best α of the exact search over all values
    exact = min(mse(a * float(data.min()), a * float(data.max())) for a in np.linspace(0.01, 1, 100))
    assert mse(lo, hi) <= 1.05 * exact


@pytest.mark.parametrize("kind", ["minmax", "moving_average", "percentile", "entropy", "mse"])
def test_state_does_not_grow_with_batches(kind):
    obs = make_observer(kind, bins=2048)
    rng = np.random.default_rng(3)
    obs.update(rng.normal(0, 1, 1000).astype(np.float32))
    size = obs.state_nbytes()
    for i in range(50):
        obs.update(rng.normal(0, 1 + i, 1000).astype(np.float32))  # the range keeps growing
    assert obs.state_nbytes() == size


def test_constant_tensor_gives_zero_range_and_valid_scale():
    for kind in ("minmax", "moving_average", "percentile", "entropy", "mse"):
        obs = make_observer(kind)
        obs.update(np.zeros(100, np.float32))
        lo, hi = obs.range()
        assert lo == hi == 0.0
        scale, zp = scale_zero_point(lo, hi, 8, False, False)
        assert np.isfinite(scale) and scale > 0


def test_weight_range_per_channel_and_mse():
    rng = np.random.default_rng(4)
    w = rng.normal(0, 1, (6, 3, 3, 3)).astype(np.float32)
    w[2] *= 10
    lo, hi = weight_range(w, 0)
    np.testing.assert_allclose(lo, np.minimum(w.reshape(6, -1).min(1), 0))
    np.testing.assert_allclose(hi, np.maximum(w.reshape(6, -1).max(1), 0))
    lo_t, hi_t = weight_range(w, None)
    assert lo_t == pytest.approx(min(w.min(), 0)) and hi_t == pytest.approx(w.max())
    lo_m, hi_m = weight_range(w, 0, "mse", bits=4)
    assert np.all(hi_m <= hi + 1e-6) and np.all(lo_m >= lo - 1e-6)
    qmin, qmax = qrange(4, True, True)

    def err(l, h):
        s, z = scale_zero_point(l, h, 4, True, True, True)
        return float(((fake_quantize(w, s, z, qmin, qmax, axis=0) - w) ** 2).sum())

    assert err(lo_m, hi_m) <= err(lo, hi)


def _kl_threshold_reference(counts, levels, point_mass=None):
    """TensorRT's loop, written plainly: one candidate at a time; point masses stay in their
    own bin of Q, the rest of each chunk is spread over its non-empty bins."""
    counts = np.asarray(counts, np.float64)
    point = np.zeros_like(counts) if point_mass is None else np.asarray(point_mass, np.float64)
    spread = counts - point
    best_i, best_kl = len(counts), np.inf
    for i in range(levels, len(counts) + 1):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()
        chunk = np.arange(i) * levels // i
        q = point[:i].copy()
        for k in range(levels):
            members = (chunk == k) & (spread[:i] > 0)
            if members.any():
                q[members] += spread[:i][chunk == k].sum() / members.sum()
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(140, 400), st.booleans(), st.integers(0, 4))
def test_kl_threshold_matches_plain_loop(seed, bins, outliers, n_points):
    rng = np.random.default_rng(seed)
    x = np.abs(rng.laplace(0, 1, int(rng.integers(100, 5000))))
    if outliers:
        x[:3] = 50.0
    if n_points:  # half the values on a few exact points, like a constant background's outputs
        x[:len(x) // 2] = rng.choice(rng.uniform(0, x.max(), n_points), len(x) // 2)
    counts, _ = np.histogram(x, bins=bins)
    assert kl_threshold_bin(counts, 128) == _kl_threshold_reference(counts, 128)
    point = point_masses(counts)
    assert kl_threshold_bin(counts, 128, point) == _kl_threshold_reference(counts, 128, point)


def test_point_masses_finds_exact_values_not_noise():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 4, 200_000)
    x[:30_000] = 1.0
    x[30_000:40_000] = 3.0
    counts, edges = np.histogram(x, bins=2048, range=(0, 4))
    point = point_masses(counts)
    spikes = np.flatnonzero(point)
    assert list(spikes) == [int(1.0 / edges[1]), int(3.0 / edges[1])]
    assert point[spikes] == pytest.approx([30_000, 10_000], rel=0.01)
    assert point_masses(np.histogram(rng.uniform(0, 4, 200_000), bins=2048)[0]).sum() == 0


def _background_activation(rng, n=200_000):
    """What a small convnet's early activation looks like on MNIST: ~70% of the positions see
    a blank receptive field and output their channel's folded bias (a few exact values),
    the rest a continuous spread up to ~5."""
    x = np.abs(rng.normal(0, 1.5, n))
    background = rng.random(n) < 0.7
    x[background] = rng.choice([0.0, 0.08, 0.28, 0.38, 0.48], background.sum())
    return x.astype(np.float32)


def test_entropy_keeps_the_range_of_background_dominated_activations():
    """Regression (mobilenetv2 on MNIST, W8A8 entropy 40.6% vs minmax 93.6%): spreading each
    point mass over its quantization chunk made the search clip to the chunk size of one bin
    (T = levels bins) or onto a point mass, cutting ~10% of the continuous values. Kept whole,
    the point masses cost nothing, and T covers the continuous part."""
    rng = np.random.default_rng(6)
    batches = [_background_activation(rng) for _ in range(4)]
    obs = make_observer("entropy", bits=8, signed=False, nonnegative=True)
    for b in batches:
        obs.update(b)
    data = np.concatenate(batches)
    lo, hi = obs.range()
    counts, width = obs.hist.magnitude()
    t_spread = kl_threshold_bin(counts, 256) * width   # TensorRT's Q, which spreads point masses
    assert t_spread < 0.5 * data.max()
    assert np.mean(data > t_spread) > 0.02              # the defect: 2% of all values (7% of the continuous part) clipped
    assert lo == 0.0
    assert hi > 0.9 * data.max()
    assert np.mean(data > hi) < 1e-4                    # fixed: only the far tail is clipped


# -- sharding ------------------------------------------------------------------------------------

def test_histogram_replay_shards_add_up_to_the_sequential_histogram_bin_for_bin():
    """Zeros first (no grid yet), then batches that grow the range both ways: any split of the
    batches, binned on the replayed grids and merged, is the sequential histogram exactly."""
    from qgraph.observers import HistogramReplay, StreamingHistogram
    rng = np.random.default_rng(7)
    digits = load_dataset("mnist", "val")["input"]
    batches = [np.zeros(40, np.float32), digits[:8] * 0.0] + \
              [(digits[8 * i:8 * i + 8] * (1 + i) - 0.2 * i).astype(np.float32) for i in range(1, 10)] + \
              [rng.standard_normal(500).astype(np.float32) * 30]
    sequential = StreamingHistogram(256)
    for b in batches:
        sequential.update(b)
    replay = HistogramReplay([(float(b.min()), float(b.max())) for b in batches], 256)
    for split in ([0, 1, 2], [5], [0, 3, 6, 9, 11]):
        mine = replay.shard({i: b for i, b in enumerate(batches) if i in split})
        rest = replay.shard({i: b for i, b in enumerate(batches) if i not in split})
        mine.merge(rest)
        assert np.array_equal(mine.counts, sequential.counts)
        assert (mine.lo, mine.width, mine.min, mine.max) == (sequential.lo, sequential.width, sequential.min,
                                                             sequential.max)
