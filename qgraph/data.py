"""User data files: `.npz` whose keys are the model's input names, plus `labels`.

`load_data` checks a file against the model before any work starts, so a wrong key, shape
or dtype is one clear error instead of an ORT failure mid-run.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from qgraph.errors import DataError

LABELS = "labels"


def model_inputs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, list]]:
    """Graph inputs that are not initializers: name -> (numpy dtype, dims; None where symbolic)."""
    inits = {i.name for i in model.graph.initializer}
    result = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        ttype = inp.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        result[inp.name] = (np.dtype(dtype), dims)
    return result


def load_data(path: str | os.PathLike, model: onnx.ModelProto | None = None,
              *, need_labels: bool = False) -> dict[str, np.ndarray]:
    """Read an .npz data file; with `model`, check its keys, shapes and dtypes against the inputs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc}); save arrays with numpy.savez") from None
    if model is not None:
        check_data(data, model, origin=str(path))
    if need_labels and LABELS not in data:
        raise DataError(f"{path}: no '{LABELS}' array; add integer class labels under the key '{LABELS}'")
    return data


def check_data(data: dict[str, np.ndarray], model: onnx.ModelProto, origin: str = "data") -> None:
    """Raise DataError unless `data` holds every model input with matching shape and dtype."""
    inputs = model_inputs(model)
    missing = [name for name in inputs if name not in data]
    if missing:
        raise DataError(f"{origin}: missing input {missing[0]!r}; the file has keys {sorted(data)}, "
                        f"the model needs {sorted(inputs)}")
    counts = set()
    for name, (dtype, dims) in inputs.items():
        array = data[name]
        if array.dtype != dtype:
            raise DataError(f"{origin}: key {name!r} has dtype {array.dtype}, the model needs {dtype}; "
                            f"convert with .astype(numpy.{dtype})")
        if array.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims[1:], array.shape[1:])):
            shown = ["N" if d is None else d for d in dims]
            raise DataError(f"{origin}: key {name!r} has shape {list(array.shape)}, the model needs {shown}")
        counts.add(len(array))
    if LABELS in data:
        counts.add(len(data[LABELS]))
    if len(counts) > 1:
        raise DataError(f"{origin}: arrays have different lengths {sorted(counts)}; every key needs one row per sample")


def check_finite(batch: dict[str, np.ndarray], batch_index: int, origin: str = "data") -> None:
    """Raise DataError naming the input and batch that hold NaN or Inf."""
    for name, array in batch.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise DataError(f"{origin}: input {name!r} holds NaN or Inf in batch {batch_index}; clean the data")


def sample_count(data: dict[str, np.ndarray]) -> int:
    return len(next(iter(data.values())))


def iter_batches(data: dict[str, np.ndarray], batch_size: int, names: list[str] | None = None,
                 *, shuffle: bool = False, seed: int = 0, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the arrays `names` (default: all keys), optionally shuffled by `seed`."""
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
