"""Annotations: every qgraph.* key has a schema; quantizer records are typed and strict."""

from __future__ import annotations

import json

import onnx
import pytest

from conftest import small_data
from qgraph.annotations import (QUANTIZERS, AnnotationError, QuantizerRecord, check_annotations, read_quantizers,
                                set_annotation)
from qgraph.api import apply_pipeline


@pytest.fixture(scope="module")
def ptq(small_cnn_module):
    return apply_pipeline(small_cnn_module, "ptq", small_data(16))


@pytest.fixture(scope="module")
def small_cnn_module():
    from conftest import make_small_cnn
    return make_small_cnn()


def _with_records(model: onnx.ModelProto, edit) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    raw = {k: r.to_dict() for k, r in read_quantizers(copy).items()}
    edit(raw)
    set_annotation(copy, QUANTIZERS, raw)
    return copy


def test_records_round_trip_through_the_annotation(ptq):
    records = read_quantizers(ptq)
    assert records and all(isinstance(r, QuantizerRecord) for r in records.values())
    weights = [r for r in records.values() if r.kind == "weight"]
    assert weights and all(r.per_channel and r.grid["signed"] for r in weights)
    again = {t: QuantizerRecord.from_dict(t, r.to_dict()) for t, r in records.items()}
    assert again == records


@pytest.mark.parametrize("edit, message", [
    (lambda raw: next(iter(raw.values())).update(scael="x"), "unknown field 'scael' \\(did you mean 'scale'\\?\\)"),
    (lambda raw: next(iter(raw.values())).pop("qmin"), "lacks the field 'qmin'"),
    (lambda raw: next(iter(raw.values())).update(bits="8"), "field 'bits' must be an integer >= 2 and <= 16"),
    (lambda raw: next(iter(raw.values())).update(kind="bias"), "field 'kind' must be one of 'weight', 'activation'"),
])
def test_a_misspelled_missing_or_mistyped_field_is_refused_by_name(ptq, edit, message):
    bad = _with_records(ptq, edit)
    with pytest.raises(AnnotationError, match=message):
        read_quantizers(bad)
    with pytest.raises(AnnotationError, match="m.onnx: .*" + message):
        check_annotations(bad, "m.onnx")


def test_every_known_key_is_checked_against_its_schema(ptq):
    copy = onnx.ModelProto()
    copy.CopyFrom(ptq)
    copy.metadata_props.add(key="qgraph.nonnegative", value=json.dumps({"not": "a list"}))
    with pytest.raises(AnnotationError, match="'qgraph.nonnegative' must be a list"):
        check_annotations(copy)
