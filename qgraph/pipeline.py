"""Pass registry, pipeline files and the pipeline runner.

A pass is a function `fn(model: QModel, ctx: PassContext, *, <params with defaults>) -> dict`
registered with `@register_pass(name, preserves_outputs=...)`. Its keyword-only parameters
are its schema: the YAML pipeline passes them through and unknown keys are refused with the
nearest valid name. The returned report is a dict with at least `changed` (int) and
`summary` (str); `skipped` lists {node, reason} for what the pass declined to touch.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import typing
from typing import Annotated

import numpy as np

from qgraph.data import FeedPlan, check_data, random_inputs
from qgraph.errors import ConfigError, ModelError, PassError
from qgraph.graph import QModel
from qgraph.schema import Range, check_value
from qgraph.yamlfile import parse_yaml, read_yaml_file

_PASSES: dict[str, "PassSpec"] = {}  # filled once at import of qgraph.passes.*; read-only after


@dataclass(frozen=True)
class PassSpec:
    name: str
    fn: Callable
    preserves_outputs: bool
    tolerance: float
    params: dict[str, Any]

    @property
    def doc(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n")[0]


def register_pass(name: str, *, preserves_outputs: bool, tolerance: float = 1e-4):
    """Register a pass. `tolerance` is the relative output change `--verify` accepts."""
    def decorate(fn):
        sig = inspect.signature(fn)
        params = {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
        _PASSES[name] = PassSpec(name, fn, preserves_outputs, tolerance, params)
        return fn
    return decorate


def all_passes() -> dict[str, PassSpec]:
    """Every registered pass, importing each module of qgraph.passes once."""
    import qgraph.passes as package
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"qgraph.passes.{info.name}")
    return dict(sorted(_PASSES.items()))


def get_pass(name: str) -> PassSpec:
    passes = all_passes()
    if not isinstance(name, str) or name not in passes:
        raise ConfigError(f"unknown pass {name!r}{_nearest(str(name), passes)}; valid passes: {', '.join(passes)}")
    return passes[name]


def param_hints(spec: PassSpec) -> dict[str, Any]:
    """The type hint of each parameter of a pass (its YAML schema), `Any` where none is given."""
    hints = typing.get_type_hints(spec.fn, include_extras=True)
    return {key: hints.get(key, Any) for key in spec.params}


def validate_params(spec: PassSpec, params: dict[str, Any] | None) -> dict[str, Any]:
    """Params with defaults filled in; unknown keys and values that do not fit the parameter's
    type hint (type and range) are ConfigErrors naming the pass and the parameter."""
    params = dict(params or {})
    hints = param_hints(spec)
    for key, value in params.items():
        if key not in spec.params:
            raise ConfigError(f"pass '{spec.name}' has no parameter '{key}'{_nearest(str(key), spec.params)}; "
                              f"valid: {', '.join(spec.params) or '(none)'}")
        check_value(value, hints[key], f"pass '{spec.name}' parameter '{key}'")
    return {**spec.params, **params}


def _nearest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# -- pipelines ---------------------------------------------------------------------------

@dataclass
class Pipeline:
    steps: list[tuple[str, dict[str, Any]]]
    data: str | None = None
    seed: int = 0
    source: str = "pipeline"


def parse_pipeline(text: str, source: str = "pipeline") -> Pipeline:
    """Parse pipeline YAML: a list of {pass: {params}}, or a mapping with `passes`, `data`, `seed`."""
    return pipeline_from_document(parse_yaml(text, source), source)


def pipeline_from_document(doc: Any, source: str = "pipeline") -> Pipeline:
    """Validate a parsed pipeline document: structure, pass names, every parameter, seed, data."""
    if isinstance(doc, list):
        doc = {"passes": doc}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'passes' list (or a bare list of passes)")
    unknown = set(map(str, doc)) - {"passes", "data", "seed"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{source}: unknown top-level key '{key}'{_nearest(key, ['passes', 'data', 'seed'])}; "
                          "valid: passes, data, seed")
    if "passes" not in doc:
        raise ConfigError(f"{source}: no 'passes' list; add `passes: [canonicalize, ...]`")
    if not isinstance(doc["passes"], list):
        raise ConfigError(f"{source}: 'passes' must be a list of passes, got {doc['passes']!r}")
    steps = []
    for i, item in enumerate(doc["passes"]):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{source}: pass #{i + 1} must be a pass name or {{name: {{params}}}}, got {item!r}")
        (name, params), = item.items()
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: parameters of pass {name!r} must be a mapping, got {params!r}")
        validate_params(get_pass(name), params)
        steps.append((name, params))
    seed = doc.get("seed", 0)
    check_value(seed, Annotated[int, Range(0)], f"{source}: seed")
    data = doc.get("data")
    if data is not None and not isinstance(data, str):
        raise ConfigError(f"{source}: data must be the path of an .npz file, got {data!r}")
    return Pipeline(steps, data, seed, source)


BUNDLED_PIPELINES = ("float", "ptq", "qat")


def bundled_pipeline(name: str) -> Path:
    """Path of a pipeline shipped with qgraph (models/pipelines/NAME.yaml)."""
    from importlib.resources import files
    return Path(str(files("qgraph.models") / "pipelines" / f"{name}.yaml"))


def resolve_pipeline_path(path: str | Path) -> Path:
    """The file a --pipeline argument means: a bundled name (float, ptq, qat) is the shipped
    pipeline unless a regular file of that name exists."""
    path = Path(path)
    if not path.is_file() and str(path) in BUNDLED_PIPELINES:
        return bundled_pipeline(str(path))
    return path


def load_pipeline(path: str | Path) -> Pipeline:
    """Read a pipeline file; a bare bundled name (float, ptq, qat) means the shipped pipeline."""
    path = resolve_pipeline_path(path)
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path}: no such pipeline file (or give a bundled one: {', '.join(BUNDLED_PIPELINES)})")
    pipeline = pipeline_from_document(read_yaml_file(path, "pipeline"), str(path))
    if pipeline.data is not None and not Path(pipeline.data).is_absolute():
        pipeline.data = str(path.parent / pipeline.data)
    return pipeline


# -- running -----------------------------------------------------------------------------

@dataclass
class PassContext:
    """What a pass may need besides the model: calibration data and the seed."""
    data: dict[str, np.ndarray] | None = None
    seed: int = 0
    batch_size: int = 64
    verbose: bool = False

    def require_data(self, who: str) -> None:
        """PassError naming the pass `who` when no calibration data was given."""
        if self.data is None:
            raise PassError(f"{who} needs calibration data: give --data FILE.npz or `data:` in the pipeline")

    def feed_plan(self, model) -> FeedPlan:
        """How the calibration data feeds `model` (a QModel or ModelProto); PassError when no
        data was given, DataError when it does not fit the model."""
        if self.data is None:
            raise PassError("this pass needs calibration data: give --data FILE.npz or `data:` in the pipeline")
        proto = model.to_onnx() if hasattr(model, "to_onnx") else model
        return check_data(self.data, proto, origin="calibration data")

    def batches(self, model, limit: int | None = None):
        """Calibration feeds for `model`, one dict per ORT run (see qgraph.data.FeedPlan)."""
        for feeds, _ in self.feed_plan(model).batches(self.batch_size, limit):
            yield feeds


@dataclass
class StepReport:
    name: str
    seconds: float
    report: dict[str, Any]
    verified: float | None = None  # worst relative output change, when verified

    def line(self) -> str:
        changed = self.report.get("changed", 0)
        summary = self.report.get("summary", "")
        check = "" if self.verified is None else f"  verified (max rel diff {self.verified:.1e})"
        return f"{self.name:<16} changed {changed:<4} {self.seconds:7.2f}s  {summary}{check}"

    def as_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "seconds": round(self.seconds, 4), "verified_max_rel_diff": self.verified,
                **self.report}


def run_pass(model: QModel, name: str, params: dict | None = None, ctx: PassContext | None = None) -> dict:
    """Apply one pass by name (params validated) and return its report."""
    spec = get_pass(name)
    report = spec.fn(model, ctx or PassContext(), **validate_params(spec, params))
    return report if report is not None else {"changed": 0, "summary": ""}


def run_pipeline(model: QModel, pipeline: Pipeline, ctx: PassContext, *, verify: bool = False,
                 on_step: Callable[[StepReport], None] | None = None) -> list[StepReport]:
    """Apply each step in order; with `verify`, check output-preserving passes on sample data."""
    reports = []
    for name, params in pipeline.steps:
        spec = get_pass(name)
        before = model.to_onnx() if verify and spec.preserves_outputs else None
        start = time.perf_counter()
        report = run_pass(model, name, params, ctx)
        step = StepReport(name, time.perf_counter() - start, report)
        if before is not None:
            step.verified = verify_outputs(before, model, name, spec.tolerance, ctx)
        reports.append(step)
        if on_step:
            on_step(step)
    return reports


def verify_outputs(before, after: QModel, pass_name: str, tolerance: float, ctx: PassContext) -> float:
    """Worst relative change over the graph outputs; PassError naming the tensor if > tolerance."""
    from qgraph.runner import run_model  # ORT import is slow; only verification needs it here
    after_proto = after.to_onnx()
    if ctx.data is not None:
        feeds = next(ctx.feed_plan(before).batches(32))[0]
        ref = run_model(before, feeds)
    else:
        feeds = random_inputs(before, batch=4, seed=ctx.seed)
        try:
            ref = run_model(before, feeds)
        except ModelError as exc:      # symbolic sizes read as 1 may not be a size the model runs at
            raise ModelError(f"--verify: {exc}; these are random inputs of sizes guessed from the model: give "
                             "--data with real inputs to verify on") from None
    new = run_model(after_proto, feeds)
    worst, worst_name = 0.0, None
    for key, value in ref.items():
        if key not in new:
            raise PassError(f"pass '{pass_name}' removed graph output '{key}'")
        diff = float(np.max(np.abs(new[key].astype(np.float64) - value))) if value.size else 0.0
        rel = diff / max(float(np.max(np.abs(value))) if value.size else 0.0, 1e-12)
        if rel >= worst:
            worst, worst_name = rel, key
    if worst > tolerance:
        raise PassError(f"--verify: pass '{pass_name}' changed output '{worst_name}' by relative {worst:.2e} "
                        f"(tolerance {tolerance:.0e}); run without this pass or report a bug")
    return worst
