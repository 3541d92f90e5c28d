"""qgraph's annotations: facts ONNX has no field for, kept as JSON in metadata_props.

Keys are namespaced `qgraph.<name>`; values are JSON whose shape `SCHEMAS` gives. One API
for ModelProto and QModel. `check_annotations` validates every qgraph key of a model (run
by `load_model`), so a corrupt or hand-edited annotation is one error naming the key, not a
failure deep inside a pass.
"""

from __future__ import annotations

import json
from typing import Any

import onnx

from qgraph.errors import ConfigError, ModelError
from qgraph.schema import check_value

PREFIX = "qgraph."
NONNEGATIVE = "nonnegative"          # tensors whose quantizer covers only [0, max]
FIX_ACTIVATIONS = "fix_activations"  # trainer keeps activation scales frozen
CALIBRATED = "calibrated"            # calibrate ran; activation scales are measured
QUANTIZERS = "quantizers"            # float tensor -> quantizer record
QUANT_ALIASES = "quant_aliases"      # output of a range-preserving op -> quantized tensor
FORWARD_FUSED_BN = "forward_fused_bn"  # fuse_conv_bn forward: conv -> {weight, folded_weight, mean, var, ...}
FROZEN = "frozen"                    # initializers training must not update
TRAINING_FORM = "training_form"      # fakequant: the QDQ pairs a training-form model replaced

SCHEMAS: dict[str, Any] = {
    NONNEGATIVE: list[str],
    FIX_ACTIVATIONS: bool,
    CALIBRATED: bool,
    QUANTIZERS: dict[str, dict],
    QUANT_ALIASES: dict[str, str],
    FORWARD_FUSED_BN: dict[str, dict],
    FROZEN: list[str],
    TRAINING_FORM: dict,
}

# the fields every quantizer record has (insert_qdq writes them; calibrate, fakequant and
# the trainer read them)
QUANTIZER_FIELDS: dict[str, Any] = {
    "kind": str, "tensor": str, "bits": int, "signed": bool, "symmetric": bool, "narrow_range": bool,
    "pow2": bool, "per_channel": bool, "axis": int | None, "qmin": int, "qmax": int, "observer": str,
    "nonnegative": bool, "quantize": str, "dequantize": str, "clip": str | None,
}


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
            check_quantizer_record(tensor, record)
    return value


def check_quantizer_record(tensor: str, record: dict) -> None:
    """AnnotationError naming the tensor and the field when a record lacks a field or holds a wrong type."""
    where = f"metadata '{PREFIX}{QUANTIZERS}' record of tensor '{tensor}'"
    missing = [field for field in QUANTIZER_FIELDS if field not in record]
    if missing:
        raise AnnotationError(f"{where} lacks the field '{missing[0]}'; re-run insert_qdq on the float model")
    for field, hint in QUANTIZER_FIELDS.items():
        try:
            check_value(record[field], hint, f"{where} field '{field}'")
        except ConfigError as exc:
            raise AnnotationError(f"{exc}; re-run insert_qdq on the float model") from None
    if record["kind"] not in ("weight", "activation"):
        raise AnnotationError(f"{where} field 'kind' must be weight or activation, got {record['kind']!r}")
