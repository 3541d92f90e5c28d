"""Quantization configs and rule resolution (HAT's qconfig_dict, as YAML).

A pipeline gives defaults for weights and activations and a list of rules. Each rule has
exactly one selector — `name` (exact node name), `regex` (``re.fullmatch`` on the node
name), `op_type`, or `position` (`first`: a weighted node no other weighted node feeds,
directly or through other ops; `last`: one that feeds no other weighted node — where low-bit
recipes keep 8 bits) — and any of: `weights: {...}`, `activations: {...}` (field overrides),
`skip: true` (the node is left float: linger's disable_quant), `quantize_input` and
`quantize_output` (HAT: a head whose output the target keeps in high precision).

Resolution for a node merges, lowest priority first: global defaults, the first matching
`op_type` rule, the first matching `position` rule, the first matching `regex` rule, the first
matching `name` rule — so a field set by a name rule beats the same field set by an op-type
rule (HAT's order: module name > module name regex > object type > global, with a position
more specific than a type and less than a name).
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Annotated, Any

from qgraph.errors import ConfigError
from qgraph.idioms import name_patterns
from qgraph.quant import qrange
from qgraph.schema import Range, check_value

OBSERVERS = ("minmax", "moving_average", "percentile", "entropy", "mse")
WEIGHT_OBSERVERS = ("minmax", "mse")
SELECTORS = ("name", "regex", "op_type", "position")  # a rule has exactly one
#: lowest priority first: later levels override the fields earlier ones set
PRIORITY = ("op_type", "position", "regex", "name")
POSITIONS = ("first", "last")
RULE_KEYS = SELECTORS + ("weights", "activations", "skip", "quantize_input", "quantize_output")
NONNEGATIVE_STORAGE = ("uint8", "int8")


@dataclass(frozen=True)
class WeightSpec:
    """How a weight is quantized. Weights are stored signed (int8, zp 0 when symmetric)."""
    bits: Annotated[int, Range(2, 8)] = 8
    per_channel: bool = True
    symmetric: bool = True
    narrow_range: bool = True
    pow2: bool = False
    observer: str = "minmax"

    @property
    def signed(self) -> bool:
        return True


@dataclass(frozen=True)
class ActivationSpec:
    """How an activation is quantized. `signed: null` picks by symmetry: asymmetric → uint8,
    symmetric → int8. Non-negative tensors (ahead_relu marks) use `nonnegative_storage`:
    uint8 with zero point 0, or int8 with the negative half unused. `fixed_range: [lo, hi]`
    freezes the range (calibrate leaves it alone: HAT's fixed scales, e.g. after Sigmoid)."""
    bits: Annotated[int, Range(2, 8)] = 8
    symmetric: bool = False
    signed: bool | None = None
    narrow_range: bool = False
    pow2: bool = False
    observer: str = "minmax"
    averaging_constant: Annotated[float, Range(0.0, 1.0, lo_open=True)] = 0.01
    percentile: Annotated[float, Range(50.0, 100.0, lo_open=True)] = 99.99
    bins: Annotated[int, Range(2, 1 << 20)] = 2048
    nonnegative_storage: str = "uint8"
    fixed_range: list[float] | None = None

    def storage_signed(self, nonnegative: bool) -> bool:
        if nonnegative:
            return self.nonnegative_storage == "int8"
        return self.symmetric if self.signed is None else bool(self.signed)


@dataclass(frozen=True)
class NodeConfig:
    """The resolved config of one node."""
    weights: WeightSpec
    activations: ActivationSpec
    skip: bool = False
    quantize_input: bool = True
    quantize_output: bool = True


@dataclass
class Rule:
    index: int
    selector: str
    pattern: str
    weights: dict = field(default_factory=dict)
    activations: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)   # skip / quantize_input / quantize_output
    regex: re.Pattern | None = None
    matched: int = 0       # nodes it matches
    applied: int = 0       # nodes it configures (not shadowed by an earlier rule of its kind)

    def describe(self) -> str:
        return f"rule #{self.index + 1} ({self.selector}: {self.pattern!r})"

    def matches(self, node, positions=frozenset()) -> bool:
        if self.selector == "name":
            return node.name == self.pattern
        if self.selector == "regex":
            return self.regex.fullmatch(node.name or "") is not None
        if self.selector == "position":
            return self.pattern in positions
        return node.op == self.pattern


def _nearest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_fields(where: str, values: dict, spec_cls) -> dict:
    """Known field names, each value of its field's type and range (the dataclass is the schema)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of fields, got {values!r}")
    names = [f.name for f in fields(spec_cls)]
    hints = typing.get_type_hints(spec_cls, include_extras=True)
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where} has no field '{key}'{_nearest(str(key), names)}; valid: {', '.join(names)}")
        check_value(value, hints[key], f"{where}.{key}")
    return dict(values)


def _validate_weight_spec(spec: WeightSpec, where: str) -> WeightSpec:
    qrange(spec.bits, True, spec.narrow_range)  # ConfigError for bits outside 2..8
    for name in ("per_channel", "symmetric", "narrow_range", "pow2"):
        if not isinstance(getattr(spec, name), bool):
            raise ConfigError(f"{where}.{name} must be true or false, got {getattr(spec, name)!r}")
    if spec.observer not in WEIGHT_OBSERVERS:
        raise ConfigError(f"{where}.observer must be one of {', '.join(WEIGHT_OBSERVERS)}, got {spec.observer!r}")
    return spec


def _validate_activation_spec(spec: ActivationSpec, where: str) -> ActivationSpec:
    qrange(spec.bits, bool(spec.signed), spec.narrow_range)
    if spec.observer not in OBSERVERS:
        raise ConfigError(f"{where}.observer must be one of {', '.join(OBSERVERS)}, got {spec.observer!r}"
                          f"{_nearest(str(spec.observer), OBSERVERS)}")
    if spec.nonnegative_storage not in NONNEGATIVE_STORAGE:
        raise ConfigError(f"{where}.nonnegative_storage must be uint8 or int8, got {spec.nonnegative_storage!r}")
    if not 0.0 < float(spec.averaging_constant) <= 1.0:
        raise ConfigError(f"{where}.averaging_constant must be in (0, 1], got {spec.averaging_constant}")
    if not 50.0 < float(spec.percentile) <= 100.0:
        raise ConfigError(f"{where}.percentile must be in (50, 100], got {spec.percentile}")
    if not isinstance(spec.bins, int) or spec.bins < 2 ** spec.bits:
        raise ConfigError(f"{where}.bins must be an integer >= 2^bits ({2 ** spec.bits}), got {spec.bins!r}")
    if spec.fixed_range is not None:
        fr = spec.fixed_range
        if not (isinstance(fr, (list, tuple)) and len(fr) == 2 and float(fr[0]) <= float(fr[1])):
            raise ConfigError(f"{where}.fixed_range must be [low, high] with low <= high, got {fr!r}")
    return spec


def make_weight_spec(base: WeightSpec, overrides: dict, where: str) -> WeightSpec:
    return _validate_weight_spec(replace(base, **_check_fields(where, overrides, WeightSpec)), where)


def make_activation_spec(base: ActivationSpec, overrides: dict, where: str) -> ActivationSpec:
    return _validate_activation_spec(replace(base, **_check_fields(where, overrides, ActivationSpec)), where)


def parse_rules(rules: list) -> list[Rule]:
    """Validate the `rules` list (selectors, fields, bits) before any graph work."""
    parsed = []
    for i, raw in enumerate(rules or []):
        where = f"insert_qdq rules[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping like {{op_type: Conv, weights: {{bits: 4}}}}, got {raw!r}")
        for key in raw:
            if key not in RULE_KEYS:
                raise ConfigError(f"{where} has unknown key '{key}'{_nearest(key, RULE_KEYS)}; "
                                  f"valid: {', '.join(RULE_KEYS)}")
        selectors = [k for k in SELECTORS if k in raw]
        if len(selectors) != 1:
            raise ConfigError(f"{where} needs exactly one of {', '.join(SELECTORS)}; got {selectors or 'none'}")
        selector = selectors[0]
        pattern = raw[selector]
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}.{selector} must be a non-empty string, got {pattern!r}")
        if selector == "position" and pattern not in POSITIONS:
            raise ConfigError(f"{where}.position must be one of {', '.join(POSITIONS)}, got {pattern!r}"
                              f"{_nearest(pattern, POSITIONS)}")
        compiled = name_patterns([pattern], f"{where}.regex", strict=True)[0].regex if selector == "regex" else None
        flags = {}
        for key in ("skip", "quantize_input", "quantize_output"):
            if key in raw:
                if not isinstance(raw[key], bool):
                    raise ConfigError(f"{where}.{key} must be true or false, got {raw[key]!r}")
                flags[key] = raw[key]
        weights = _check_fields(f"{where}.weights", raw.get("weights") or {}, WeightSpec)
        activations = _check_fields(f"{where}.activations", raw.get("activations") or {}, ActivationSpec)
        rule = Rule(i, selector, pattern, weights, activations, flags, compiled)
        # validate the override values now, against the built-in defaults
        make_weight_spec(WeightSpec(), weights, f"{where}.weights")
        make_activation_spec(ActivationSpec(), activations, f"{where}.activations")
        parsed.append(rule)
    return parsed


class QConfigResolver:
    """Resolves the NodeConfig of each node from defaults and rules (memoized per node name)."""

    def __init__(self, weights: dict | None, activations: dict | None, rules: list | None):
        self.weights = make_weight_spec(WeightSpec(), weights or {}, "insert_qdq weights")
        self.activations = make_activation_spec(ActivationSpec(), activations or {}, "insert_qdq activations")
        self.rules = parse_rules(rules or [])
        self._by_level = {s: [r for r in self.rules if r.selector == s] for s in SELECTORS}

    def resolve(self, node, positions=frozenset()) -> NodeConfig:
        """The config of `node`; `positions`: its places among the weighted nodes (POSITIONS),
        which the graph decides (:func:`weighted_positions`)."""
        weights, activations, flags = {}, {}, {}
        # lowest priority first, so later updates win
        for selector in PRIORITY:
            matching = [r for r in self._by_level[selector] if r.matches(node, positions)]
            for r in matching:
                r.matched += 1
            if not matching:
                continue
            rule = matching[0]
            rule.applied += 1
            weights.update(rule.weights)
            activations.update(rule.activations)
            flags.update(rule.flags)
        where = f"node '{node.name}'"
        return NodeConfig(make_weight_spec(self.weights, weights, f"{where} weights"),
                          make_activation_spec(self.activations, activations, f"{where} activations"),
                          **flags)

    def unmatched_warnings(self) -> list[str]:
        warnings = []
        for r in self.rules:
            if r.matched == 0:
                warnings.append(f"{r.describe()} matches no node; check the name/pattern/op type")
            elif r.applied == 0:
                warnings.append(f"{r.describe()} is shadowed: an earlier {r.selector} rule matches all its nodes")
        return warnings


def spec_dict(spec) -> dict[str, Any]:
    return asdict(spec)
