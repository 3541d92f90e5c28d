"""Vectorized NumPy reference interpreter for ONNX models (float, QDQ and lowered integer
models), bit-exact with ONNX Runtime 1.19's CPU kernels for the quantized ops.

    outputs = run(model, {"input": x}, outputs=["conv1_out", "logits"])
    plan = compile_model(model)                  # once per model; then, per batch:
    outputs = plan.run({"input": x}, outputs=["logits"])

One kernel per (domain, op type) in :data:`OPS`; an op without a kernel raises
:class:`qgraph.errors.InterpError` naming it — never a silent wrong answer.
"""

from qgraph.interp.registry import OPS, NodeContext, register
from qgraph.interp.runner import Plan, compile_model, recycle_large_arrays, run, set_blas_threads
from qgraph.interp import ops_basic, ops_nn, ops_quant, ops_contrib  # noqa: F401  (registration)
from qgraph.interp import (  # noqa: F401  (registration)
    ops_control, ops_detection, ops_dynamic, ops_elementwise, ops_float, ops_resize, ops_rnn, ops_signal,
    ops_tensor,
)

__all__ = ["run", "compile_model", "Plan", "recycle_large_arrays", "set_blas_threads", "register", "OPS", "NodeContext"]
