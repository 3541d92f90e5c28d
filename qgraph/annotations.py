"""qgraph's annotations: facts ONNX has no field for, kept as JSON in metadata_props.

Keys are namespaced `qgraph.<name>`; values are JSON whose shape `SCHEMAS` gives. One API
for ModelProto and QModel. `check_annotations` validates every qgraph key of a model (run
by `load_model`), so a corrupt or hand-edited annotation is one error naming the key, not a
failure deep inside a pass. `QuantizerRecord` is the typed form of one `qgraph.quantizers` entry.
"""

from __future__ import annotations

import difflib
import json
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Annotated, Any, Literal

import numpy as np
import onnx

from qgraph.errors import ConfigError, ModelError, PassError
from qgraph.schema import Range, check_value

PREFIX = "qgraph."
NONNEGATIVE = "nonnegative"          # tensors whose quantizer covers only [0, max]
RANGE_BOUNDS = "range_bounds"        # tensor -> [lo, hi] (null: unbounded) outside which no reader tells values apart
FIX_ACTIVATIONS = "fix_activations"  # trainer keeps activation scales frozen
CALIBRATED = "calibrated"            # calibrate ran; activation scales are measured
QUANTIZERS = "quantizers"            # float tensor -> quantizer record
QUANT_ALIASES = "quant_aliases"      # output of a range-preserving op -> quantized tensor
FORWARD_FUSED_BN = "forward_fused_bn"  # fuse_conv_bn forward: conv -> {weight, folded_weight, mean, var, ...}
FROZEN = "frozen"                    # initializers training must not update
TRAINING_FORM = "training_form"      # fakequant: the QDQ pairs a training-form model replaced
RESCALED = "rescaled"                # tensor -> {axis, factor}: it is the source model's tensor / factor

SCHEMAS: dict[str, Any] = {
    NONNEGATIVE: list[str],
    RANGE_BOUNDS: dict[str, list],
    FIX_ACTIVATIONS: bool,
    CALIBRATED: bool,
    QUANTIZERS: dict[str, dict],         # each value a QuantizerRecord, checked field by field
    QUANT_ALIASES: dict[str, str],
    FORWARD_FUSED_BN: dict[str, dict],
    FROZEN: list[str],
    TRAINING_FORM: dict,
    RESCALED: dict[str, dict],
}


@dataclass
class QuantizerRecord:
    """One quantizer that insert_qdq placed, as `qgraph.quantizers` stores it (keyed by the
    float tensor it quantizes): its grid, how calibration measures it, and the names of its
    nodes and parameters. calibrate, fakequant and the trainer read it; nothing reads it as a
    loose dict. Fields with defaults may be absent in the annotation (weights have no observer
    options); any other missing or unknown field is an error naming it."""

    kind: Literal["weight", "activation"]
    tensor: str                      # the float tensor (renamed when it was a graph output)
    node: str                        # the node whose config placed it
    bits: Annotated[int, Range(2, 16)]  # quant.GRID_BITS: 2..8, or 16 (mixed precision)
    signed: bool
    symmetric: bool
    narrow_range: bool
    pow2: bool
    per_channel: bool
    axis: int | None
    qmin: int
    qmax: int
    observer: str
    nonnegative: bool
    quantize: str = ""               # QuantizeLinear node
    dequantize: str = ""             # DequantizeLinear node
    clip: str | None = None          # the Clip before a sub-8-bit activation pair
    scale: str = ""                  # scale initializer (shared by Q and DQ)
    zero_point: str = ""
    averaging_constant: float | None = None
    percentile: float | None = None
    bins: int | None = None
    fixed_range: list[float] | None = None
    range_cap: float | None = None   # a non-negative tensor read only by Clip(0, m): max m; or range_bounds' hi
    range_floor: float | None = None  # range_bounds' lo: the readers are flat below it (HardSwish: -3)

    @property
    def reader_bounds(self) -> tuple[float, float] | None:
        """The interval of values the quantized tensor's readers tell apart (±inf where open), or
        None for all of them: [0, range_cap] for a non-negative tensor, [range_floor, range_cap] for
        one ahead_relu bounded (a HardSwish input: [-3, inf])."""
        if not self.nonnegative and self.range_floor is None and self.range_cap is None:
            return None
        lo = 0.0 if self.nonnegative else -np.inf if self.range_floor is None else self.range_floor
        return lo, np.inf if self.range_cap is None else self.range_cap

    @property
    def grid(self) -> dict[str, Any]:
        """The keywords of quant.scale_zero_point for this quantizer's grid."""
        return {"bits": self.bits, "signed": self.signed, "symmetric": self.symmetric,
                "narrow_range": self.narrow_range, "pow2": self.pow2}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, tensor: str, raw: Any) -> "QuantizerRecord":
        """A record from its annotation form; AnnotationError names the tensor and the field."""
        where = f"metadata '{PREFIX}{QUANTIZERS}' record of tensor '{tensor}'"
        if not isinstance(raw, dict):
            raise AnnotationError(f"{where} must be a mapping, got {raw!r}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise AnnotationError(f"{where} has an unknown field '{unknown[0]}'{_nearest(unknown[0], known)}; "
                                  "re-run insert_qdq on the float model")
        missing = [name for name, f in known.items() if name not in raw and f.default is MISSING]
        if missing:
            raise AnnotationError(f"{where} lacks the field '{missing[0]}'; re-run insert_qdq on the float model")
        hints = typing.get_type_hints(cls, include_extras=True)
        for name, value in raw.items():
            try:
                check_value(value, hints[name], f"{where} field '{name}'")
            except ConfigError as exc:
                raise AnnotationError(f"{exc}; re-run insert_qdq on the float model") from None
        return cls(**raw)


def read_quantizers(model) -> dict[str, QuantizerRecord]:
    """The `qgraph.quantizers` annotation as records (empty when insert_qdq never ran)."""
    raw = get_annotation(model, QUANTIZERS, {}) or {}
    return {tensor: QuantizerRecord.from_dict(tensor, record) for tensor, record in raw.items()}


def require_quantizers(model, who: str, first: str = "insert_qdq and calibrate") -> dict[str, QuantizerRecord]:
    """read_quantizers for a pass that works on a quantized model: PassError naming the pass
    `who` and what to run `first` when there is none."""
    records = read_quantizers(model)
    if not records and get_annotation(model, CALIBRATED) is not None:     # insert_qdq ran
        from qgraph.idioms import inputs_behind
        from qgraph.interp.registry import ops_in_bodies
        hidden = [n.name for n in model.to_onnx().graph.node
                  if ops_in_bodies(n).keys() & {"Conv", "ConvTranspose", "Gemm", "MatMul"}]
        if hidden:
            node = next(n for n in model.graph.nodes if n.name == hidden[0])
            reads = inputs_behind(model, node.inputs[0]) if node.op == "If" else []
            fix = (f"fix the input its condition reads (qgraph passes run ... --fix-input {reads[0]}=VALUE), so "
                   "that canonicalize folds the branch, or " if reads else "")
            raise PassError(f"{who}: insert_qdq placed no quantizer: the model's Conv/Gemm/MatMul ops are inside the "
                            f"bodies of control-flow node '{hidden[0]}', which qgraph runs but does not quantize; "
                            f"{fix}export the model without If/Loop around its layers")
        raise PassError(f"{who}: insert_qdq placed no quantizer: the model has no Conv, ConvTranspose, Gemm or "
                        "MatMul to quantize (or rules skip every one); qgraph quantizes the inputs of those "
                        "and what the integer ops between them read")
    if not records:
        raise PassError(f"{who}: the model has no qgraph quantizers; run {first} first")
    return records


def write_quantizers(model, records: dict[str, QuantizerRecord]) -> None:
    set_annotation(model, QUANTIZERS, {tensor: r.to_dict() for tensor, r in records.items()} or None)


def _nearest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class AnnotationError(ModelError):
    """A qgraph annotation that is not valid JSON or not of its schema."""


def _props(model) -> dict[str, str]:
    if isinstance(model, onnx.ModelProto):
        return {p.key: p.value for p in model.metadata_props}
    return model.metadata


def get_annotation(model, key: str, default: Any = None) -> Any:
    """Value of annotation `key` (without prefix) on a ModelProto or QModel."""
    raw = _props(model).get(PREFIX + key)
    return default if raw is None else _decode(key, raw)


def set_annotation(model, key: str, value: Any) -> None:
    """Set annotation `key` to a JSON-serialisable value (None removes it)."""
    full = PREFIX + key
    if isinstance(model, onnx.ModelProto):
        kept = [(p.key, p.value) for p in model.metadata_props if p.key != full]
        del model.metadata_props[:]
        for k, v in kept:
            model.metadata_props.add(key=k, value=v)
        if value is not None:
            model.metadata_props.add(key=full, value=json.dumps(value, sort_keys=True))
        return
    if value is None:
        model.metadata.pop(full, None)
    else:
        model.metadata[full] = json.dumps(value, sort_keys=True)


def all_annotations(model) -> dict[str, Any]:
    """Every qgraph annotation, keys without prefix."""
    return {k[len(PREFIX):]: _decode(k[len(PREFIX):], v) for k, v in _props(model).items() if k.startswith(PREFIX)}


def check_annotations(model, origin: str = "model") -> None:
    """Validate every qgraph annotation of `model`; AnnotationError naming `origin` and the key."""
    try:
        all_annotations(model)
    except AnnotationError as exc:
        raise AnnotationError(f"{origin}: {exc}") from None


def _decode(key: str, raw: str) -> Any:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise AnnotationError(f"metadata '{PREFIX}{key}' is not valid JSON ({exc}); remove it or re-run the pass "
                              "that writes it on the float model") from None
    schema = SCHEMAS.get(key)
    if schema is not None and value is not None:
        try:
            check_value(value, schema, f"metadata '{PREFIX}{key}'")
        except ConfigError as exc:
            raise AnnotationError(f"{exc}; remove it or re-run the pass that writes it") from None
    if key == QUANTIZERS and value:
        for tensor, record in value.items():
            QuantizerRecord.from_dict(tensor, record)
    return value


def record_rescaled(model, factors: dict[str, np.ndarray], axis: int) -> None:
    """Note in `qgraph.rescaled` that each tensor of `factors` now holds the model's earlier value
    divided by its factor along `axis` (an output-preserving rescaling such as smooth's): tools
    comparing it with the source float model (qgraph analyze) divide the source's tensor the same
    way (`rescale_between`). A second rescaling of a tensor multiplies into the first."""
    if not factors:
        return
    entries = dict(get_annotation(model, RESCALED) or {})
    for tensor, factor in factors.items():
        factor = np.asarray(factor, np.float64).reshape(-1)
        if tensor in entries and entries[tensor]["axis"] == axis:
            factor = factor * np.asarray(entries[tensor]["factor"], np.float64)
        entries[tensor] = {"axis": int(axis), "factor": [float(f) for f in factor]}
    set_annotation(model, RESCALED, entries)


def rescale_between(source, target, tensor: str, value: np.ndarray) -> np.ndarray:
    """`value` of `tensor` computed by model `source`, as model `target` holds that tensor: both
    models' `qgraph.rescaled` factors are relative to the float model they were prepared from, so
    the value is multiplied by the source's factor and divided by the target's (a float model
    without the annotation has factor 1)."""
    entries = [(get_annotation(m, RESCALED) or {}).get(tensor) for m in (source, target)]
    if entries[0] is None and entries[1] is None:
        return value
    ratio, axis = None, None
    for entry, power in zip(entries, (1.0, -1.0)):
        if entry is not None:
            factor = np.asarray(entry["factor"], np.float64) ** power
            ratio = factor if ratio is None else ratio * factor
            axis = entry["axis"] if axis is None else axis
    axis %= value.ndim
    shape = [1] * value.ndim
    shape[axis] = ratio.size
    return (value * ratio.reshape(shape)).astype(value.dtype)
