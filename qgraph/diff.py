"""`qgraph diff`: the same inputs through ONNX Runtime and the reference interpreter (and
optionally a second model), compared tensor by tensor.

Per tensor: exact-match rate, largest difference in LSBs (integer tensors: ``|a − b|``; float
tensors: ``|a − b| / scale`` when a per-tensor quantizer next to the tensor gives the scale,
else absolute), cosine similarity and SNR = 10·log10(Σa² / Σ(a − b)²) in dB, with ``a`` the
reference side (ORT running the model). int8 codes compared with uint8 codes of the same tensor
(the integer target stores activations as uint8) are shifted by +128 first. Integer tensors are centred on their zero point when it
is known before cosine and SNR. ``bit_exact`` is False when ORT and the interpreter differ in any
compared element: the CLI exits 1 then, so CI can gate on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from qgraph.data import LABELS, check_data, load_data
from qgraph.quant import int8_as_uint8
from qgraph.errors import DataError

__all__ = ["diff_models", "DiffReport", "Comparison", "TensorStats"]


@dataclass
class TensorStats:
    """Running comparison of one tensor between a reference run (a) and another (b)."""
    name: str
    dtype: str
    unit: float | None = None      # LSB size of a float tensor; None: absolute (or integer LSBs)
    zero_point: float = 0.0
    count: int = 0
    equal: int = 0
    max_diff: float = 0.0
    sum_ab: float = 0.0
    sum_aa: float = 0.0
    sum_bb: float = 0.0
    sum_err: float = 0.0
    shape_mismatch: str | None = None

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            self.shape_mismatch = f"shapes {list(a.shape)} vs {list(b.shape)}"
            return
        self.count += a.size
        if np.array_equal(a, b):  # the common case in a bit-exact check: one pass
            self.equal += a.size
            c = a.astype(np.float64) - self.zero_point
            energy = float(np.dot(c.reshape(-1), c.reshape(-1)))
            self.sum_ab, self.sum_aa, self.sum_bb = (self.sum_ab + energy, self.sum_aa + energy,
                                                     self.sum_bb + energy)
            return
        self.equal += int(np.sum((a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else (a == b)))
        fa, fb = a.astype(np.float64), b.astype(np.float64)
        diff = np.abs(fa - fb)
        if diff.size:
            self.max_diff = max(self.max_diff, float(np.nanmax(diff)) / (self.unit or 1.0))
        ca, cb = fa - self.zero_point, fb - self.zero_point
        self.sum_ab += float(np.sum(ca * cb))
        self.sum_aa += float(np.sum(ca * ca))
        self.sum_bb += float(np.sum(cb * cb))
        self.sum_err += float(np.sum((fa - fb) ** 2))

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
        if self.dtype.startswith(("int", "uint")):
            return "LSB"
        return f"LSB@{self.unit:.3g}" if self.unit else "abs"

    def as_dict(self) -> dict:
        return {"tensor": self.name, "dtype": self.dtype, "elements": self.count,
                "exact_match_rate": self.exact_rate, "max_diff": self.max_diff, "max_diff_unit": self.unit_name,
                "cosine": self.cosine, "snr_db": self.snr_db, "shape_mismatch": self.shape_mismatch}


@dataclass
class Comparison:
    """One pair of runs over the same inputs: `reference` vs `other`, per tensor."""
    reference: str
    other: str
    tensors: list[TensorStats]
    top1_agreement: dict[str, float] = field(default_factory=dict)   # output -> argmax agreement

    @property
    def exact(self) -> bool:
        return all(t.exact for t in self.tensors)

    def as_dict(self) -> dict:
        return {"reference": self.reference, "other": self.other, "exact": self.exact,
                "top1_agreement": self.top1_agreement, "tensors": [t.as_dict() for t in self.tensors]}


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

    def as_dict(self) -> dict:
        return {"model": self.model, "samples": self.samples, "bit_exact": self.bit_exact,
                "accuracy": self.accuracy, "comparisons": [c.as_dict() for c in self.comparisons]}

    def format_table(self, max_rows: int | None = None) -> str:
        lines = [f"{self.model}: {self.samples} samples; ORT vs interpreter "
                 f"{'bit-exact' if self.bit_exact else 'NOT bit-exact'}"]
        for key, acc in self.accuracy.items():
            lines.append(f"  top-1 accuracy {key}: {acc:.2%}")
        width = max([len(t.name) for c in self.comparisons for t in c.tensors] + [6])
        width = min(width, 48)
        for c in self.comparisons:
            lines.append("")
            lines.append(f"{c.reference} vs {c.other}" + "".join(
                f"; top-1 agreement {k}: {v:.2%}" for k, v in c.top1_agreement.items()))
            lines.append(f"  {'tensor':<{width}} {'dtype':<8} {'exact %':>8} {'max diff':>10} {'unit':<12} "
                         f"{'cosine':>9} {'SNR dB':>7}")
            rows = c.tensors if max_rows is None else c.tensors[:max_rows]
            for t in rows:
                name = t.name if len(t.name) <= width else "…" + t.name[-(width - 1):]
                if t.shape_mismatch:
                    lines.append(f"  {name:<{width}} {t.dtype:<8} {t.shape_mismatch}")
                    continue
                lines.append(f"  {name:<{width}} {t.dtype:<8} {100 * t.exact_rate:8.2f} {t.max_diff:10.4g} "
                             f"{t.unit_name:<12} {t.cosine:9.6f} {t.snr_db:7.1f}")
            if len(rows) < len(c.tensors):
                lines.append(f"  … {len(c.tensors) - len(rows)} more")
        return "\n".join(lines)


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
    model = _typed(model)
    if isinstance(data, (str, os.PathLike)):
        data = load_data(data, model)
    plan = check_data(data, model)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    inputs = plan.names
    outputs = [o.name for o in model.graph.output]
    names = intermediate_names(model) if per_layer else outputs
    names = list(dict.fromkeys(outputs + [n for n in names if n not in inputs]))

    other = other_label = None
    other_names: list[str] = []
    if against is not None:
        other, other_label = _as_model(against)
        other = _typed(other)
        available = set(intermediate_names(other)) | {o.name for o in other.graph.output}
        other_names = [n for n in names if n in available]

    ort_model = Runner(model, names)
    interp_plan = compile_model(model)  # decode weights and order nodes once, not per batch
    ort_other = Runner(other, other_names) if other is not None and other_names else None
    grids = tensor_grids(model)
    interp_stats: dict[str, TensorStats] = {}
    against_stats: dict[str, TensorStats] = {}
    agree = {"interp": {}, "against": {}}
    correct: dict[str, list[int]] = {}
    samples = 0
    for batch, count in plan.batches(batch_size, limit, with_labels=True):
        feeds = {k: batch[k] for k in inputs}
        samples += count
        ref = ort_model.run(feeds, names)
        mine = interp_plan.run(feeds, names)
        _accumulate(interp_stats, ref, mine, names, grids)
        runs = {"ort": ref, "interp": mine}
        _agreement(agree["interp"], ref, mine, outputs)
        if ort_other is not None:
            theirs = ort_other.run(feeds, other_names)
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
    comparisons = [Comparison("ort", "interp", [interp_stats[n] for n in names if n in interp_stats],
                              _rates(agree["interp"]))]
    if other is not None:
        comparisons.append(Comparison("ort", f"ort({other_label})",
                                      [against_stats[n] for n in other_names if n in against_stats],
                                      _rates(agree["against"])))
    accuracy = {k: v[0] / v[1] for k, v in correct.items() if v[1]}
    return DiffReport(label, samples, comparisons, accuracy)


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
            is_int = a.dtype.kind in "iu"
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
