"""Model builders, bundled datasets and sample pipelines (installed as qgraph.models)."""
