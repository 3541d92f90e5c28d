"""Control flow: If, Loop and Scan, their bodies run as compiled plans of their own.

A body reads tensors of the enclosing scope by name; the enclosing plan passes their values after
the node's own inputs (``NodeContext.outer``, :func:`qgraph.interp.registry.outer_names`), and the
body's plan takes them as graph inputs. Each body is compiled once per node (its weights decoded
once, its kernels' memos kept across runs and iterations).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qgraph.interp.registry import NodeContext, register


def _body_plan(ctx: NodeContext, attribute: str):
    """The compiled plan of graph attribute `attribute`, its outer-scope tensors as inputs."""
    def build():
        from qgraph.interp.runner import Plan      # runner -> registry; the plan is built at run time
        graph = onnx.GraphProto()
        graph.CopyFrom(ctx.attr(attribute))
        declared = {i.name for i in graph.input}
        graph.input.extend(onnx.ValueInfoProto(name=t) for t in ctx.outer if t not in declared)
        opsets = [helper.make_opsetid(d, v) for d, v in ctx.opsets.items()] or [helper.make_opsetid("", ctx.opset)]
        return Plan(helper.make_model(graph, opset_imports=opsets))
    return ctx.once(("body", attribute), build)


def _run_body(plan, ctx: NodeContext, outer, feeds: dict, outputs: list[str]) -> list[np.ndarray]:
    values = plan.run({**dict(zip(ctx.outer, outer)), **feeds}, outputs)
    return [values[t] for t in outputs]


@register("If")
def if_(ctx, cond, *outer):
    """The branch the (one-element) condition picks, its outputs as the node's."""
    flag = np.asarray(cond)
    if flag.size != 1:
        raise ctx.error(f"the condition has {flag.size} elements; If needs one")
    branch = "then_branch" if bool(flag.reshape(())) else "else_branch"
    plan = _body_plan(ctx, branch)
    return tuple(_run_body(plan, ctx, outer, {}, plan.output_names))


@register("Loop")
def loop(ctx, trip_count, cond, *rest):
    """``for i in range(M) while cond``: the body maps (i, cond, carried...) to (cond, carried...,
    scan outputs...); the node returns the last carried values and each scan output stacked over
    the iterations (axis 0). M or cond omitted: that bound is absent (ONNX Loop)."""
    carried_count = len(ctx.node.input) - 2
    carried, outer = list(rest[:carried_count]), rest[carried_count:]
    body = ctx.attr("body")
    names = [i.name for i in body.input]
    if len(names) != carried_count + 2:
        raise ctx.error(f"the body takes {len(names)} inputs; expected {carried_count + 2} "
                        "(iteration, condition and the carried values)")
    plan = _body_plan(ctx, "body")
    outputs = plan.output_names
    scans: list[list[np.ndarray]] = [[] for _ in outputs[1 + carried_count:]]
    limit = None if trip_count is None else int(np.asarray(trip_count).reshape(()))
    going = True if cond is None else bool(np.asarray(cond).reshape(()))
    step = 0
    while going and (limit is None or step < limit):
        feeds = {names[0]: np.array(step, np.int64), names[1]: np.array(going), **dict(zip(names[2:], carried))}
        results = _run_body(plan, ctx, outer, feeds, outputs)
        going = bool(np.asarray(results[0]).reshape(()))
        carried = results[1:1 + carried_count]
        for stack, value in zip(scans, results[1 + carried_count:]):
            stack.append(value)
        step += 1
    stacked = []
    for k, stack in enumerate(scans):
        if stack:
            stacked.append(np.stack(stack))
        else:                                     # no iteration ran: an empty stack of the body's type
            elem = body.output[1 + carried_count + k].type.tensor_type.elem_type
            stacked.append(np.zeros((0,), helper.tensor_dtype_to_np_dtype(elem) if elem else np.float32))
    return (*carried, *stacked)


@register("Scan")
def scan(ctx, *inputs):
    """ONNX Scan (opset 9+): the body maps (state..., one slice of each scan input) to (state...,
    one slice of each scan output), over the scan inputs' scan axis (each read forwards or
    backwards); the node returns the last states and the scan outputs stacked along their axes."""
    if ctx.opset < 9:
        raise ctx.error("Scan before opset 9 (with a batch axis and sequence_lens) is not supported")
    scan_count = ctx.attr("num_scan_inputs")
    given = len(ctx.node.input)
    states, sequences, outer = list(inputs[:given - scan_count]), inputs[given - scan_count:given], inputs[given:]
    body = ctx.attr("body")
    names = [i.name for i in body.input]
    in_axes = [a % np.ndim(s) for a, s in zip(ctx.attr("scan_input_axes", [0] * scan_count), sequences)]
    in_reverse = ctx.attr("scan_input_directions", [0] * scan_count)
    lengths = {np.shape(s)[a] for s, a in zip(sequences, in_axes)}
    if len(lengths) != 1:
        raise ctx.error(f"the scan inputs have different lengths {sorted(lengths)} along their scan axes")
    plan = _body_plan(ctx, "body")
    outputs = plan.output_names
    scans: list[list[np.ndarray]] = [[] for _ in outputs[len(states):]]
    for step in range(lengths.pop()):
        slices = [np.take(s, -1 - step if rev else step, axis=a) for s, a, rev in zip(sequences, in_axes, in_reverse)]
        results = _run_body(plan, ctx, outer, dict(zip(names, [*states, *slices])), outputs)
        states = results[:len(states)]
        for stack, value in zip(scans, results[len(states):]):
            stack.append(value)
    out_axes = ctx.attr("scan_output_axes", [0] * len(scans))
    out_reverse = ctx.attr("scan_output_directions", [0] * len(scans))
    stacked = []
    for stack, axis, rev in zip(scans, out_axes, out_reverse):
        if not stack:
            raise ctx.error("the scan inputs are empty: no iteration gives the scan outputs a shape")
        stack = stack[::-1] if rev else stack
        stacked.append(np.stack(stack, axis=axis % (np.ndim(stack[0]) + 1)))
    return (*states, *stacked)
