"""Running a model in ONNX Runtime (CPU), with any intermediate tensor as an extra output."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from qgraph.errors import ModelError

_QUIET = 4  # ORT severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal: qgraph reports errors itself
# graph optimizers log through the default logger (e.g. "UnsqueezeElimination cannot remove node")
ort.set_default_logger_severity(3)


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs the tensors `names` (types inferred)."""
    existing = {o.name for o in model.graph.output}
    extra = [n for n in dict.fromkeys(names) if n not in existing]
    if not extra:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {v.name: v for v in copy.graph.value_info}
    for name in extra:
        info = onnx.ValueInfoProto()
        if name in known:
            info.CopyFrom(known[name])
        else:
            info.name = name
        copy.graph.output.append(info)
    return copy


class Runner:
    """An ORT CPU session over `model` that returns the graph outputs plus `extra_outputs`
    (`profile_prefix`: with ORT's profiler on, its JSON written by `session.end_profiling()`)."""

    def __init__(self, model, extra_outputs: Iterable[str] = (), *, optimize: bool = True,
                 threads: int = 0, profile_prefix: str | None = None):
        proto = model.to_onnx() if hasattr(model, "to_onnx") else model
        proto = with_outputs(proto, extra_outputs)
        opts = ort.SessionOptions()
        opts.log_severity_level = _QUIET
        opts.intra_op_num_threads = threads
        if profile_prefix:  # ORT's profiler: session.end_profiling() writes <prefix>_<time>.json
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types from C++
            raise ModelError(f"ONNX Runtime cannot load the model: {ort_message(exc)}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        try:
            values = self.session.run(names, {k: feeds[k] for k in self.input_names})
        except Exception as exc:  # ORT raises its own exception types from C++
            shapes = ", ".join(f"{k} {list(np.shape(feeds[k]))}" for k in self.input_names)
            raise ModelError(f"ONNX Runtime failed running the model on inputs {shapes}: "
                             f"{ort_message(exc)}") from None
        return dict(zip(names, values))

    def run_batches(self, data: dict[str, np.ndarray], batch_size: int = 64,
                    outputs: Iterable[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Stream results batch by batch (memory does not grow with the data size)."""
        count = len(next(iter(data[k] for k in self.input_names)))
        for start in range(0, count, batch_size):
            batch = {k: data[k][start:start + batch_size] for k in self.input_names}
            yield self.run(batch, outputs)


def ort_message(exc: BaseException) -> str:
    """ORT's message without its source-file prefix, on one line."""
    text = " ".join(str(exc).split())
    for marker in ("Status Message: ", "] : "):
        if marker in text:
            text = text.split(marker)[-1]
    return text[:300] or type(exc).__name__


def run_model(model, feeds: dict[str, np.ndarray], outputs: Iterable[str] | None = None,
              *, optimize: bool = True) -> dict[str, np.ndarray]:
    """Run `model` once on `feeds`; `outputs` may name intermediate tensors."""
    outputs = list(outputs) if outputs is not None else None
    runner = Runner(model, outputs or (), optimize=optimize)
    return runner.run(feeds, outputs)


def run_concatenated(model, data: dict[str, np.ndarray], batch_size: int = 256,
                     outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Run over all of `data` in batches and concatenate the results."""
    outputs = list(outputs) if outputs is not None else None
    runner = Runner(model, outputs or ())
    parts: dict[str, list] = {}
    for result in runner.run_batches(data, batch_size, outputs):
        for k, v in result.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def top1_accuracy(model, data: dict[str, np.ndarray], batch_size: int = 250, output: str | None = None) -> float:
    """Fraction of samples whose arg-max over `output` (default: the first output) equals `labels`."""
    runner = Runner(model)
    output = output or runner.output_names[0]
    hits = sum(int((result[output].reshape(len(result[output]), -1).argmax(1) == labels).sum())
               for result, labels in zip(runner.run_batches(data, batch_size, [output]),
                                         _chunks(data["labels"], batch_size)))
    return hits / len(data["labels"])


def _chunks(array: np.ndarray, size: int):
    return (array[start:start + size] for start in range(0, len(array), size))
