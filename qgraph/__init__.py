"""qgraph: an ONNX-graph rewriting compiler for quantization-aware training and
integer deployment. No deep-learning framework is needed at any step."""

__version__ = "0.1.0"
