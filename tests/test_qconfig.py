"""Rule resolution: HAT's priority (name > regex > op_type > global), validation, warnings."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest

from qgraph.errors import ConfigError
from qgraph.qconfig import ActivationSpec, QConfigResolver, WeightSpec


def _node(name, op):
    return gs.Node(op=op, name=name)


def test_defaults():
    cfg = QConfigResolver(None, None, None).resolve(_node("conv1", "Conv"))
    assert cfg.weights == WeightSpec() and cfg.activations == ActivationSpec()
    assert not cfg.skip and cfg.quantize_input and cfg.quantize_output
    assert cfg.activations.storage_signed(False) is False          # asymmetric → uint8
    assert ActivationSpec(symmetric=True).storage_signed(False) is True
    assert ActivationSpec(nonnegative_storage="int8").storage_signed(True) is True


def test_priority_name_over_regex_over_op_type_over_global():
    rules = [
        {"op_type": "Conv", "weights": {"bits": 4, "per_channel": False}},
        {"regex": "stage1\\..*", "weights": {"bits": 5}},
        {"name": "stage1.conv1", "weights": {"bits": 6}},
    ]
    r = QConfigResolver({"bits": 7}, None, rules)
    assert r.resolve(_node("stage1.conv1", "Conv")).weights.bits == 6
    assert r.resolve(_node("stage1.conv2", "Conv")).weights.bits == 5
    assert r.resolve(_node("stage2.conv1", "Conv")).weights.bits == 4
    assert r.resolve(_node("fc", "Gemm")).weights.bits == 7
    # lower-priority fields a higher rule does not set still apply
    assert r.resolve(_node("stage1.conv1", "Conv")).weights.per_channel is False
    assert r.resolve(_node("fc", "Gemm")).weights.per_channel is True


def test_rule_order_does_not_change_priority_and_first_match_wins_within_a_level():
    rules = [
        {"name": "head", "skip": True},
        {"op_type": "Gemm", "skip": False, "quantize_output": False},
        {"regex": "he.*", "activations": {"bits": 6}},
        {"regex": "h.*", "activations": {"bits": 3}},
    ]
    r = QConfigResolver(None, None, rules)
    cfg = r.resolve(_node("head", "Gemm"))
    assert cfg.skip is True and cfg.quantize_output is False and cfg.activations.bits == 6
    assert r.unmatched_warnings() == ["rule #4 (regex: 'h.*') is shadowed: an earlier regex rule matches all its nodes"]


def test_regex_is_a_full_match():
    r = QConfigResolver(None, None, [{"regex": "conv1", "skip": True}])
    assert r.resolve(_node("conv1", "Conv")).skip
    assert not r.resolve(_node("conv10", "Conv")).skip


def test_unmatched_rule_warns_naming_it():
    r = QConfigResolver(None, None, [{"name": "no_such_node", "skip": True}])
    r.resolve(_node("conv1", "Conv"))
    (warning,) = r.unmatched_warnings()
    assert "no_such_node" in warning and "rule #1" in warning


@pytest.mark.parametrize("weights, activations, rules, match", [
    ({"bits": 9}, None, None, "bits must be an integer >= 2 and <= 8"),
    ({"bits": 1}, None, None, "bits must be an integer >= 2 and <= 8"),
    (None, {"bits": 16}, None, "bits must be an integer >= 2 and <= 8"),
    (None, None, [{"op_type": "Conv", "weights": {"bits": 12}}], "bits must be an integer >= 2 and <= 8"),
    ({"bitz": 8}, None, None, "did you mean 'bits'"),
    (None, {"observer": "kl"}, None, "observer must be one of"),
    ({"observer": "entropy"}, None, None, "observer must be one of minmax, mse"),
    (None, None, [{"op_type": "Conv", "name": "x"}], "exactly one of name, regex, op_type"),
    (None, None, [{"skip": True}], "exactly one of name, regex, op_type"),
    (None, None, [{"regex": "(", "skip": True}], "not a valid regular expression"),
    (None, None, [{"op_type": "Conv", "skp": True}], "did you mean 'skip'"),
    (None, None, [{"op_type": "Conv", "skip": "yes"}], "must be true or false"),
    (None, {"nonnegative_storage": "int16"}, None, "uint8 or int8"),
    (None, {"fixed_range": [1, 0]}, None, "fixed_range"),
])
def test_bad_config_is_a_config_error(weights, activations, rules, match):
    with pytest.raises(ConfigError, match=match):
        QConfigResolver(weights, activations, rules)


def test_position_rules_sit_between_op_type_and_regex():
    rules = [
        {"op_type": "Conv", "weights": {"bits": 4, "per_channel": False}},
        {"position": "first", "weights": {"bits": 8}},
        {"position": "last", "weights": {"bits": 7}, "quantize_output": False},
        {"regex": "stem2", "weights": {"bits": 6}},
    ]
    r = QConfigResolver(None, None, rules)
    stem = r.resolve(_node("stem", "Conv"), frozenset({"first"}))
    assert stem.weights.bits == 8 and stem.weights.per_channel is False     # position over op_type
    assert r.resolve(_node("stem2", "Conv"), frozenset({"first"})).weights.bits == 6    # regex over position
    assert r.resolve(_node("body", "Conv")).weights.bits == 4                 # no position: the op-type rule
    both = r.resolve(_node("only", "Gemm"), frozenset({"first", "last"}))     # first wins within the level
    assert both.weights.bits == 8 and both.quantize_output is True
    assert r.unmatched_warnings() == ["rule #3 (position: 'last') is shadowed: an earlier position rule matches "
                                      "all its nodes"]


def test_unknown_position_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"position must be one of first, last, got 'frist' \(did you mean 'first'"):
        QConfigResolver(None, None, [{"position": "frist", "weights": {"bits": 8}}])
