"""qgraph's annotations: facts ONNX has no field for, kept as JSON in metadata_props.

Keys are namespaced `qgraph.<name>`; values are any JSON. One API for ModelProto and QModel.
"""

from __future__ import annotations

import json
from typing import Any

import onnx

PREFIX = "qgraph."
NONNEGATIVE = "nonnegative"          # tensors whose quantizer covers only [0, max]
FIX_ACTIVATIONS = "fix_activations"  # trainer keeps activation scales frozen
CALIBRATED = "calibrated"            # calibrate ran; activation scales are measured


def _props(model) -> dict[str, str]:
    if isinstance(model, onnx.ModelProto):
        return {p.key: p.value for p in model.metadata_props}
    return model.metadata


def get_annotation(model, key: str, default: Any = None) -> Any:
    """Value of annotation `key` (without prefix) on a ModelProto or QModel."""
    raw = _props(model).get(PREFIX + key)
    return default if raw is None else json.loads(raw)


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
    return {k[len(PREFIX):]: json.loads(v) for k, v in _props(model).items() if k.startswith(PREFIX)}
