"""canonicalize: the normal form every pipeline starts from.

1. unique, non-empty node names (passes and reports refer to nodes by name);
2. Identity and inference-mode Dropout removed (y = x);
3. constant subgraphs folded with ONNX Runtime, including Shape->Gather->Concat chains that
   feed Reshape/Flatten, so shape constants become static initializers; an If whose condition
   folds to a constant (an exporter's branch on a static shape, or on an input fixed with
   ``--fix-input``) becomes the branch it takes (inline_constant_ifs);
4. Constant nodes turned into initializers;
5. exporter idioms in normal form (qgraph.normal_form): decomposed LayerNorm and Softmax become
   one op each, and a per-channel Mul/Div/Add/Sub by a constant after a Conv/ConvTranspose/Gemm/
   BatchNormalization folds into its parameters;
6. BatchNormalization parameters shared with another input slot get their own copy: torch.onnx
   merges equal initializers (an untrained BN's running_var equals its γ), and a shared tensor
   would tie γ to a frozen statistic during training;
7. Reshape(x, [dim0(x), -1]) built from Shape(x) at run time (PyTorch's `x.view(x.size(0), -1)`
   with a dynamic batch) becomes Flatten(x, axis=1): the same result, with no shape arithmetic
   left for quantizers and lowering to trip on;
8. declared shapes (graph outputs, value_info) that contradict what the graph computes, once
   folding has made the shapes static, take the inferred shape: exporters sometimes declare an
   output [1, seqlen] that is really [T, 1, C], which ONNX's checker refuses after folding.
QuantizeLinear/DequantizeLinear are never folded, so QDQ models keep their quantizers.

Invariant: outputs unchanged up to float rounding of the folded subgraphs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from qgraph.errors import PassError
from qgraph.graph import QModel
from qgraph.idioms import lift_constant_nodes, name_nodes, skip
from qgraph.normal_form import normalize_exporter_idioms
from qgraph.pipeline import PassContext, register_pass

_REMOVABLE = ("Identity", "Dropout")
_SHAPE_CONSTANT_SIZE = 64   # initializers up to this many elements keep their values for shape inference
_KEEP_QUANTIZERS = ("QuantizeLinear", "DequantizeLinear")
_INLINE_ROUNDS = 8   # nesting depth of constant-condition Ifs canonicalize inlines


@register_pass("canonicalize", preserves_outputs=True, tolerance=1e-5)
def canonicalize(model: QModel, ctx: PassContext, *, fold_constants: bool = True,
                 remove_identity: bool = True, exporter_idioms: bool = True) -> dict:
    """Unique node names, Identity/Dropout removal, constant folding (static shapes)."""
    renamed = name_nodes(model)
    removed, skipped = remove_passthrough(model) if remove_identity else (0, [])
    before = len(model.graph.nodes)
    inlined = 0
    if fold_constants:
        _fold(model)
        for _ in range(_INLINE_ROUNDS):     # an inlined branch may hold Ifs that fold in turn
            size = len(model.graph.nodes)
            count = inline_constant_ifs(model)
            if not count:
                break
            inlined += count
            renamed += name_nodes(model)
            bypassed = remove_passthrough(model)[0] if remove_identity else 0
            removed += bypassed
            # the branches' nodes joined and the Identities went: neither counts as folding
            before += len(model.graph.nodes) + bypassed - size
            _fold(model)
    lift_constant_nodes(model)
    model.cleanup()
    folded = before - len(model.graph.nodes)
    idioms = normalize_exporter_idioms(model) if exporter_idioms else {"counts": {}, "skipped": []}
    flattened = flatten_batch_reshapes(model)
    untied = untie_batchnorm_parameters(model)
    model.cleanup()
    corrected = correct_declared_shapes(model)
    fused = sum(idioms["counts"].values())
    changed = renamed + removed + folded + fused + flattened + untied + inlined
    idiom_text = ", ".join(f"{n} {k}" for k, n in idioms["counts"].items() if n)
    summary = (f"{renamed} renamed, {removed} identity/dropout removed, {folded} nodes folded, "
               + (f"{inlined} If with a constant condition inlined, " if inlined else "")
               + f"{flattened} batch reshapes made Flatten, {untied} BN parameters untied"
               + (f", exporter idioms: {idiom_text}" if idiom_text else ""))
    return {"changed": changed, "summary": summary, "renamed": renamed, "removed": removed,
            "folded": folded, "ifs_inlined": inlined, "flattened": flattened, "untied": untied,
            "idioms": idioms["counts"],
            "skipped": skipped + idioms["skipped"],
            "warnings": [f"declared shape of '{name}' {old} contradicts the computed {new}; declared {new} instead"
                         for name, old, new in corrected]}


def correct_declared_shapes(model: QModel) -> list[tuple[str, list, list]]:
    """Give every tensor whose declared shape contradicts ONNX shape inference (another rank, or
    another fixed size in some dimension) the inferred shape; returns (name, declared, inferred)
    of each. Inference runs on a copy with the declarations removed, so it sees only the graph,
    and with large initializers as typed inputs: their shapes are all inference needs, and the
    model's weights are not copied again (small ones keep their values: shape constants)."""
    proto = model.to_onnx()
    del proto.graph.value_info[:]
    for output in proto.graph.output:
        output.type.tensor_type.ClearField("shape")
    for init in [i for i in proto.graph.initializer if np.prod(i.dims, dtype=np.int64) > _SHAPE_CONSTANT_SIZE]:
        proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        proto.graph.initializer.remove(init)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:   # noqa: BLE001 - nothing learnt; the declarations stay as they are
        return []
    inferred = {}
    for info in list(proto.graph.value_info) + list(proto.graph.output):
        if info.type.tensor_type.HasField("shape"):
            # sizes, the model's own symbols; inference's made-up 'unk__N' symbols as unknown
            inferred[info.name] = [d.dim_value if d.HasField("dim_value") else
                                   (d.dim_param if d.dim_param and not d.dim_param.startswith("unk__") else None)
                                   for d in info.type.tensor_type.shape.dim]
    corrected = []
    for name, tensor in model.tensors().items():
        declared, computed = getattr(tensor, "shape", None), inferred.get(name)
        if isinstance(tensor, gs.Constant) or declared is None or computed is None:
            continue
        if len(declared) != len(computed) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                                 for a, b in zip(declared, computed)):
            corrected.append((name, list(declared), computed))
            tensor.shape = computed
    return corrected


def _fold(model: QModel) -> None:
    """Constant folding with ONNX Runtime, quantizers kept. graphsurgeon's own flattening of
    constant-condition Ifs loses every branch output but the first (the parent graph then reads a
    tensor nothing writes): inline_constant_ifs does that instead."""
    model.toposort()
    model.graph.fold_constants(fold_shapes=True, error_ok=True, flatten_subgraphs=False,
                               should_exclude_node=lambda node: node.op in _KEEP_QUANTIZERS)


def inline_constant_ifs(model: QModel) -> int:
    """Each If whose condition is a constant (an exporter's branch on a static shape, folded)
    becomes the branch it takes: the branch's nodes join the graph, its own tensors renamed apart
    from the graph's, and each If output an Identity of the branch's output (removed with the
    other Identities, unless remove_identity is off). Nested control flow inside the branch comes along as it is. Returns the
    Ifs inlined."""
    inlined = 0
    for node in list(model.graph.nodes):
        if node.op != "If" or not isinstance(node.inputs[0], gs.Constant):
            continue
        taken = bool(np.asarray(node.inputs[0].values).reshape(-1)[0])
        branch = node.attrs["then_branch" if taken else "else_branch"]
        if len(branch.outputs) != len(node.outputs):
            continue
        outer = {id(t) for t in model.tensors().values()}
        own = {id(t): t for n in branch.nodes for t in (*n.inputs, *n.outputs) if id(t) not in outer}
        for tensor in own.values():
            tensor.name = model.fresh_tensor_name(tensor.name)
        results, outputs = list(branch.outputs), list(node.outputs)
        node.inputs.clear()
        node.outputs.clear()
        model.graph.nodes.remove(node)
        model.graph.nodes.extend(branch.nodes)
        for result, out in zip(results, outputs):
            model.add_node("Identity", [result], [out], f"{node.name}_result")
        inlined += 1
    if inlined:
        model.toposort()
    return inlined


def remove_passthrough(model: QModel) -> tuple[int, list[dict]]:
    removed, skipped = 0, []
    for node in list(model.graph.nodes):
        if node.op not in _REMOVABLE:
            continue
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            skipped.append(skip(node, "its mask output is used"))
            continue
        try:
            model.bypass(node)
            removed += 1
        except PassError as exc:
            skipped.append(skip(node, str(exc)))
    model.cleanup()
    return removed, skipped


def flatten_batch_reshapes(model: QModel) -> int:
    """Rewrite Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])) as Flatten(x, axis=1)."""
    count = 0
    for node in list(model.graph.nodes):
        if node.op != "Reshape" or len(node.inputs) < 2 or node.attrs.get("allowzero", 0):
            continue
        data, shape = node.inputs[0], node.inputs[1]
        if _is_batch_then_rest(model, shape, data):
            node.op, node.attrs = "Flatten", {"axis": 1}
            node.inputs = [data]
            count += 1
    return count


def _is_batch_then_rest(model: QModel, shape, data) -> bool:
    """True when `shape` is computed as [dim 0 of `data`, -1]."""
    concat = model.producer(shape)
    if concat is None or concat.op != "Concat" or len(concat.inputs) != 2:
        return False
    rest = model.constant_value(concat.inputs[1])
    if rest is None or rest.reshape(-1).tolist() != [-1]:
        return False
    unsqueeze = model.producer(concat.inputs[0])
    if unsqueeze is None or unsqueeze.op != "Unsqueeze":
        return False
    axes = model.constant_value(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    gather = model.producer(unsqueeze.inputs[0])
    if axes is None or axes.reshape(-1).tolist() != [0] or gather is None or gather.op != "Gather":
        return False
    index = model.constant_value(gather.inputs[1])
    source = model.producer(gather.inputs[0])
    return (index is not None and int(index.reshape(-1)[0]) == 0 and gather.attrs.get("axis", 0) == 0
            and source is not None and source.op == "Shape" and source.inputs[0] is data
            and not source.attrs.get("start", 0))


def untie_batchnorm_parameters(model: QModel) -> int:
    """Give each BatchNormalization parameter slot a tensor no other slot reads (a copy if needed)."""
    untied = 0
    for node in model.graph.nodes:
        if node.op != "BatchNormalization":
            continue
        for slot in range(1, min(len(node.inputs), 5)):
            tensor = node.inputs[slot]
            if not isinstance(tensor, gs.Constant):
                continue
            readers = sum(1 for reader in tensor.outputs for t in reader.inputs if t is tensor)
            if readers > 1:
                node.inputs[slot] = model.add_constant(f"{node.name}.param{slot}", np.array(tensor.values))
                untied += 1
    return untied
