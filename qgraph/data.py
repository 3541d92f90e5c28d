"""User data files: `.npz` whose keys are the model's input names, plus `labels`.

`load_data` checks a file against the model before any work starts, so a wrong key, shape,
dtype, a non-finite value or an empty file is one clear error instead of an ORT failure
mid-run. `FeedPlan` says how each array feeds its input, from the model's own shapes:

- ``batched``: the input's first dimension is symbolic; the array's rows are samples, fed in
  batches of any size;
- ``fixed``: the first dimension is fixed at B (exporters often write 1); the array's rows
  are samples, fed B at a time;
- ``stacked``: the array has one more dimension than the input; each entry along the first
  axis is one whole model input (one sample per run, e.g. for scalar inputs);
- ``whole``: the array has exactly the input's (static) shape and no sample axis; the same
  value feeds every run (e.g. a weight given as an input). An array of exactly a fully static
  input's shape could also be one fixed batch: it is fed whole when reading it as a batch would
  disagree with the other inputs' sample counts (ONNX's node tests: a matrix, a weight and
  scalar scales), and so is an empty input (first dimension 0).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx

from qgraph.errors import DataError
from qgraph.files import check_input_file

LABELS = "labels"


def model_inputs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, list]]:
    """Graph inputs that are not initializers: name -> (numpy dtype, dims; None where symbolic)."""
    inits = {i.name for i in model.graph.initializer}
    result = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        ttype = inp.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"model input {inp.name!r} has element type {ttype.elem_type}, "
                            "which has no NumPy dtype; qgraph feeds only tensor inputs") from None
        # a negative dim_value is an exporter's "dynamic" (Paddle2ONNX writes -1)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in ttype.shape.dim]
        result[inp.name] = (dtype, dims)
    return result


def load_data(path: str | os.PathLike, model: onnx.ModelProto | None = None,
              *, need_labels: bool = False) -> dict[str, np.ndarray]:
    """Read an .npz data file; with `model`, check its keys, shapes, dtypes and values against
    the inputs (see `FeedPlan`)."""
    path = check_input_file(path, "data", DataError)
    data = _read_npz(path)
    if model is not None:
        check_data(data, model, origin=str(path))
    if need_labels and LABELS not in data:
        raise DataError(f"{path}: no '{LABELS}' array; add integer class labels under the key '{LABELS}'")
    return data


_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def _read_npz(path) -> dict[str, np.ndarray]:
    with open(path, "rb") as handle:
        head = handle.read(6)
    if not head:
        raise DataError(f"{path}: the data file is empty; save arrays with numpy.savez")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_NPY_MAGIC)):
        raise DataError(f"{path}: not an .npz file (neither a zip archive of .npy arrays nor an .npy array); "
                        "save arrays with numpy.savez(path, <input name>=array, labels=...)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_first_line(exc)}); save arrays with numpy.savez") from None
    if isinstance(loaded, np.ndarray):
        raise DataError(f"{path}: holds one bare .npy array, not an .npz archive of named arrays; "
                        "save with numpy.savez(path, <input name>=array, labels=...)")
    try:
        with loaded as npz:
            data = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise DataError(f"{path}: an array in it is unreadable ({_first_line(exc)}); "
                        "save arrays with numpy.savez (object arrays are refused: they need pickle)") from None
    if not data:
        raise DataError(f"{path}: holds no arrays; save the inputs with numpy.savez(path, <input name>=array)")
    return data


def check_data(data: dict[str, np.ndarray], model: onnx.ModelProto, origin: str = "data") -> "FeedPlan":
    """Raise DataError unless `data` can feed every model input; returns how (a FeedPlan)."""
    return FeedPlan.for_model(data, model, origin)


@dataclass(frozen=True)
class InputFeed:
    """How one array feeds one model input (see the module docstring)."""
    name: str
    mode: str               # batched | fixed | stacked | whole
    samples: int | None     # rows (None for whole)
    batch: int | None       # the fixed batch of a `fixed` input


@dataclass(frozen=True)
class FeedPlan:
    """The model's inputs, each with its array and feeding mode, and the sample count."""
    data: dict
    feeds: tuple[InputFeed, ...]
    samples: int
    origin: str

    @classmethod
    def for_model(cls, data: dict, model: onnx.ModelProto, origin: str = "data") -> "FeedPlan":
        inputs = model_inputs(model)
        if not inputs:
            raise DataError(f"{origin}: the model has no inputs to feed; qgraph runs models on input data")
        missing = [name for name in inputs if name not in data]
        if missing:
            raise DataError(f"{origin}: missing input {missing[0]!r}; the file has keys {sorted(data)}, "
                            f"the model needs {sorted(inputs)}")
        data = {**data, **{name: np.asarray(data[name], np.float32) for name, (dtype, _) in inputs.items()
                           if dtype == np.float32 and np.asarray(data[name]).dtype == np.float16}}
        # ^ float16 data for a float32 input (a float16 model qgraph read as float32): exact
        feeds = tuple(_input_feed(name, np.asarray(data[name]), dtype, dims, origin)
                      for name, (dtype, dims) in inputs.items())
        if len({f.samples for f in feeds if f.samples is not None}) > 1:
            feeds = _whole_where_ambiguous(feeds, data, inputs)
        counts = {f.samples for f in feeds if f.samples is not None}
        if LABELS in data and any(f.mode != "whole" for f in feeds):
            labels = np.asarray(data[LABELS])
            if labels.ndim == 0:
                raise DataError(f"{origin}: {LABELS!r} is a scalar; give one label per sample")
            counts.add(len(labels))
        if len(counts) > 1:
            raise DataError(f"{origin}: arrays have different numbers of samples {sorted(counts)}; "
                            "every key needs one row per sample" + _batch_elsewhere_hint(inputs))
        samples = counts.pop() if counts else 1
        if samples == 0:
            raise DataError(f"{origin}: no samples (the arrays have 0 rows); give at least one sample")
        for name in inputs:
            _check_finite_array(name, data[name], origin)
        return cls({k: data[k] for k in [*inputs, *([LABELS] if LABELS in data else [])]}, feeds, samples, origin)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.feeds]

    def run_size(self, batch_size: int) -> int:
        """Samples per run: `batch_size`, the model's fixed batch, or 1 for stacked inputs."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        fixed = {f.batch for f in self.feeds if f.mode == "fixed"}
        if len(fixed) > 1:
            raise DataError(f"{self.origin}: the model's inputs have different fixed batch sizes {sorted(fixed)}")
        if fixed:
            return fixed.pop()
        if any(f.mode == "stacked" for f in self.feeds):
            return 1
        return batch_size

    def batches(self, batch_size: int, limit: int | None = None, *, with_labels: bool = False
                ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """(feeds, samples in them) per model run over the first `limit` samples."""
        size = self.run_size(batch_size)
        count = self.samples if limit is None else min(self.samples, limit)
        if any(f.mode == "fixed" for f in self.feeds):
            count -= count % size      # a fixed batch cannot run a partial batch
        for start in range(0, count, size):
            stop = min(start + size, count)
            feeds = {}
            for f in self.feeds:
                array = self.data[f.name]
                if f.mode == "whole":
                    feeds[f.name] = array
                elif f.mode == "stacked":
                    feeds[f.name] = array[start]
                else:
                    feeds[f.name] = array[start:stop]
            if with_labels and LABELS in self.data and any(f.mode != "whole" for f in self.feeds):
                feeds[LABELS] = self.data[LABELS][start:stop]
            yield feeds, stop - start

    def dropped(self, batch_size: int, limit: int | None = None) -> int:
        """Samples left out because a fixed batch cannot run a partial batch."""
        size = self.run_size(batch_size)
        count = self.samples if limit is None else min(self.samples, limit)
        return count % size if any(f.mode == "fixed" for f in self.feeds) else 0


def _input_feed(name: str, array: np.ndarray, dtype: np.dtype, dims: list, origin: str) -> InputFeed:
    shown = ["N" if d is None else d for d in dims]
    if array.dtype != dtype:
        raise DataError(f"{origin}: key {name!r} has dtype {array.dtype}, the model needs {dtype}; "
                        f"convert with .astype(numpy.{dtype})")

    def fits(shape) -> bool:
        return len(shape) == len(dims) and all(d is None or d == s for d, s in zip(dims, shape))

    if array.ndim == len(dims) and dims and dims[0] is None:
        if fits((None, *array.shape[1:])):
            return InputFeed(name, "batched", array.shape[0], None)
    elif array.ndim == len(dims) and dims and dims[0] == 0 and fits(array.shape):
        return InputFeed(name, "whole", None, None)   # an empty input (no rows to batch)
    elif array.ndim == len(dims) and dims and dims[0] is not None and fits((dims[0], *array.shape[1:])):
        batch = dims[0]
        if batch > 0 and array.shape[0] % batch == 0:
            return InputFeed(name, "fixed", array.shape[0] // batch * batch, batch)
        raise DataError(f"{origin}: key {name!r} has {array.shape[0]} rows, but the model's batch is fixed at "
                        f"{batch}; give a multiple of {batch} rows")
    elif array.ndim == len(dims) and fits(array.shape):
        return InputFeed(name, "whole", None, None)
    if array.ndim == len(dims) + 1 and fits(array.shape[1:]):
        return InputFeed(name, "stacked", array.shape[0], None)
    if array.ndim == 0:
        raise DataError(f"{origin}: key {name!r} is a scalar, the model needs shape {shown}")
    raise DataError(f"{origin}: key {name!r} has shape {list(array.shape)}, the model needs {shown}")


def batch_elsewhere(inputs: dict) -> tuple[str, list, list] | None:
    """The first input (of model_inputs) whose first dimension is fixed and a later one symbolic
    (a recurrent state [layers, batch, hidden]): (its name, its shape with N for the symbolic
    dimensions, one sample's shape with 1 there), or None."""
    for name, (_, dims) in inputs.items():
        if dims and dims[0] is not None and None in dims[1:]:
            return name, ["N" if d is None else d for d in dims], [1 if d is None else d for d in dims]
    return None


def _batch_elsewhere_hint(inputs: dict) -> str:
    """How to give such an input (batch_elsewhere) one sample at a time."""
    found = batch_elsewhere(inputs)
    if found is None:
        return ""
    name, shown, one = found
    return (f" (input {name!r} has shape {shown}, its sample axis is not the first: give it as one whole "
            f"input per sample stacked on a new first axis, shape [S, {', '.join(map(str, one))}])")


def _whole_where_ambiguous(feeds: tuple[InputFeed, ...], data: dict, inputs: dict) -> tuple[InputFeed, ...]:
    """An array of exactly a fully static input's shape reads either as one fixed batch of
    samples or as the whole input (a weight or a scale given as an input, as ONNX's node tests
    do). When the sample counts disagree, such arrays are fed whole."""
    def exactly_one_batch(f: InputFeed) -> bool:
        dims = inputs[f.name][1]
        return f.mode == "fixed" and None not in dims and list(np.shape(data[f.name])) == dims

    return tuple(InputFeed(f.name, "whole", None, None) if exactly_one_batch(f) else f for f in feeds)


def _check_finite_array(name: str, array: np.ndarray, origin: str) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(np.asarray(array)))[0]
        what = "NaN" if np.isnan(array[tuple(bad)]) else "Inf"
        where = f" at sample {int(bad[0])}" if len(bad) else ""
        raise DataError(f"{origin}: input {name!r} holds {what}{where}; clean the data")


def check_finite(batch: dict[str, np.ndarray], batch_index: int, origin: str = "data") -> None:
    """Raise DataError naming the input and batch that hold NaN or Inf."""
    for name, array in batch.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise DataError(f"{origin}: input {name!r} holds NaN or Inf in batch {batch_index}; clean the data")


def data_fingerprint(data: dict[str, np.ndarray] | None) -> str | None:
    """A digest of keys, dtypes, shapes and values (what training results depend on)."""
    if data is None:
        return None
    digest = hashlib.sha256()
    for key in sorted(data):
        array = np.ascontiguousarray(data[key])
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.view(np.uint8).reshape(-1) if array.size else b"")
    return digest.hexdigest()[:16]


def sample_count(data: dict[str, np.ndarray]) -> int:
    return len(next(iter(data.values())))


def iter_batches(data: dict[str, np.ndarray], batch_size: int, names: list[str] | None = None,
                 *, shuffle: bool = False, seed: int = 0, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the arrays `names` (default: all keys; all with samples along the first axis),
    optionally shuffled by `seed`."""
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    names = list(names) if names is not None else list(data)
    count = sample_count({k: data[k] for k in names})
    if limit is not None:
        count = min(count, limit)
    order = np.random.default_rng(seed).permutation(count) if shuffle else np.arange(count)
    for start in range(0, count, batch_size):
        index = order[start:start + batch_size]
        yield {k: data[k][index] for k in names}


def random_inputs(model: onnx.ModelProto, batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs in [0, 1) for models run without data (symbolic dims become `batch`)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dtype, dims) in model_inputs(model).items():
        shape = [batch if (d is None or d == 0) and i == 0 else (d or 1) for i, d in enumerate(dims)]
        feeds[name] = rng.random(shape).astype(dtype) if np.issubdtype(dtype, np.floating) \
            else rng.integers(0, 2, shape).astype(dtype)
    return feeds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
