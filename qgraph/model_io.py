"""Reading, checking and writing ONNX model files.

Every stage of qgraph reads a model through `load_model` and writes through `save_model`:
the first checks the file and brings it to the working opset, the second never leaves a
half-written file behind (temp file + rename) and refuses to overwrite its input.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from onnx import version_converter

from qgraph.annotations import check_annotations
from qgraph.errors import ModelError
from qgraph.files import check_input_file, check_outputs, write_files

OPSET = 17
MS_DOMAIN = "com.microsoft"
# protobuf cannot serialise a single message over 2 GiB; bigger models keep weights outside.
PROTOBUF_LIMIT = 2**31 - 1
log = logging.getLogger("qgraph")


def load_model(path: str | os.PathLike, *, check: bool = True, convert_opset: bool = True,
               what: str = "model") -> onnx.ModelProto:
    """Load an ONNX file (external data included), check it and bring it to opset `OPSET`."""
    path = check_input_file(path, what, ModelError)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise many types from C++ for a bad file
        raise ModelError(f"{path}: not a readable ONNX {what} ({_first_line(exc)}); "
                         "check that the file is a complete .onnx export") from None
    if not model.graph.output or model.ir_version <= 0:
        raise ModelError(f"{path}: not an ONNX {what} (no graph outputs or IR version); "
                         "check that the file is an .onnx export")
    _load_external_data(model, path)
    _unlisted_initializers_ir(model, origin=str(path))
    name_negative_dims(model, origin=str(path))
    check_annotations(model, origin=str(path))
    if check:
        check_model(model, origin=str(path))
    if convert_opset:
        model = convert_to_working_opset(model, origin=str(path))
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read weights stored beside the model, naming the missing file instead of a traceback."""
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model, uses_external_data
    locations = {dict((e.key, e.value) for e in t.external_data).get("location", "")
                 for t in _get_all_tensors(model) if uses_external_data(t)}
    for location in sorted(locations):
        data = path.parent / location
        if not data.is_file():
            raise ModelError(f"{path}: its weights are stored in {location}, which is not beside it "
                             f"({data} is missing); copy the .data file next to the model")
    if locations:
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # a truncated or unreadable .data file
            raise ModelError(f"{path}: cannot read its external weights ({_first_line(exc)}); "
                             "check the .data file beside it") from None


def _unlisted_initializers_ir(model: onnx.ModelProto, origin: str) -> None:
    """An IR 3 file must list every initializer among its graph inputs; one that does not (ONNX
    Runtime's quantizer writes such files from Caffe2-era models) is what IR 4 allows: read it
    as the IR version of its opsets, saying so."""
    if model.ir_version >= 4:
        return
    listed = {i.name for i in model.graph.input}
    unlisted = [t.name for t in model.graph.initializer if t.name not in listed]
    if unlisted:
        model.ir_version = max(4, onnx.helper.find_min_ir_version_for(list(model.opset_import), True))
        log.warning("%s: IR 3 with %d initializer(s) not among the graph inputs (e.g. %s): read as IR %d",
                    origin, len(unlisted), unlisted[0], model.ir_version)


def name_negative_dims(model: onnx.ModelProto, origin: str = "model") -> None:
    """Give every negative dimension of the graph's inputs, outputs and value infos a symbolic name.

    Paddle2ONNX and older exporters write a dynamic axis as dim_value -1, which ONNX does not
    define (a dim is a value >= 0 or a name); ORT reads it as dynamic, and so does qgraph from here
    on: `<tensor>_dim<axis>`, one name per tensor axis (no equalities are implied)."""
    renamed = []
    for info in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for axis, dim in enumerate(info.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param = f"{info.name}_dim{axis}"
                renamed.append(f"{info.name}[{axis}]")
    if renamed:
        log.warning("%s: %d dimension(s) declared as -1 (e.g. %s) read as dynamic", origin, len(renamed),
                    ", ".join(renamed[:3]))


def check_model(model: onnx.ModelProto, origin: str = "model") -> None:
    """Run the ONNX checker and strict shape inference; raise ModelError with the first problem."""
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"{origin}: fails the ONNX checker: {_first_line(exc)}") from None


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("model imports no ai.onnx opset; re-export it with a standard opset")


def convert_to_working_opset(model: onnx.ModelProto, origin: str = "model") -> onnx.ModelProto:
    """Bring `model` to qgraph's working form, saying so: float16/bfloat16 tensors as float32
    (:func:`float16_as_float32`), the ai.onnx opset converted to OPSET with onnx's converter."""
    model = float16_as_float32(model, origin)
    version = default_opset(model)
    if version == OPSET:
        return model
    if version > OPSET:      # onnx's converter lacks down adapters (Split 18, Constant 19, ...)
        from qgraph.opset_downgrade import downgrade   # it uses qgraph.graph, which imports this module
        converted = downgrade(model, origin)
        log.warning("%s: converted opset %d to %d", origin, version, OPSET)
        return converted
    if version < 7:
        model = _per_channel_prelu_slopes(model)
    try:
        converted = version_converter.convert_version(model, OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        raise ModelError(f"{origin}: cannot convert opset {version} to {OPSET}: {_first_line(exc)}; "
                         f"re-export the model at opset {OPSET}") from None
    log.warning("%s: converted opset %d to %d", origin, version, OPSET)
    return converted


_HALF_TYPES = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def float16_as_float32(model: onnx.ModelProto, origin: str = "model") -> onnx.ModelProto:
    """`model` with every float16/bfloat16 tensor float32: initializers and Constant values
    (exactly: both widen without rounding; ConstantOfShape's value too), graph inputs, outputs and
    value infos, and Cast targets. qgraph's passes, quantizers and lowerings work on float32 (so does an
    int8 deployment's float boundary); the quantized model then takes and returns float32, and
    float16 data files are widened as they are read. The model itself when it has none."""
    from onnx import numpy_helper

    def half(tensor: onnx.TensorProto) -> bool:
        return tensor.data_type in _HALF_TYPES

    def widen(tensor: onnx.TensorProto) -> None:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype("float32"), tensor.name))

    graph = model.graph
    infos = [*graph.input, *graph.output, *graph.value_info]
    found = [t.name for t in graph.initializer if half(t)] + [i.name for i in infos
                                                               if i.type.tensor_type.elem_type in _HALF_TYPES]
    casts = [a for n in graph.node if n.op_type == "Cast" for a in n.attribute
             if a.name == "to" and a.i in _HALF_TYPES]
    values = [a.t for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR and half(a.t)]
    if not (found or casts or values):
        return model
    if any(n.op_type in ("Loop", "If", "Scan") for n in graph.node):
        raise ModelError(f"{origin}: a float16 model with subgraphs (Loop/If/Scan); export it in float32")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for tensor in graph.initializer:
        if half(tensor):
            widen(tensor)
    for info in (*graph.input, *graph.output, *graph.value_info):
        if info.type.tensor_type.elem_type in _HALF_TYPES:
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and node.op_type == "Cast" and attr.i in _HALF_TYPES:
                attr.i = onnx.TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and half(attr.t):
                widen(attr.t)
    inputs = [i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    log.warning("%s: float16 tensors read as float32 (%d; inputs %s): the quantized model takes and returns "
                "float32", origin, len(found) + len(casts) + len(values), ", ".join(inputs[:3]) or "none")
    return model


def _per_channel_prelu_slopes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Before opset 7, a PRelu's 1-D slope of C values applied along the channel axis (PyTorch
    0.3's exports); from opset 7 on it broadcasts from the right, and onnx's converter leaves it
    as it is (a wrong, usually unbroadcastable model). Reshape such slopes to (C, 1, ...)."""
    from onnx import numpy_helper
    ranks = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for info in (*inferred.graph.input, *inferred.graph.value_info):
            if info.type.tensor_type.HasField("shape"):
                ranks[info.name] = len(info.type.tensor_type.shape.dim)
    except Exception:  # shape inference of a legacy graph: without ranks nothing is reshaped
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "PRelu" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        slope = numpy_helper.to_array(inits[node.input[1]])
        rank = ranks.get(node.input[0], 0)
        if slope.ndim == 1 and slope.size > 1 and rank >= 3:
            shaped = slope.reshape((-1,) + (1,) * (rank - 2))
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(shaped, node.input[1]))
            for info in model.graph.input:                  # IR 3 lists initializers as inputs too
                if info.name == node.input[1]:
                    info.CopyFrom(onnx.helper.make_tensor_value_info(info.name, inits[node.input[1]].data_type,
                                                                     shaped.shape))
    return model


def fix_inputs(model: onnx.ModelProto, values: dict[str, str], origin: str = "model") -> onnx.ModelProto:
    """`model` with each input named in `values` ({name: number as text}) made a constant of that
    value (filled to the input's static shape): an exporter's branch on it (Silero VAD's
    ``If(sr == 16000)``) then folds, and the model serves that one value. ModelError for an
    unknown input, a dynamic shape, or a value its type cannot hold."""
    import numpy as np
    from onnx import numpy_helper

    from qgraph.data import model_inputs
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inputs = model_inputs(model)
    for name, text in values.items():
        if name not in inputs:
            raise ModelError(f"{origin}: --fix-input {name}: the model has no input {name!r}; its inputs are "
                             f"{sorted(inputs)}")
        dtype, dims = inputs[name]
        if None in dims:
            raise ModelError(f"{origin}: --fix-input {name}: the input's shape {dims} is not static; only inputs "
                             "of a fixed shape can be fixed to one value")
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise ModelError(f"{origin}: --fix-input {name}={text}: not a number") from None
        if dtype.kind in "iu" and not (number.is_integer() and np.iinfo(dtype).min <= number <= np.iinfo(dtype).max) \
                or dtype.kind == "b" and number not in (0, 1) or dtype.kind not in "iubf":
            raise ModelError(f"{origin}: --fix-input {name}={text}: input {name!r} is {dtype}, which cannot hold {text}")
        value = np.full(dims, int(number) if dtype.kind in "iub" else number, dtype)
        model.graph.input.remove(next(i for i in model.graph.input if i.name == name))
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               reads: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Write `model` to `path` atomically, after checking that `path` is none of `reads`
    (option label -> input path). Models too big for one protobuf keep their weights in
    `<name>.data` beside the file."""
    path = check_outputs({"-o": path}, reads or {})["-o"]
    if model.ByteSize() < PROTOBUF_LIMIT:
        write_files({path: model_bytes(model)})
        return path
    _save_with_external_data(model, path)
    return path


def model_bytes(model: onnx.ModelProto) -> bytes:
    """The serialised model (for `qgraph.files.write_files`); ModelError above protobuf's 2 GiB."""
    if model.ByteSize() >= PROTOBUF_LIMIT:
        raise ModelError("the model is over 2 GiB, too big for one protobuf message; save it with save_model, "
                         "which keeps its weights in a .data file beside it")
    return model.SerializeToString()


def _save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    parent = path.parent
    try:
        with tempfile.TemporaryDirectory(dir=parent, prefix=f".{path.name}.", suffix=".qgraph-tmp") as tmp:
            tmp_model = Path(tmp) / path.name
            onnx.save_model(model, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=path.name + ".data")
            os.replace(Path(tmp) / (path.name + ".data"), parent / (path.name + ".data"))
            os.replace(tmp_model, path)
    except OSError as exc:
        raise ModelError(f"{path}: cannot write ({exc.strerror or exc}); choose another -o path") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
