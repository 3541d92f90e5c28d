"""Recurrent kernels: ONNX LSTM, GRU and RNN, and com.microsoft DynamicQuantizeLSTM.

All directions run together: the input projection ``X·Wᵀ`` of every step is one batched GEMM up
front, then each time step is one batched GEMM ``H_{t-1}·Rᵀ`` for both directions and a few
vectorized gate updates. The arithmetic follows ORT's CPU kernels (providers/cpu/rnn/
uni_directional_lstm.cc, deep_cpu_gru.cc, rnn.cc) in float32 and in their order — gates
``(X·Wᵀ + H·Rᵀ) + (Wb + Rb)``, then clip, then the activations, Sigmoid and Tanh being MLAS's
(:mod:`qgraph.interp.mlas`, bit-exact). What remains is the summation order of the float GEMMs
(OpenBLAS here, MLAS in ORT): LSTM outputs agree to a few float32 ulp of their range (measured
≤ 5 over 64 steps of a 512-wide bidirectional LSTM). DynamicQuantizeLSTM's GEMMs are exact
integers, so it is bit-exact. GRU's reset and output gates use ORT's own inline polynomial
sigmoid/tanh (deep_cpu_gru.cc), not transcribed here: GRU agrees to a few ulp.

``sequence_lens`` follows ORT: a batch entry stops at its length (outputs beyond it are 0, its
state is frozen), the reverse direction reverses each entry's first ``len`` steps, and ``Y_h``/
``Y_c`` are the states after each entry's last step.
"""

from __future__ import annotations

import numpy as np

from qgraph.interp import mlas
from qgraph.interp.ops_quant import _gemm_dtype, dynamic_quantize_linear, dynamic_quantize_rows
from qgraph.interp.registry import MS_DOMAIN, register

F32 = np.float32


def _f64_unary(fn):
    def act(x, alpha, beta):
        return fn(x.astype(np.float64), alpha, beta).astype(x.dtype)
    return act


#: name (lower case) -> (function(x, alpha, beta), default alpha, default beta, needs alpha, needs beta);
#: ORT (rnn_helpers.cc) consumes activation_alpha/activation_beta in order, only for the functions
#: that take them, and falls back to these defaults.
_ACTIVATIONS = {
    "sigmoid": (lambda x, a, b: mlas.logistic(x), 0.0, 0.0, False, False),
    "tanh": (lambda x, a, b: mlas.tanh(x), 0.0, 0.0, False, False),
    "relu": (lambda x, a, b: np.maximum(x, F32(0)), 0.0, 0.0, False, False),
    "affine": (lambda x, a, b: x * F32(a) + F32(b), 0.0, 0.0, True, True),
    "leakyrelu": (lambda x, a, b: np.where(x >= 0, x, x * F32(a)), 0.01, 0.0, True, False),
    "thresholdedrelu": (lambda x, a, b: np.where(x > F32(a), x, F32(0)), 0.0, 0.0, True, False),
    "scaledtanh": (_f64_unary(lambda x, a, b: np.float32(a) * np.tanh(np.float32(b) * x)), 0.0, 0.0, True, True),
    "hardsigmoid": (lambda x, a, b: np.clip(x * F32(a) + F32(b), F32(0), F32(1)), 0.2, 0.5, True, True),
    "elu": (_f64_unary(lambda x, a, b: np.where(x >= 0, x, np.float32(a) * (np.exp(x) - 1))), 1.0, 0.0, True, False),
    "softsign": (lambda x, a, b: x / (F32(1) + np.abs(x)), 0.0, 0.0, False, False),
    "softplus": (_f64_unary(lambda x, a, b: np.logaddexp(0.0, x)), 0.0, 0.0, False, False),
}


def activations(ctx, defaults: list[str], num_directions: int):
    """The node's activation functions, one list per direction, as ``fn(x)`` closures."""
    names = ctx.attr("activations") or defaults * num_directions
    if len(names) != len(defaults) * num_directions:
        raise ctx.error(f"activations lists {len(names)} functions; expected {len(defaults) * num_directions}")
    alphas = list(ctx.attr("activation_alpha", []))
    betas = list(ctx.attr("activation_beta", []))
    fns = []
    for name in names:
        key = name.lower()
        if key not in _ACTIVATIONS:
            raise ctx.error(f"activation {name!r} is not supported")
        fn, da, db, need_a, need_b = _ACTIVATIONS[key]
        a = (alphas.pop(0) if alphas else da) if need_a else 0.0
        b = (betas.pop(0) if betas else db) if need_b else 0.0
        fns.append(lambda x, fn=fn, a=a, b=b: fn(x, a, b))
    n = len(defaults)
    return [fns[d * n:(d + 1) * n] for d in range(num_directions)]


class _Sequence:
    """Geometry shared by the recurrent kernels: direction(s), layout, lengths, and the
    per-direction (reversed for 'reverse') inputs as a (D, T, B, I) array."""

    def __init__(self, ctx, x, seq_lens, gates: int, w):
        direction = ctx.attr("direction", "forward")
        if direction not in ("forward", "reverse", "bidirectional"):
            raise ctx.error(f"direction={direction!r} is not supported")
        self.layout = ctx.attr("layout", 0)
        if self.layout not in (0, 1):
            raise ctx.error(f"layout={self.layout} is not supported")
        if x.dtype != np.float32:
            raise ctx.error(f"input type {x.dtype} is not supported (float32 only)")
        if self.layout == 1:
            x = x.transpose(1, 0, 2)
        self.x = x
        self.t, self.b, self.i = x.shape
        self.reverse = [False, True] if direction == "bidirectional" else [direction == "reverse"]
        self.d = len(self.reverse)
        self.h = ctx.attr("hidden_size", w.shape[1] // gates)
        if seq_lens is None:
            self.lens = None
        else:
            lens = np.asarray(seq_lens).astype(np.int64).reshape(-1)
            if lens.size != self.b or lens.min(initial=0) < 0 or lens.max(initial=0) > self.t:
                raise ctx.error(f"sequence_lens {lens.tolist()} do not fit batch {self.b} and length {self.t}")
            self.lens = None if np.all(lens == self.t) else lens
        self.steps = self.t if self.lens is None else int(self.lens.max(initial=0))

    def time_index(self, reverse: bool):
        """(T, B) source step of each processed step: identity, or reversed within each length."""
        t = np.arange(self.t)[:, None]
        if not reverse:
            return np.broadcast_to(t, (self.t, self.b))
        lens = np.full(self.b, self.t) if self.lens is None else self.lens
        return np.where(t < lens, lens - 1 - t, t)

    def inputs(self) -> np.ndarray:
        """(D, T, B, I): each direction's input sequence in processing order."""
        out = []
        for rev in self.reverse:
            if not rev:
                out.append(self.x)
            elif self.lens is None:
                out.append(self.x[::-1])
            else:
                idx = self.time_index(True)
                out.append(self.x[idx, np.arange(self.b)])
        return np.stack(out)

    def active(self, step: int):
        """(1, B, 1) mask of the batch entries still running at ``step``, or None for all."""
        if self.lens is None:
            return None
        return (step < self.lens).reshape(1, -1, 1)

    def outputs(self, ys: np.ndarray) -> np.ndarray:
        """(D, T, B, H) step outputs in processing order -> Y (T, D, B, H) in time order (or the
        layout=1 form (B, T, D, H)), with zeros past each entry's length."""
        ys = ys.copy()
        for d, rev in enumerate(self.reverse):
            if rev:
                if self.lens is None:
                    ys[d] = ys[d, ::-1]
                else:
                    idx = self.time_index(True)
                    ys[d] = ys[d][idx, np.arange(self.b)]
        if self.lens is not None:
            ys *= (np.arange(self.t)[:, None] < self.lens)[None, :, :, None].astype(ys.dtype)
        y = ys.transpose(1, 0, 2, 3)
        return np.ascontiguousarray(y.transpose(2, 0, 1, 3) if self.layout == 1 else y)

    def zero_empty(self, s: np.ndarray) -> np.ndarray:
        """(D, B, H) final state with the entries of length 0 zeroed (ORT's Y_h/Y_c for them)."""
        if self.lens is None or self.lens.min() > 0:
            return s
        return np.where((self.lens > 0).reshape(1, -1, 1), s, F32(0))

    def state_out(self, s: np.ndarray) -> np.ndarray:
        """(D, B, H) final state, or (B, D, H) for layout=1."""
        return np.ascontiguousarray(s.transpose(1, 0, 2)) if self.layout == 1 else s

    def state_in(self, s, name: str, ctx) -> np.ndarray:
        if s is None:
            return np.zeros((self.d, self.b, self.h), F32)
        s = np.asarray(s, F32)
        if self.layout == 1:
            s = s.transpose(1, 0, 2)
        if s.shape != (self.d, self.b, self.h):
            raise ctx.error(f"{name} has shape {s.shape}; expected {(self.d, self.b, self.h)}")
        return s.copy()


def _float_projection(seq: _Sequence, w):
    """(D, T, B, G·H) = each direction's X·Wᵀ in float32 (W is (D, G·H, I))."""
    xs = seq.inputs()
    d, t, b, i = xs.shape
    return np.matmul(xs.reshape(d, t * b, i), w.transpose(0, 2, 1)).reshape(d, t, b, -1)


def _fused_bias(b, gates: int, h: int):
    """(D, 1, G·H) = Wb + Rb in float32 (ORT adds them once, up front), or None."""
    if b is None:
        return None
    b = np.asarray(b, F32)
    return (b[:, :gates * h] + b[:, gates * h:]).reshape(b.shape[0], 1, gates * h)


def _check_outputs(ctx, n_supported: int):
    if len(ctx.node.output) > n_supported:
        raise ctx.error(f"only the first {n_supported} outputs are defined")


# --------------------------------------------------------------------------- LSTM
def _lstm(ctx, seq: _Sequence, xw, recurrent, b, initial_h, initial_c, p):
    """The LSTM recurrence on precomputed input projections ``xw`` (D, T, B, 4H); ``recurrent(h)``
    returns ``xw_t``-compatible (D, B, 4H) H·Rᵀ products. Gate order i, o, f, c (ONNX)."""
    h_size = seq.h
    f_act, g_act, h_act = zip(*activations(ctx, ["Sigmoid", "Tanh", "Tanh"], seq.d))
    clip = ctx.attr("clip")
    input_forget = ctx.attr("input_forget", 0)
    bias = _fused_bias(b, 4, h_size)
    peep = None if p is None else np.asarray(p, F32).reshape(seq.d, 1, 3 * h_size)
    if peep is not None and bias is not None:
        bias_o = bias[..., h_size:2 * h_size].copy()
        bias = bias.copy()
        bias[..., h_size:2 * h_size] = 0  # the output gate's bias is added after its peephole term
    h = h_last = seq.state_in(initial_h, "initial_h", ctx)
    c = seq.state_in(initial_c, "initial_c", ctx)
    ys = np.zeros((seq.d, seq.t, seq.b, h_size), F32)
    i_sl, o_sl, f_sl, c_sl = (slice(k * h_size, (k + 1) * h_size) for k in range(4))
    fused = peep is None and not input_forget

    for step in range(seq.steps):
        g = xw[:, step] + recurrent(h)
        if peep is not None:
            g[..., i_sl] += c * peep[..., 0:h_size]
            if not input_forget:
                g[..., f_sl] += c * peep[..., 2 * h_size:3 * h_size]
        if bias is not None:
            g += bias
        if clip is not None:  # the output gate's input is complete (and clipped) only after its peephole
            for sl in ((i_sl, f_sl, c_sl) if peep is not None else (slice(None),)):
                np.clip(g[..., sl], F32(-clip), F32(clip), out=g[..., sl])
        if fused:  # i, o, f are contiguous and share f(): one call (element-wise, so the same values)
            ifo = _apply(f_act, g[..., :3 * h_size])
            gi, go, gf = ifo[..., i_sl], ifo[..., o_sl], ifo[..., f_sl]
        else:
            gi = _apply(f_act, g[..., i_sl])
            gf = F32(1) - gi if input_forget else _apply(f_act, g[..., f_sl])
        gc = _apply(g_act, g[..., c_sl])
        c_new = c * gf + gi * gc
        if not fused:
            go = g[..., o_sl]
            if peep is not None:
                go = go + c_new * peep[..., h_size:2 * h_size]
                if bias is not None:
                    go = go + bias_o
                if clip is not None:
                    go = np.clip(go, F32(-clip), F32(clip))
            go = _apply(f_act, go)
        h_new = _apply(h_act, c_new) * go
        mask = seq.active(step)
        if mask is None:
            h = h_last = h_new
            c = c_new
        else:  # ORT feeds a finished entry's (zeroed) output row to the next step's GEMM
            h_last = np.where(mask, h_new, h_last)
            h = np.where(mask, h_new, F32(0))
            c = np.where(mask, c_new, c)
        ys[:, step] = h_new
    return ys, seq.zero_empty(h_last), seq.zero_empty(c)


def _apply(fns, x):
    """Each direction's activation on its slice of x (D, B, H); one call when they agree."""
    if len(fns) == 1 or all(f.__defaults__ == fns[0].__defaults__ for f in fns):
        return fns[0](x)
    return np.stack([fn(x[d]) for d, fn in enumerate(fns)])


def _lstm_outputs(ctx, seq, ys, h, c):
    _check_outputs(ctx, 3)
    return seq.outputs(ys), seq.state_out(h), seq.state_out(c)


@register("LSTM")
def lstm(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    """ONNX LSTM (forward, reverse or bidirectional; layout 0 or 1; sequence_lens; peepholes;
    clip; input_forget; any of ORT's activation functions). ``clip`` bounds the gate inputs
    only, as ORT does (the spec is silent on the cell state fed to h(), ORT does not clip it)."""
    seq = _Sequence(ctx, x, sequence_lens, 4, w)
    w32 = np.asarray(w, F32)
    rt = ctx.once("rt", lambda: np.ascontiguousarray(np.asarray(r, F32).transpose(0, 2, 1)), 2)
    xw = _float_projection(seq, w32)
    ys, h, c = _lstm(ctx, seq, xw, lambda hh: np.matmul(hh, rt), b, initial_h, initial_c, p)
    return _lstm_outputs(ctx, seq, ys, h, c)


# --------------------------------------------------------------------------- DynamicQuantizeLSTM
def _quantized_weights(ctx, wq, scale, zp, d: int, what: str):
    """(D, K, N) ``wq - zp`` as exact floats and (D, 1, N) or (D, 1, 1) float32 scales. ORT takes
    one zero point per direction (its first entry; a per-column zero point must be constant, and
    zero for int8 weights) and a per-direction or per-column scale. The float type is float32 when
    no partial sum of a uint8 activation row with a weight column can reach 2^24 (then BLAS is
    exact in any order and reads half the bytes per step), else float64 — ops_quant's rule."""
    zp = np.asarray(zp)
    zpd = zp.reshape(d, -1)
    if np.any(zpd != zpd[:, :1]) or (wq.dtype == np.int8 and np.any(zpd != 0)):
        raise ctx.error(f"{what} zero point must be constant per direction (and 0 for int8 weights), as in ORT")
    dt = np.float32
    for k in range(d):
        if _gemm_dtype(np.empty(0, np.uint8), None, wq[k].T, zpd[k, 0]) != np.float32:
            dt = np.float64
    wf = (wq.astype(np.float64) - zpd[:, :1, None].astype(np.float64)).astype(dt)
    s = np.asarray(scale, F32).reshape(d, 1, -1)
    return wf, s


def _dynamic_quant_gemm(a, b_shifted, b_scale):
    """ORT's quantized RNN GEMM (rnn_helpers.cc ComputeGemm, uint8 weights): A (M, K) float32 is
    quantized to uint8 with one dynamic scale/zero point over all of A (DynamicQuantizeLinear's
    rule), the int32 product with the zero-point-shifted weights is exact (float BLAS on exact
    integers, see :func:`_quantized_weights`), and the result is
    ``float32(acc) * float32(a_scale * b_scale)``."""
    q, a_scale, a_zp = dynamic_quantize_linear(None, a)
    acc = np.matmul(q.astype(b_shifted.dtype) - b_shifted.dtype.type(a_zp), b_shifted).astype(F32, copy=False)
    acc *= a_scale * b_scale
    return acc


@register("DynamicQuantizeLSTM", MS_DOMAIN)
def dynamic_quantize_lstm(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None,
                          w_scale=None, w_zp=None, r_scale=None, r_zp=None):
    """com.microsoft DynamicQuantizeLSTM: an LSTM whose W (D, I, 4H) and R (D, H, 4H) — note the
    transposed layout — are uint8/int8 with per-direction or per-column scales. As ORT
    (contrib_ops/cpu/quantization/dynamic_quantize_lstm.cc over the LSTM kernel): each direction's
    whole input sequence is quantized with one dynamic uint8 scale for X·W, and each step's
    H_{t-1} with its own for H·R; everything after the GEMMs is the float LSTM."""
    if any(v is None for v in (w_scale, w_zp, r_scale, r_zp)):
        raise ctx.error("W/R scales and zero points are required")
    seq = _Sequence(ctx, x, sequence_lens, 4, np.empty((1, 4 * ctx.attr("hidden_size", r.shape[1]))))
    d = seq.d
    wf, ws = ctx.once("w", lambda: _quantized_weights(ctx, w, w_scale, w_zp, d, "W"), 1, 8, 9)
    rf, rs = ctx.once("r", lambda: _quantized_weights(ctx, r, r_scale, r_zp, d, "R"), 2, 10, 11)
    xs = seq.inputs()[:, :seq.steps]
    xw = np.zeros((d, seq.t, seq.b, 4 * seq.h), F32)
    for k in range(d):
        xw[k, :seq.steps] = _dynamic_quant_gemm(xs[k].reshape(-1, seq.i), wf[k], ws[k]).reshape(seq.steps, seq.b, -1)

    def recurrent(h):  # each direction's H quantized on its own range, both GEMMs in one call
        q, a_scale, zp = dynamic_quantize_rows(h)
        a = q.astype(rf.dtype)
        a -= zp.astype(rf.dtype).reshape(d, 1, 1)
        acc = np.matmul(a, rf).astype(F32, copy=False)   # float32 as is, float64 rounded
        acc *= a_scale.reshape(d, 1, 1) * rs   # float32(a_scale · r_scale), as ORT
        return acc

    ys, h, c = _lstm(ctx, seq, xw, recurrent, b, initial_h, initial_c, p)
    return _lstm_outputs(ctx, seq, ys, h, c)


# --------------------------------------------------------------------------- GRU / RNN
@register("GRU")
def gru(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None):
    """ONNX GRU, gate order z, r, h: ``z = f(X·Wzᵀ + H·Rzᵀ + Wbz + Rbz)``, likewise r;
    ``h̃ = g(X·Whᵀ + (r ⊙ H)·Rhᵀ + Rbh + Wbh)`` or, with linear_before_reset,
    ``g(X·Whᵀ + r ⊙ (H·Rhᵀ + Rbh) + Wbh)``; ``H = (1 - z) ⊙ h̃ + z ⊙ H``."""
    seq = _Sequence(ctx, x, sequence_lens, 3, w)
    hs = seq.h
    f_act, g_act = zip(*activations(ctx, ["Sigmoid", "Tanh"], seq.d))
    clip = ctx.attr("clip")
    lbr = ctx.attr("linear_before_reset", 0)
    w32, r32 = np.asarray(w, F32), np.asarray(r, F32)
    xw = _float_projection(seq, w32)
    if b is not None:
        b32 = np.asarray(b, F32).reshape(seq.d, 1, 6 * hs)
        wb, rb = b32[..., :3 * hs], b32[..., 3 * hs:]
    else:
        wb = rb = np.zeros((seq.d, 1, 3 * hs), F32)
    rzr_t = np.ascontiguousarray(r32[:, :2 * hs].transpose(0, 2, 1))
    rh_t = np.ascontiguousarray(r32[:, 2 * hs:].transpose(0, 2, 1))
    h = seq.state_in(initial_h, "initial_h", ctx)
    ys = np.zeros((seq.d, seq.t, seq.b, hs), F32)

    def clipped(v):
        return v if clip is None else np.clip(v, F32(-clip), F32(clip))

    for step in range(seq.steps):
        xt = xw[:, step]
        zr = clipped(xt[..., :2 * hs] + np.matmul(h, rzr_t) + (wb[..., :2 * hs] + rb[..., :2 * hs]))
        z = _apply(f_act, zr[..., :hs])
        rr = _apply(f_act, zr[..., hs:])
        if lbr:
            hh = xt[..., 2 * hs:] + rr * (np.matmul(h, rh_t) + rb[..., 2 * hs:]) + wb[..., 2 * hs:]
        else:
            hh = xt[..., 2 * hs:] + np.matmul(rr * h, rh_t) + (rb[..., 2 * hs:] + wb[..., 2 * hs:])
        hh = _apply(g_act, clipped(hh))
        h_new = (F32(1) - z) * hh + z * h
        mask = seq.active(step)
        h = h_new if mask is None else np.where(mask, h_new, h)
        ys[:, step] = h_new
    _check_outputs(ctx, 2)
    return seq.outputs(ys), seq.state_out(seq.zero_empty(h))


@register("RNN")
def rnn(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None):
    """ONNX (Elman) RNN: ``H = f(X·Wᵀ + H·Rᵀ + Wb + Rb)``, f default Tanh."""
    seq = _Sequence(ctx, x, sequence_lens, 1, w)
    (f_act,) = zip(*activations(ctx, ["Tanh"], seq.d))
    clip = ctx.attr("clip")
    xw = _float_projection(seq, np.asarray(w, F32))
    bias = _fused_bias(b, 1, seq.h)
    rt = np.ascontiguousarray(np.asarray(r, F32).transpose(0, 2, 1))
    h = seq.state_in(initial_h, "initial_h", ctx)
    ys = np.zeros((seq.d, seq.t, seq.b, seq.h), F32)
    for step in range(seq.steps):
        g = xw[:, step] + np.matmul(h, rt)
        if bias is not None:
            g += bias
        if clip is not None:
            np.clip(g, F32(-clip), F32(clip), out=g)
        h_new = _apply(f_act, g)
        mask = seq.active(step)
        h = h_new if mask is None else np.where(mask, h_new, h)
        ys[:, step] = h_new
    _check_outputs(ctx, 2)
    return seq.outputs(ys), seq.state_out(seq.zero_empty(h))
