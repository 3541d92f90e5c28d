"""QDQ form <-> training form: what ONNX Runtime's trainer can differentiate.

A QuantizeLinear->DequantizeLinear pair computes `y = (clamp(round(x/s) + z, qmin, qmax) - z) * s`.
ORT's gradient builder cannot differentiate it, so training replaces each pair by
com.microsoft FakeQuant, which computes the same `y` with a straight-through gradient:

    per-tensor, fixed scale:        y = FakeQuant(x, s, z)
    per-channel or learned scale:   y = FakeQuant(x / s, 1, z) * s      (s broadcast on the axis)

The second form lets the gradient reach `s` (LSQ: dy/ds = FQ(x/s) - x/s inside the range).
Per-channel nonzero zero points use `FakeQuant(x/s + z, 1, 0) - z`, which differs from the
pair only on exact rounding ties. Every rewritten pair is recorded in the model's metadata
(`qgraph.training_form`), so `to_qdq_form` puts the original nodes back with the trained
weights and scales. Outputs: unchanged up to float rounding (exact for per-tensor pairs).

Sub-8-bit quantizers keep int8/uint8 storage, so the pair saturates only at the storage
bounds; their true [qmin, qmax] comes from insert_qdq's `qgraph.quantizers` annotation, and
FakeQuant trains on that range. A weight that training pushed past it is clamped to
[(qmin − z)·s, (qmax − z)·s] on export (what FakeQuant computed), so the QDQ model's integer
weights stay within the grid.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qgraph import quant
from qgraph.annotations import FORWARD_FUSED_BN, TRAINING_FORM, get_annotation, read_quantizers, set_annotation
from qgraph.differentiable import make_differentiable, restore_nodes
from qgraph.errors import TrainError
from qgraph.idioms import constant_tensors, constants_as_initializers, rank_map
from qgraph.model_io import MS_DOMAIN
from qgraph.quant import quantize

_SUFFIX = "__fq"                  # marks every name this module creates
# com.microsoft: the 16-bit pairs of mixed precision (quant.qdq_domain); the saved nodes keep it
_QDQ_DOMAINS = ("", "ai.onnx", quant.MS_QDQ_DOMAIN)
_TRAINABLE_STORAGE = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
                      onnx.TensorProto.INT16)


def _storage_range(dtype: int) -> tuple[int, int]:
    """Where a Q→DQ pair of this ONNX storage type saturates."""
    return quant.storage_range(helper.tensor_dtype_to_np_dtype(dtype))


@dataclass
class TrainingFormInfo:
    """What `to_training_form` did: one record per pair, the scale parameters, and the nodes
    rewritten into ops ORT can differentiate (qgraph.differentiable) or left as they were."""

    pairs: list[dict] = field(default_factory=list)
    learned_scales: list[str] = field(default_factory=list)
    fixed_scales: list[str] = field(default_factory=list)
    ops: list[dict] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return bool(self.pairs)

    @property
    def float_weights(self) -> list[str]:
        """The trainable float copies made of stored integer weights."""
        return [r["x"] for r in self.pairs if r["int_weight"]]

    @property
    def created_constants(self) -> list[str]:
        """Initializers the training form added (ones, zero points, reshape shapes, resize taps):
        never trained."""
        return [name for r in self.pairs + self.ops for name in r["created_inits"]]


def to_training_form(model: onnx.ModelProto, learn_scales: bool = False,
                     freeze_activation_scales: bool = True) -> tuple[onnx.ModelProto, TrainingFormInfo]:
    """Replace every Q->DQ pair (and every DQ of a constant integer weight) by FakeQuant, and
    the ops ORT cannot differentiate by ones it can (qgraph.differentiable).

    `learn_scales` makes weight scales trainable, and activation scales too unless
    `freeze_activation_scales`. A model with neither comes back as an unchanged copy.
    """
    model, rewrites = make_differentiable(constants_as_initializers(model))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    info = TrainingFormInfo(ops=rewrites.records, declined=rewrites.declined)
    new_nodes: list[onnx.NodeProto] = []
    removed_inits: set[str] = set()
    handled: set[int] = set()
    ranks = rank_map(model)
    constant = constant_tensors(model)
    grids = {r.quantize: r for r in read_quantizers(model).values() if r.quantize}

    for index, node in enumerate(graph.node):
        if id(node) in handled:
            continue
        if node.op_type == "QuantizeLinear" and node.domain in _QDQ_DOMAINS:
            dqs = consumers.get(node.output[0], [])
            if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or node.output[0] in graph_outputs:
                raise TrainError(f"QuantizeLinear {node.name or node.output[0]}: its output must feed only "
                                 "DequantizeLinear nodes to be trained; export the model in QDQ form")
            handled.update(id(d) for d in dqs)
            source, weight_from_int = node.input[0], None
        elif node.op_type == "DequantizeLinear" and node.domain in _QDQ_DOMAINS:
            if node.input[0] not in inits:
                raise TrainError(f"DequantizeLinear {node.name or node.output[0]}: its input "
                                 f"{node.input[0]} comes from no QuantizeLinear; training needs Q->DQ pairs")
            dqs, source, weight_from_int = [node], None, node.input[0]
        else:
            new_nodes.append(node)
            continue
        record = _pair_record(node, dqs, inits, weight_from_int, len(info.pairs), grids.get(node.name))
        is_weight = weight_from_int is not None or source in constant
        record["weight"] = is_weight
        record["learned"] = bool(learn_scales and (is_weight or not freeze_activation_scales))
        record["rank"] = ranks.get(source or weight_from_int)
        if weight_from_int is not None:
            source = _float_weight(record, inits, graph)
            removed_inits.add(weight_from_int)
        record["x"] = source
        nodes, created_inits = _fake_quant_nodes(record)
        new_nodes.extend(nodes)
        graph.initializer.extend(created_inits)
        record["created_nodes"] = [n.name for n in nodes]
        record["created_inits"] = [t.name for t in created_inits]
        if record["zero_point"]:
            removed_inits.add(record["zero_point"])
        info.pairs.append(record)
        (info.learned_scales if record["learned"] else info.fixed_scales).append(record["scale"])

    if not info.pairs:
        if info.ops:
            set_annotation(model, TRAINING_FORM, {"pairs": [], "ops": info.ops})
        return model, info
    still_used = {i for n in new_nodes for i in n.input}
    for name in sorted(removed_inits - still_used):
        graph.initializer.remove(inits[name])
    _check_scale_sharing(info)
    del graph.node[:]
    graph.node.extend(new_nodes)
    q_outputs = {r["q_output"] for r in info.pairs if r["q_output"]}
    kept_vi = [v for v in graph.value_info if v.name not in q_outputs]
    del graph.value_info[:]
    graph.value_info.extend(kept_vi)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    info.learned_scales = sorted(set(info.learned_scales))
    info.fixed_scales = sorted(set(info.fixed_scales) - set(info.learned_scales))
    set_annotation(model, TRAINING_FORM, {"pairs": info.pairs, "ops": info.ops})
    return model, info


def training_form_info(model: onnx.ModelProto) -> TrainingFormInfo:
    """The records `to_training_form` left in `model` (empty for a float model)."""
    stored = get_annotation(model, TRAINING_FORM, {"pairs": []})
    info = TrainingFormInfo(pairs=stored["pairs"], ops=stored.get("ops", []))
    for r in info.pairs:
        (info.learned_scales if r["learned"] else info.fixed_scales).append(r["scale"])
    return info


def to_qdq_form(model: onnx.ModelProto, trained_values: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Put the recorded Q/DQ nodes back, with `trained_values` (name -> array) as initializers.

    `model` is a training-form model, or an ORT eval/inference model of one (parameters as
    graph inputs are turned back into initializers when `trained_values` has them).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    _apply_values(graph, trained_values or {})
    info = training_form_info(out)
    restore_nodes(graph, info.ops)
    if not info.pairs:
        if info.ops:
            set_annotation(out, TRAINING_FORM, None)
            _drop_unused_ms_opset(out)
        return out
    by_node = {name: r for r in info.pairs for name in r["created_nodes"]}
    created_inits = {name for r in info.pairs for name in r["created_inits"]}
    created_inits |= {r["x"] for r in info.pairs if r["int_weight"]}
    inits = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    done: set[int] = set()
    for node in graph.node:
        record = by_node.get(node.name)
        if record is None:
            nodes.append(node)
            continue
        if record["index"] in done:
            continue
        done.add(record["index"])
        if record["q_node"]:
            nodes.append(_from_b64(record["q_node"], onnx.NodeProto))
        nodes.extend(_from_b64(d, onnx.NodeProto) for d in record["dq_nodes"])
    missing = {r["index"] for r in info.pairs} - done
    if missing:
        raise TrainError(f"{len(missing)} recorded quantizer pair(s) are missing from the model; "
                         "pass the training-form model (or its eval model) to to_qdq_form")
    restored = []
    for record in info.pairs:
        for blob in record["saved_inits"]:
            tensor = _from_b64(blob, onnx.TensorProto)
            if tensor.name != record["int_weight"] and tensor.name not in inits and tensor.name not in {t.name for t in restored}:
                restored.append(tensor)
        if record["int_weight"]:
            restored.append(_requantize(record, inits))
    keep = [t for t in graph.initializer if t.name not in created_inits]
    del graph.initializer[:]
    graph.initializer.extend(keep + restored)
    del graph.node[:]
    graph.node.extend(nodes)
    clamp_narrow_weights(out, info)
    set_annotation(out, TRAINING_FORM, None)
    _drop_unused_ms_opset(out)
    return out


def _drop_unused_ms_opset(model: onnx.ModelProto) -> None:
    if not any(n.domain == MS_DOMAIN for n in model.graph.node):
        kept = [o for o in model.opset_import if o.domain != MS_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)


# --- building the training form --------------------------------------------------------

def _pair_record(q, dqs, inits, int_weight, index, grid=None) -> dict:
    """Describe one quantizer: its scale, zero point, axis, storage type and range.

    The range is the storage type's, or `grid`'s qmin/qmax (its `qgraph.quantizers` record)."""
    first = q if int_weight is None else dqs[0]
    scale = first.input[1]
    zero_point = first.input[2] if len(first.input) > 2 and first.input[2] else ""
    if scale not in inits:
        raise TrainError(f"{first.op_type} {first.name or first.output[0]}: scale {scale} is not a constant; "
                         "training needs constant scales")
    if zero_point and zero_point not in inits:
        raise TrainError(f"{first.op_type} {first.name or first.output[0]}: zero point {zero_point} is not "
                         "a constant; training needs constant zero points")
    for dq in dqs:
        if dq.input[1] != scale or (dq.input[2] if len(dq.input) > 2 else "") != zero_point:
            raise TrainError(f"DequantizeLinear {dq.name or dq.output[0]}: scale/zero point differ from its "
                             f"QuantizeLinear's ({scale}); such pairs cannot be trained")
    dtype = (inits[zero_point].data_type if zero_point
             else inits[int_weight].data_type if int_weight else onnx.TensorProto.UINT8)
    if dtype not in _TRAINABLE_STORAGE:
        raise TrainError(f"{first.op_type} {first.name or first.output[0]}: storage type "
                         f"{onnx.TensorProto.DataType.Name(dtype)} is not trainable (int8/uint8/int16/uint16 are)")
    scale_value = numpy_helper.to_array(inits[scale])
    axis = next((a.i for a in first.attribute if a.name == "axis"), 1)
    per_channel = scale_value.ndim == 1 and scale_value.size > 1
    zp_value = numpy_helper.to_array(inits[zero_point]).astype(np.float32) if zero_point else np.zeros(1, np.float32)
    qmin, qmax = quantizer_grid(first, dtype, grid)
    return {
        "index": index,
        "q_node": None if int_weight else _to_b64(q),
        "q_output": None if int_weight else q.output[0],
        "dq_nodes": [_to_b64(d) for d in dqs],
        "y": [d.output[0] for d in dqs],
        "scale": scale,
        "zero_point": zero_point,
        "axis": axis if per_channel else None,
        "channels": int(scale_value.size) if per_channel else None,
        "scale_rank": int(scale_value.ndim),
        "qmin": qmin, "qmax": qmax,
        "bits": int(grid.bits) if grid is not None else int(np.ceil(np.log2(qmax - qmin + 1))),
        "dtype": onnx.TensorProto.DataType.Name(dtype).lower(),
        "zero_points": zp_value.reshape(-1).tolist(),
        "int_weight": int_weight,
        "saved_inits": [_to_b64(inits[zero_point])] if zero_point else [],
    }


def quantizer_grid(node: onnx.NodeProto, dtype: int, grid) -> tuple[int, int]:
    """[qmin, qmax] of a pair: the annotated grid (a QuantizerRecord; bits < 8 keep 8-bit
    storage), else the storage range."""
    lo, hi = _storage_range(dtype)
    if grid is None:
        return lo, hi
    qmin, qmax = int(grid.qmin), int(grid.qmax)
    if not lo <= qmin < qmax <= hi:
        raise TrainError(f"{node.op_type} {node.name}: qgraph.quantizers gives the range [{qmin}, {qmax}], "
                         f"which does not fit its {onnx.TensorProto.DataType.Name(dtype).lower()} storage "
                         f"[{lo}, {hi}]; re-run insert_qdq")
    return qmin, qmax


def _float_weight(record, inits, graph) -> str:
    """A DQ of a stored integer weight trains on its dequantized float copy."""
    int_tensor = inits[record["int_weight"]]
    q = numpy_helper.to_array(int_tensor).astype(np.float32)
    s = numpy_helper.to_array(inits[record["scale"]]).astype(np.float32)
    z = np.asarray(record["zero_points"], np.float32)
    if record["axis"] is not None:
        shape = [1] * q.ndim
        shape[record["axis"] % q.ndim] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    name = record["int_weight"] + _SUFFIX + "_float"
    graph.initializer.append(numpy_helper.from_array(((q - z) * s).astype(np.float32), name))
    record["saved_inits"].append(_to_b64(int_tensor))
    return name


def _fake_quant_nodes(r: dict) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    p = f"{r['y'][0]}{_SUFFIX}{r['index']}"
    attrs = {"quant_min": r["qmin"], "quant_max": r["qmax"]}
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    y = r["y"][0]
    zps = np.asarray(r["zero_points"], np.float32)

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), f"{p}_{name}"))
        return f"{p}_{name}"

    if r["axis"] is None and not r["learned"]:
        s = r["scale"]
        if r["scale_rank"] != 0:
            nodes.append(helper.make_node("Reshape", [s, const("scalar", np.zeros(0, np.int64))],
                                          [f"{p}_s"], name=f"{p}_reshape"))
            s = f"{p}_s"
        nodes.append(helper.make_node("FakeQuant", [r["x"], s, const("zp", np.float32(zps[0]))],
                                      [y, f"{p}_mask"], name=f"{p}_fakequant", domain=MS_DOMAIN, **attrs))
    else:
        s = r["scale"]
        if r["axis"] is not None:
            if r["rank"] is None:
                raise TrainError(f"per-channel quantizer of {r['x']}: its rank is unknown; run shape inference "
                                 "(qgraph passes canonicalize) first")
            shape = [1] * r["rank"]
            shape[r["axis"] % r["rank"]] = -1
            nodes.append(helper.make_node("Reshape", [s, const("shape", np.array(shape, np.int64))],
                                          [f"{p}_s"], name=f"{p}_reshape"))
            s = f"{p}_s"
        nodes.append(helper.make_node("Div", [r["x"], s], [f"{p}_xs"], name=f"{p}_div"))
        fq_in, zp_in, shift = f"{p}_xs", np.float32(zps[0]), None
        if r["axis"] is not None:
            zp_in = np.float32(0)
            if np.any(zps != 0):
                shift = const("zps", zps.reshape(shape).astype(np.float32))
                nodes.append(helper.make_node("Add", [fq_in, shift], [f"{p}_xz"], name=f"{p}_addzp"))
                fq_in = f"{p}_xz"
        nodes.append(helper.make_node("FakeQuant", [fq_in, const("one", np.float32(1)), const("zp", zp_in)],
                                      [f"{p}_q", f"{p}_mask"], name=f"{p}_fakequant", domain=MS_DOMAIN, **attrs))
        q_out = f"{p}_q"
        if shift is not None:
            nodes.append(helper.make_node("Sub", [q_out, shift], [f"{p}_qz"], name=f"{p}_subzp"))
            q_out = f"{p}_qz"
        nodes.append(helper.make_node("Mul", [q_out, s], [y], name=f"{p}_mul"))
    for i, other in enumerate(r["y"][1:]):
        nodes.append(helper.make_node("Identity", [y], [other], name=f"{p}_copy{i}"))
    return nodes, inits


def _check_scale_sharing(info: TrainingFormInfo) -> None:
    learned = {r["scale"] for r in info.pairs if r["learned"]}
    for r in info.pairs:
        if not r["learned"] and r["scale"] in learned:
            raise TrainError(f"scale {r['scale']} is shared by a learned and a fixed quantizer; "
                             "give them separate scale tensors or freeze both")


# --- restoring -----------------------------------------------------------------------

def _apply_values(graph: onnx.GraphProto, values: dict[str, np.ndarray]) -> None:
    """Write trained values into initializers; parameter graph inputs become initializers."""
    inits = {t.name: t for t in graph.initializer}
    for name, value in values.items():
        array = np.asarray(value)
        if name in inits:
            old = inits[name]
            array = array.astype(numpy_helper.to_array(old).dtype).reshape(tuple(old.dims))
            old.CopyFrom(numpy_helper.from_array(array, name))
        elif any(i.name == name for i in graph.input):
            graph.initializer.append(numpy_helper.from_array(array, name))
    kept = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    del graph.input[:]
    graph.input.extend(kept)


def _requantize(record: dict, inits: dict) -> onnx.TensorProto:
    """The stored integer weight of a DQ-only pair, re-quantized from its trained float copy."""
    saved = {t.name: t for t in (_from_b64(b, onnx.TensorProto) for b in record["saved_inits"])}
    original = saved[record["int_weight"]]
    weight = numpy_helper.to_array(inits[record["int_weight"] + _SUFFIX + "_float"])
    zero_point = numpy_helper.to_array(saved[record["zero_point"]]) if record["zero_point"] else 0
    q = quantize(weight, numpy_helper.to_array(inits[record["scale"]]), zero_point, record["qmin"],
                 record["qmax"], axis=record["axis"], dtype=helper.tensor_dtype_to_np_dtype(original.data_type))
    return numpy_helper.from_array(q, record["int_weight"])


def clamp_narrow_weights(model: onnx.ModelProto, info: TrainingFormInfo) -> list[str]:
    """Clamp float weights of sub-storage-range quantizers into [(qmin−z)·s, (qmax−z)·s], in place.

    FakeQuant saturates at qmin/qmax, a QuantizeLinear with 8-bit storage only at the storage
    bounds; clamping makes the QDQ model compute what training computed. A forward-fused weight
    `x = W·g` (g per output channel from γ, σ²) is clamped through W. Returns the clamped names.
    """
    narrow = [r for r in info.pairs if r["weight"] and not r["int_weight"]
              and (r["qmin"], r["qmax"]) != _storage_range(onnx.TensorProto.DataType.Value(r["dtype"].upper()))]
    if not narrow:
        return []
    inits = {t.name: t for t in model.graph.initializer}
    fused = {e["folded_weight"]: e["weight"] for e in (get_annotation(model, FORWARD_FUSED_BN, {}) or {}).values()
             if e.get("folded_weight") and e.get("weight")}
    computed = _evaluate_constants(model, [r["x"] for r in narrow if r["x"] not in inits])
    clamped = []
    for r in narrow:
        x = numpy_helper.to_array(inits[r["x"]]) if r["x"] in inits else computed.get(r["x"])
        if x is None:
            continue
        lo, hi = _grid_bounds(r, inits, x.ndim)
        inside = np.clip(x, lo, hi).astype(x.dtype)
        if np.array_equal(inside, x):
            continue
        if r["x"] in inits:
            inits[r["x"]].CopyFrom(numpy_helper.from_array(inside, r["x"]))
        elif fused.get(r["x"]) in inits:
            w_name = fused[r["x"]]
            w = numpy_helper.to_array(inits[w_name])
            if w.shape != x.shape:
                continue
            ratio = np.divide(inside, x, out=np.ones_like(x), where=inside != x)
            inits[w_name].CopyFrom(numpy_helper.from_array((w * ratio).astype(w.dtype), w_name))
        else:
            continue
        clamped.append(r["x"])
    return clamped


def _grid_bounds(record: dict, inits: dict, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Real values of qmin and qmax, shaped to broadcast over the weight."""
    scale = numpy_helper.to_array(inits[record["scale"]]).astype(np.float32).reshape(-1)
    zp = np.asarray(record["zero_points"], np.float32).reshape(-1)
    if record["axis"] is None:
        return quant.grid_bounds(scale[0], zp[0], record["qmin"], record["qmax"])
    return quant.grid_bounds(scale, zp, record["qmin"], record["qmax"], axis=record["axis"], ndim=ndim)


def _evaluate_constants(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Values of tensors computed from initializers alone (forward-fused weights), by ORT."""
    if not names:
        return {}
    from qgraph.graph import QModel
    from qgraph.idioms import evaluate_constants
    qmodel = QModel.from_onnx(model)
    return evaluate_constants(qmodel, [n for n in names if n in qmodel.tensors()])


# --- small helpers --------------------------------------------------------------------

def _consumers(graph) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _to_b64(message) -> str:
    """A NodeProto or TensorProto as base64 text, to travel inside the JSON annotation."""
    return base64.b64encode(message.SerializeToString()).decode("ascii")


def _from_b64(blob: str, kind):
    message = kind()
    message.ParseFromString(base64.b64decode(blob))
    return message


def info_json(info: TrainingFormInfo) -> str:
    """A short human-readable summary of the pairs (no serialized nodes)."""
    keys = ("x", "y", "scale", "zero_point", "axis", "bits", "qmin", "qmax", "dtype", "weight", "learned")
    return json.dumps([{k: r[k] for k in keys} for r in info.pairs], indent=1)
