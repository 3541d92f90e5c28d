"""`qgraph diff`: the same inputs through ONNX Runtime and the reference interpreter (and
optionally a second model), compared tensor by tensor, and gated.

The gate. Integer tensors must match exactly; float tensors must lie within the tolerance of the
op that produced them (qgraph/interp/tolerance.py: 0 for IEEE-exact arithmetic, data movement,
quantization ops and the MLAS transcriptions; 3 ulp for libm functions; 16 ulp of the output
range for sums, normalizations and recurrences). ``passed`` says both hold; the CLI exits 1 if not.

Design decision: a difference is charged to the op that makes it. A bound is measured for one op
on identical inputs, but a float op downstream of another float op sees inputs that already
differ. Adding bounds along paths would be unsound (Exp, Div and Softmax amplify what reaches
them) or meaningless after a few hundred ops; so instead:

- a tensor whose every ancestor op is exact ("exact provenance": the integer part of a lowered
  model and what only moves or dequantizes it) must be identical end to end;
- any other tensor that differs is checked where it is made: its op is re-run in the interpreter
  on the inputs ORT computed (``Plan.run_node``) and must reproduce ORT's output within the op's
  bound (exactly, for integer outputs and exact ops), and the same rule applies to those inputs,
  back to tensors of exact provenance.

So every kernel that contributes to a compared tensor is verified on the inputs ORT gave it, an
integer tensor computed from a float op's result (QuantizeLinear after a float Softmax) counts as
exact when its op reproduces ORT's codes from ORT's input, and what accumulates from op to op is
still shown end to end (exact %, max diff, cosine, SNR). ORT runs with every tensor the check
needs as an extra output, which keeps its optimizer from fusing across them: the graph is
compared as written.

The table, per tensor: exact-match rate, largest difference (integer tensors in codes, ``LSB``;
float tensors in steps of a per-tensor quantizer next to them, ``LSB@scale``, else in ulp of the
tensor's largest magnitude, ``range ulp``), cosine similarity and SNR = 10·log10(Σa² / Σ(a − b)²)
in dB with ``a`` the reference side (ORT running the model). int8 codes compared with uint8 codes
of the same tensor (the integer target stores activations as uint8) are shifted by +128 first.
Integer tensors are centred on their zero point when it is known before cosine and SNR.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper

from qgraph.annotations import rescale_between
from qgraph.data import LABELS, check_data, load_data
from qgraph.errors import DataError
from qgraph.interp.registry import outer_names
from qgraph.interp.tolerance import EXACT, Tolerance, node_tolerance, sum_scale, summed_terms
from qgraph.quant import int8_as_uint8

__all__ = ["diff_models", "check_feeds", "DiffReport", "Comparison", "TensorStats", "TensorCheck",
           "ToleranceGate"]


@dataclass
class TensorStats:
    """Running comparison of one tensor between a reference run (a) and another (b)."""
    name: str
    dtype: str
    unit: float | None = None      # LSB size of a float tensor; None: ulp of its range (or integer LSBs)
    zero_point: float = 0.0
    count: int = 0
    equal: int = 0
    max_diff: float = 0.0
    sum_ab: float = 0.0
    sum_aa: float = 0.0
    sum_bb: float = 0.0
    sum_err: float = 0.0
    shape_mismatch: str | None = None

    @property
    def is_integer(self) -> bool:
        return self.dtype.startswith(("int", "uint", "bool"))

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            self.shape_mismatch = f"shapes {list(a.shape)} vs {list(b.shape)}"
            return
        if a.dtype == np.bool_:
            a, b = a.astype(np.uint8), b.astype(np.uint8)
        self.count += a.size
        if np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):  # the common case: one pass
            self.equal += a.size
            c = np.nan_to_num(a.astype(np.float64) - self.zero_point)
            energy = float(np.dot(c.reshape(-1), c.reshape(-1)))
            self.sum_ab, self.sum_aa, self.sum_bb = (self.sum_ab + energy, self.sum_aa + energy,
                                                     self.sum_bb + energy)
            return
        fa, fb = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
        if a.dtype.kind == "f" and self._update_finite(a, fa, fb):
            return
        self.equal += int(np.sum((a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else (a == b)))
        diff = np.abs(fa - fb)
        if diff.size:
            self.max_diff = max(self.max_diff, float(np.nanmax(diff)) / self._step(a))
        ca, cb = fa - self.zero_point, fb - self.zero_point
        self.sum_ab += float(np.nansum(ca * cb))
        self.sum_aa += float(np.nansum(ca * ca))
        self.sum_bb += float(np.nansum(cb * cb))
        self.sum_err += float(np.nansum((fa - fb) ** 2))

    def _update_finite(self, a: np.ndarray, fa: np.ndarray, fb: np.ndarray) -> bool:
        """The same sums for float tensors with no NaN or infinity on either side (then a − b is
        finite), as dot products: a third of the passes over the data. False: take the NaN-aware path."""
        diff = fa - fb
        if not np.isfinite(diff).all():
            return False
        self.equal += int(np.count_nonzero(diff == 0))
        if diff.size:
            top = float(np.abs(fa).max())
            self.max_diff = max(self.max_diff, float(np.abs(diff).max()) / self._step(a, top))
        ca, cb = (fa, fb) if self.zero_point == 0 else (fa - self.zero_point, fb - self.zero_point)
        self.sum_ab += float(ca @ cb)
        self.sum_aa += float(ca @ ca)
        self.sum_bb += float(cb @ cb)
        self.sum_err += float(diff @ diff)
        return True

    def _step(self, a: np.ndarray, top: float | None = None) -> float:
        if self.is_integer:
            return 1.0
        if self.unit:
            return self.unit
        if top is None:
            top = np.abs(a[np.isfinite(a)]).max(initial=0)
        return float(np.spacing(a.dtype.type(top))) or 1.0

    @property
    def exact_rate(self) -> float:
        return self.equal / self.count if self.count else 1.0

    @property
    def exact(self) -> bool:
        return self.shape_mismatch is None and self.equal == self.count

    @property
    def cosine(self) -> float:
        denom = np.sqrt(self.sum_aa * self.sum_bb)
        if denom == 0:
            return 1.0 if self.sum_aa == self.sum_bb else 0.0
        return float(self.sum_ab / denom)

    @property
    def snr_db(self) -> float:
        if self.sum_err == 0:
            return float("inf")
        if self.sum_aa == 0:
            return float("-inf")
        return float(10.0 * np.log10(self.sum_aa / self.sum_err))

    @property
    def unit_name(self) -> str:
        if self.is_integer:
            return "LSB"
        return f"LSB@{self.unit:.3g}" if self.unit else "range ulp"

    def as_dict(self) -> dict:
        return {"tensor": self.name, "dtype": self.dtype, "elements": self.count,
                "exact_match_rate": self.exact_rate, "max_diff": self.max_diff, "max_diff_unit": self.unit_name,
                "cosine": self.cosine, "snr_db": self.snr_db, "shape_mismatch": self.shape_mismatch}


class OutputFidelity:
    """How close a model's outputs are to a reference model's on the same data: `snr_db(model)`
    is 10·log10(Σ reference² / Σ (model − reference)²) pooled over every graph output and batch
    (one TensorStats) — what a pass that may change outputs checks (bias_correction's guard,
    calibrate's range search). `batches()` yields the feeds anew for each call. The reference
    outputs are kept after the first call while they fit in `keep_bytes` (a classifier's logits,
    a recognizer's strips), and otherwise recomputed beside each model: memory stays bounded."""

    def __init__(self, reference: onnx.ModelProto, batches, keep_bytes: int = 256 << 20):
        from qgraph.runner import Runner
        self.names = [o.name for o in reference.graph.output]
        self.batches = batches
        self.reference = Runner(reference, self.names)
        self.keep_bytes = keep_bytes
        self._kept: list[tuple[dict, dict]] | None = None

    def _pairs(self):
        if self._kept is not None:
            yield from self._kept
            return
        kept, size = [], 0
        for feeds in self.batches():
            want = self.reference.run(feeds, self.names)
            if kept is not None:
                size += sum(np.asarray(v).nbytes for v in want.values()) + sum(v.nbytes for v in feeds.values())
                if size <= self.keep_bytes:
                    kept.append((feeds, want))
                else:
                    kept = None
            yield feeds, want
        self._kept = kept

    def snr_db(self, model: onnx.ModelProto) -> float:
        from qgraph.runner import Runner
        runner = Runner(model, self.names)
        stats = TensorStats("outputs", "float32")
        for feeds, want in self._pairs():
            got = runner.run(feeds, self.names)
            for name in self.names:
                stats.update(np.asarray(want[name]), np.asarray(got[name]))
        return stats.snr_db


@dataclass
class TensorCheck:
    """The gate's verdict on one tensor, accumulated over batches."""
    name: str
    integer: bool
    op: str                     # the producing op type
    tolerance: Tolerance
    exact_provenance: bool
    mode: str = "equal"         # equal | op (re-run on ORT's inputs) | end-to-end (differs, exact provenance)
    worst: float = 0.0          # worst |diff| / bound of the op check (inf: beyond a zero bound)
    beyond: int = 0             # elements beyond the bound
    detail: str = ""            # shape or dtype mismatch

    @property
    def passed(self) -> bool:
        return self.beyond == 0 and not self.detail

    def note(self, mode: str, worst: float, beyond: int, detail: str = "") -> None:
        if mode != "equal" and self.mode != "end-to-end":
            self.mode = mode
        self.worst = max(self.worst, worst)
        self.beyond += beyond
        self.detail = self.detail or detail

    def describe(self) -> str:
        """What the check column of the table says."""
        if self.detail:
            return f"FAIL {self.detail}"
        if self.mode == "equal":
            return "equal"
        if self.mode == "end-to-end":
            return f"FAIL {self.beyond} differ"
        if not self.passed:
            return f"FAIL op: {self.beyond} beyond"
        return "op exact" if self.worst == 0 else f"op ok {self.worst:.2f}"

    def as_dict(self) -> dict:
        return {"tensor": self.name, "kind": "integer" if self.integer else "float", "op": self.op,
                "tolerance": self.tolerance.describe(), "exact_provenance": self.exact_provenance,
                "mode": self.mode, "worst_of_bound": None if np.isinf(self.worst) else self.worst,
                "beyond": self.beyond, "detail": self.detail, "passed": self.passed}


@dataclass
class Comparison:
    """One pair of runs over the same inputs: `reference` vs `other`, per tensor."""
    reference: str
    other: str
    tensors: list[TensorStats]
    top1_agreement: dict[str, float] = field(default_factory=dict)   # output -> argmax agreement
    checks: dict[str, TensorCheck] = field(default_factory=dict)     # the gate (ORT vs interpreter only)

    @property
    def exact(self) -> bool:
        return all(t.exact for t in self.tensors)

    def as_dict(self) -> dict:
        result = {"reference": self.reference, "other": self.other, "exact": self.exact,
                  "top1_agreement": self.top1_agreement, "tensors": [t.as_dict() for t in self.tensors]}
        if self.checks:
            result["checks"] = [c.as_dict() for c in self.checks.values()]
        return result


@dataclass
class DiffReport:
    model: str
    samples: int
    comparisons: list[Comparison]
    accuracy: dict[str, float] = field(default_factory=dict)  # "<run>:<output>" -> top-1 accuracy

    @property
    def bit_exact(self) -> bool:
        """ORT and the interpreter agree on every compared element of the model."""
        return self.comparisons[0].exact

    @property
    def checks(self) -> list[TensorCheck]:
        return list(self.comparisons[0].checks.values())

    @property
    def integer_exact(self) -> bool:
        return all(c.passed for c in self.checks if c.integer)

    @property
    def float_within_tolerance(self) -> bool:
        return all(c.passed for c in self.checks if not c.integer)

    @property
    def passed(self) -> bool:
        """Every integer tensor exact and every float tensor within its op's tolerance."""
        return self.integer_exact and self.float_within_tolerance

    def summary(self) -> str:
        ints = [c for c in self.checks if c.integer]
        floats = [c for c in self.checks if not c.integer]
        parts = []
        bad = [c.name for c in ints if not c.passed]
        if bad:
            parts.append(f"integer tensors NOT exact: {len(bad)} of {len(ints)} differ ({_names(bad)})")
        elif ints:
            by_op = sum(1 for c in ints if c.mode == "op")
            parts.append(f"integer tensors exact ({len(ints)}"
                         + (f"; {by_op} from ORT's float inputs" if by_op else "") + ")")
        bad = [c.name for c in floats if not c.passed]
        if bad:
            parts.append(f"float tensors beyond tolerance: {len(bad)} of {len(floats)} ({_names(bad)})")
        elif floats:
            equal = sum(1 for c in floats if c.mode == "equal")
            parts.append(f"float tensors within tolerance ({len(floats)}; {equal} identical)")
        verdict = "pass" if self.passed else "FAIL"
        return f"{self.model}: {self.samples} samples; ORT vs interpreter: {verdict}: " + "; ".join(parts)

    def as_dict(self) -> dict:
        return {"model": self.model, "samples": self.samples, "passed": self.passed,
                "integer_exact": self.integer_exact, "float_within_tolerance": self.float_within_tolerance,
                "bit_exact": self.bit_exact, "summary": self.summary(), "accuracy": self.accuracy,
                "comparisons": [c.as_dict() for c in self.comparisons]}

    def format_table(self, max_rows: int | None = None) -> str:
        lines = [self.summary()]
        for key, acc in self.accuracy.items():
            lines.append(f"  top-1 accuracy {key}: {acc:.2%}")
        width = max([len(t.name) for c in self.comparisons for t in c.tensors] + [6])
        width = min(width, 48)
        for c in self.comparisons:
            lines.append("")
            lines.append(f"{c.reference} vs {c.other}" + "".join(
                f"; top-1 agreement {k}: {v:.2%}" for k, v in c.top1_agreement.items()))
            rows = c.tensors if max_rows is None else c.tensors[:max_rows]
            if not c.checks:
                lines.append(_header(width, gated=False))
                lines += [_row(t, width) for t in rows]
            else:
                for integer, title in ((True, "integer tensors: must be exact"),
                                       (False, "float tensors: within the tolerance of the op that made them")):
                    part = [t for t in rows if t.name in c.checks and c.checks[t.name].integer == integer]
                    if part:
                        lines.append(f"  {title}")
                        lines.append(_header(width, gated=True))
                        lines += [_row(t, width, c.checks[t.name]) for t in part]
                shown = {t.name for t in c.tensors}
                hidden = [k for k in c.checks.values() if k.name not in shown]
                if hidden:
                    failed = [k for k in hidden if not k.passed]
                    lines.append(f"  and {len(hidden)} tensors on the way, checked for the gate: "
                                 + ("all pass" if not failed else
                                    "FAIL " + ", ".join(f"{k.name} ({k.op}: {k.describe()})" for k in failed[:5]))
                                 + " (--per-layer shows every tensor)")
            if len(rows) < len(c.tensors):
                lines.append(f"  … {len(c.tensors) - len(rows)} more")
            if any(k.mode == "end-to-end" for k in c.checks.values()):
                lines.append("  an exact-provenance tensor differs: --per-layer finds the first op that differs")
        return "\n".join(lines)


def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", … {len(names) - limit} more" if len(names) > limit else "")


def _header(width: int, gated: bool) -> str:
    text = f"  {'tensor':<{width}} {'dtype':<8} {'exact %':>8} {'max diff':>10} {'unit':<10} {'cosine':>9} {'SNR dB':>7}"
    return text + f"  {'op: tolerance':<28} check" if gated else text


def _row(t: TensorStats, width: int, check: TensorCheck | None = None) -> str:
    name = t.name if len(t.name) <= width else "…" + t.name[-(width - 1):]
    if t.shape_mismatch:
        text = f"  {name:<{width}} {t.dtype:<8} {t.shape_mismatch}"
    else:
        text = (f"  {name:<{width}} {t.dtype:<8} {100 * t.exact_rate:8.2f} {t.max_diff:10.4g} "
                f"{t.unit_name:<10} {t.cosine:9.6f} {t.snr_db:7.1f}")
    if check is not None:
        tol = "exact" if check.integer else check.tolerance.describe()
        text += f"  {(check.op + ': ' + tol)[:28]:<28} {check.describe()}"
    return text


# -- tensor facts from the graph --------------------------------------------------------------

def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def tensor_grids(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """tensor -> (scale, zero point) of a per-tensor quantizer reading or writing it (the float
    side of QuantizeLinear/DequantizeLinear, the integer side of either, QLinear ops' inputs/outputs)."""
    consts = _constants(model)
    grids: dict[str, tuple[float, float]] = {}

    def put(tensor, scale_name, zp_name):
        s = consts.get(scale_name)
        if not tensor or s is None or s.size != 1:
            return
        z = consts.get(zp_name) if zp_name else None
        grids.setdefault(tensor, (float(s.reshape(-1)[0]), float(z.reshape(-1)[0]) if z is not None else 0.0))

    for n in model.graph.node:
        ins = list(n.input) + [""] * 9
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for t in (n.input[0], n.output[0]):
                put(t, ins[1], ins[2])
        elif n.op_type in ("QLinearConv", "QLinearMatMul"):
            put(n.input[0], ins[1], ins[2])
            put(n.output[0], ins[6], ins[7])
        elif n.op_type in ("QLinearAdd", "QLinearMul"):
            put(n.input[0], ins[1], ins[2])
            put(n.input[3], ins[4], ins[5])
            put(n.output[0], ins[6], ins[7])
        elif n.op_type in ("QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu"):
            put(n.input[0], ins[1], ins[2])
            put(n.output[0], ins[3], ins[4])
    return grids


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types only help to name extra outputs
        return model


def intermediate_names(model: onnx.ModelProto) -> list[str]:
    """Every node output of the model, in graph order (graph outputs included)."""
    return [t for n in model.graph.node for t in n.output if t]


# -- the gate ---------------------------------------------------------------------------------

class ToleranceGate:
    """Which tensors the gate needs for the compared ones, and how it checks each (module
    docstring): tensors of exact provenance end to end, the others op by op on ORT's inputs."""

    def __init__(self, model: onnx.ModelProto, compared: list[str]):
        graph = model.graph
        self.producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
        self.nodes = list(graph.node)
        # a node's inputs and the enclosing-scope tensors its subgraphs read (If, Loop)
        self.inputs = [(*n.input, *outer_names(n)) for n in self.nodes]
        self.fixed = {i.name for i in graph.initializer}
        self.graph_inputs = {i.name for i in graph.input}
        self.tolerance = [node_tolerance(n) for n in self.nodes]
        self.float_tensors = _float_tensors(model)
        self.exact_provenance = self._provenance()
        needed = list(dict.fromkeys(t for t in compared if t in self.producer))
        seen, stack = set(needed), [t for t in needed if not self.exact_provenance[t]]
        while stack:
            for t in self.inputs[self.producer[stack.pop()]]:
                if t and t in self.producer and t not in seen:
                    seen.add(t)
                    needed.append(t)
                    if not self.exact_provenance[t]:
                        stack.append(t)
        self.needed = needed

    def _provenance(self) -> dict[str, bool]:
        """tensor -> whether every op on every path from the inputs to it is exact."""
        exact: dict[str, bool] = {}
        pending = list(range(len(self.nodes)))
        while pending:  # nodes in any order: resolve those whose inputs are known (DAG)
            rest = []
            for i in pending:
                node = self.nodes[i]
                ins = [t for t in self.inputs[i] if t and t in self.producer]
                if any(t not in exact for t in ins):
                    rest.append(i)
                    continue
                value = self._exact_op(i) and all(exact[t] for t in ins)
                for o in node.output:
                    if o:
                        exact[o] = value
            if len(rest) == len(pending):  # a cycle: checked elsewhere; treat as inexact
                for i in rest:
                    for o in self.nodes[i].output:
                        exact.setdefault(o, False)
                break
            pending = rest
        return exact

    def _exact_op(self, i: int) -> bool:
        """Exact by its tolerance family, or an integer computation (a ReduceSum of int32 codes)."""
        node = self.nodes[i]
        return self.tolerance[i].exact or not any(t in self.float_tensors for t in [*node.input, *node.output] if t)

    @staticmethod
    def _value(name: str, ref: dict, feeds: dict, plan):
        for values in (ref, feeds, plan.consts):
            if name and name in values:
                return values[name]
        return None

    @classmethod
    def _shape(cls, name: str, ref: dict, feeds: dict, plan) -> tuple | None:
        value = cls._value(name, ref, feeds, plan)
        return None if value is None else np.shape(value)

    def new_check(self, name: str, dtype: np.dtype) -> TensorCheck:
        i = self.producer[name]
        integer = np.dtype(dtype).kind in "iub"
        return TensorCheck(name, integer, self.nodes[i].op_type, EXACT if integer else self.tolerance[i],
                           self.exact_provenance[name])

    def check_batch(self, checks: dict[str, TensorCheck], ref: dict, mine: dict, feeds: dict, plan) -> None:
        """Update ``checks`` with one batch: ``ref`` ORT's values, ``mine`` the interpreter's."""
        rerun: dict[int, dict] = {}
        for name in self.needed:
            if name not in ref or name not in mine:
                continue
            a, b = np.asarray(ref[name]), np.asarray(mine[name])
            check = checks.get(name)
            if check is None:
                check = checks[name] = self.new_check(name, a.dtype)
            if a.shape != b.shape or a.dtype != b.dtype:
                check.note("end-to-end", float("inf"), a.size,
                           f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
                continue
            if np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                check.note("equal", 0.0, 0)
                continue
            if check.exact_provenance:
                check.note("end-to-end", float("inf"), int(np.count_nonzero(~((a == b) | (a != a) & (b != b)))))
                continue
            i = self.producer[name]
            if i not in rerun:
                values = {t: ref[t] if t in ref else feeds[t] for t in self.inputs[i]
                          if t and t not in self.fixed and (t in ref or t in feeds)}
                rerun[i] = plan.run_node(i, values)
            c = np.asarray(rerun[i][name])
            if c.shape != a.shape or c.dtype != a.dtype:
                check.note("op", float("inf"), a.size, f"op gives {c.dtype}{list(c.shape)}")
                continue
            tol = check.tolerance
            if not check.integer and not tol.exact:
                node = self.nodes[i]
                shapes = [self._shape(t, ref, feeds, plan) for t in node.input]
                tol = check.tolerance = node_tolerance(node, summed_terms(node, shapes, a.shape))
                scale = sum_scale(node, [self._value(t, ref, feeds, plan) for t in node.input])
                if scale:   # as many ulp of this batch's partial sums' scale (qgraph.interp.tolerance)
                    tol = replace(tol, atol=max(tol.atol, tol.range_ulp * float(np.spacing(np.float32(scale)))))
            worst, beyond = tol.measure(a, c)
            check.note("op", worst, beyond)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors of a floating-point type, or of a type shape inference left unknown (a model run
    through :func:`_typed` first)."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({i.name: i.data_type for i in g.initializer})
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    names = {t for n in g.node for t in [*n.input, *n.output] if t}
    return {t for t in names if types.get(t, onnx.TensorProto.UNDEFINED) in floats | {onnx.TensorProto.UNDEFINED}}


# -- running ----------------------------------------------------------------------------------

def _as_model(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "model"
    from qgraph.model_io import load_model
    return load_model(model), str(model)


def diff_models(model, data, against=None, per_layer: bool = False, *, batch_size: int = 64,
                limit: int | None = None) -> DiffReport:
    """Compare ORT and qgraph.interp on `model` (and ORT on `against`, by tensor name) over `data`
    (a dict of arrays or an .npz path). `per_layer` adds every intermediate tensor."""
    from qgraph.interp import compile_model
    from qgraph.runner import Runner

    model, label = _as_model(model)
    if isinstance(data, (str, os.PathLike)):
        data = load_data(data, model)
    plan = check_data(data, model)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    inputs = plan.names
    outputs = [o.name for o in model.graph.output]
    names = intermediate_names(model) if per_layer else outputs
    names = list(dict.fromkeys(outputs + [n for n in names if n not in inputs]))
    model, ort_model = _ort_runner(model, lambda m: ToleranceGate(m, names).needed, inputs, names, label)
    gate = ToleranceGate(model, names)
    fetched = list(dict.fromkeys(names + [t for t in gate.needed if t not in inputs]))

    other = other_label = None
    other_names: list[str] = []
    if against is not None:
        other, other_label = _as_model(against)
        other = _typed(other)
        available = set(intermediate_names(other)) | {o.name for o in other.graph.output}
        other_names = [n for n in names if n in available]

    interp_plan = compile_model(model)  # decode weights and order nodes once, not per batch
    ort_other = Runner(other, other_names) if other is not None and other_names else None
    grids = tensor_grids(model)
    interp_stats: dict[str, TensorStats] = {}
    against_stats: dict[str, TensorStats] = {}
    checks: dict[str, TensorCheck] = {}
    agree = {"interp": {}, "against": {}}
    correct: dict[str, list[int]] = {}
    samples = 0
    batch_size = _bounded_batch(ort_model, plan, fetched, batch_size)
    for batch, count in plan.batches(batch_size, limit, with_labels=True):
        feeds = {k: batch[k] for k in inputs}
        samples += count
        ref = ort_model.run(feeds, fetched)
        mine = interp_plan.run(feeds, fetched)
        _accumulate(interp_stats, ref, mine, names, grids)
        gate.check_batch(checks, ref, mine, feeds, interp_plan)
        runs = {"ort": ref, "interp": mine}
        _agreement(agree["interp"], ref, mine, outputs)
        if ort_other is not None:
            theirs = {name: rescale_between(other, model, name, value)        # smooth/equalize's factors
                      for name, value in ort_other.run(feeds, other_names).items()}
            _accumulate(against_stats, ref, theirs, other_names, grids)
            _agreement(agree["against"], ref, theirs, [o for o in outputs if o in theirs])
            runs["against"] = theirs
        labels = batch.get(LABELS)
        if labels is not None and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
            for run_name, values in runs.items():
                for o in outputs:
                    v = values.get(o)
                    if v is not None and v.ndim == 2 and len(v) == len(labels):
                        hit = correct.setdefault(f"{run_name}:{o}", [0, 0])
                        hit[0] += int(np.sum(v.argmax(1) == labels))
                        hit[1] += len(v)
    if samples == 0:
        raise DataError(f"no sample was compared (the data holds {plan.samples}, the model's fixed batch is "
                        f"{plan.run_size(batch_size)}); give at least one full batch")
    ordered = {n: checks[n] for n in gate.needed if n in checks}
    comparisons = [Comparison("ort", "interp", [interp_stats[n] for n in names if n in interp_stats],
                              _rates(agree["interp"]), ordered)]
    if other is not None:
        comparisons.append(Comparison("ort", f"ort({other_label})",
                                      [against_stats[n] for n in other_names if n in against_stats],
                                      _rates(agree["against"])))
    accuracy = {k: v[0] / v[1] for k, v in correct.items() if v[1]}
    return DiffReport(label, samples, comparisons, accuracy)


def check_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                names: list[str] | None = None) -> dict[str, TensorCheck]:
    """The gate on one set of feeds, as given (no data-file rules): ``{tensor: TensorCheck}`` for
    the tensors ``names`` (default: every tensor) and those the gate needs on the way."""
    from qgraph.interp import compile_model
    from qgraph.runner import Runner

    model = _typed(model)
    names = intermediate_names(model) if names is None else names
    gate = ToleranceGate(model, names)
    fetched = [t for t in gate.needed if t not in feeds]
    plan = compile_model(model)
    ref = Runner(model, fetched).run(feeds, fetched)
    mine = plan.run(feeds, fetched)
    checks: dict[str, TensorCheck] = {}
    gate.check_batch(checks, ref, mine, feeds, plan)
    return checks


def _ort_runner(model: onnx.ModelProto, needed, inputs: list[str], names: list[str], label: str):
    """(model, ORT runner fetching what the gate needs). A model at an opset newer than qgraph's
    working one that ORT 1.19 cannot load (ONNX's node tests at opset 21: QLinearMatMul has no
    kernel there) is converted to the working opset first, with a warning, and both sides run
    the converted graph."""
    from qgraph.errors import ModelError
    from qgraph.model_io import OPSET, convert_to_working_opset, default_opset
    from qgraph.runner import Runner

    def runner(m):
        m = _typed(m)
        fetched = list(dict.fromkeys(names + [t for t in needed(m) if t not in inputs]))
        return m, Runner(m, fetched)

    try:
        return runner(model)
    except ModelError as refused:
        if default_opset(model) <= OPSET:
            raise
        try:
            converted = convert_to_working_opset(model, origin=f"{label} (ONNX Runtime cannot load it as it is)")
        except ModelError:
            raise refused from None   # ORT's reason says more than the converter's
    return runner(converted)


#: Bytes of the tensors one side of the comparison holds per batch: beyond it, the batch shrinks.
FETCH_BUDGET = 1 << 30


def _bounded_batch(runner, plan, fetched: list[str], batch_size: int) -> int:
    """``batch_size``, lowered so that one batch of every fetched tensor (all of them for a float
    model: the gate checks each op) stays under FETCH_BUDGET; measured on one sample."""
    if plan.run_size(batch_size) <= 1 or plan.run_size(1) != 1:
        return batch_size   # a fixed or stacked feed has its own run size
    for feeds, _ in plan.batches(1, 1):
        per_sample = sum(np.asarray(v).nbytes for v in runner.run(feeds, fetched).values())
        return max(1, min(batch_size, FETCH_BUDGET // max(per_sample, 1)))
    return batch_size


def _same_codes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes as uint8 + 128 when the other side is uint8 (the integer target stores int8
    activations that way: same real values)."""
    if a.dtype == np.int8 and b.dtype == np.uint8:
        return int8_as_uint8(a), b
    if a.dtype == np.uint8 and b.dtype == np.int8:
        return a, int8_as_uint8(b)
    return a, b


def _accumulate(stats: dict[str, TensorStats], ref: dict, other: dict, names: list[str], grids: dict) -> None:
    for name in names:
        if name not in ref or name not in other:
            continue
        a, b = _same_codes(np.asarray(ref[name]), np.asarray(other[name]))
        if name not in stats:
            scale, zp = grids.get(name, (None, 0.0))
            is_int = a.dtype.kind in "iub"
            stats[name] = TensorStats(name, a.dtype.name, unit=None if is_int else scale,
                                      zero_point=zp if is_int else 0.0)
        stats[name].update(a, b)


def _agreement(acc: dict, ref: dict, other: dict, outputs: list[str]) -> None:
    for o in outputs:
        a, b = ref.get(o), other.get(o)
        if a is None or b is None or a.ndim != 2 or a.shape != b.shape:
            continue
        hit = acc.setdefault(o, [0, 0])
        hit[0] += int(np.sum(a.argmax(1) == b.argmax(1)))
        hit[1] += len(a)


def _rates(acc: dict) -> dict[str, float]:
    return {k: v[0] / v[1] for k, v in acc.items() if v[1]}
