"""Issue 2's done-criterion: `qgraph passes run` with float.yaml --verify on every bundled model."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from qgraph.api import bundled_pipeline
from qgraph.cli import main
from qgraph.models.builders import BUILDERS, build_model
from qgraph.models.datasets import load_dataset, save_npz
from qgraph.runner import run_model


def randomize_bn(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Give every BatchNormalization non-trivial statistics, so folding them is a real check."""
    rng = np.random.default_rng(seed)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        for name, low, high in zip(node.input[1:], (0.5, -0.3, -0.3, 0.5), (1.5, 0.3, 0.3, 2.0)):
            old = numpy_helper.to_array(inits[name])
            inits[name].CopyFrom(numpy_helper.from_array(rng.uniform(low, high, old.shape).astype(np.float32), name))
    return model


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_float_yaml_verifies_on_bundled_model(tmp_path, name):
    model = randomize_bn(build_model(name))
    src, out, data = tmp_path / f"{name}.onnx", tmp_path / "float.onnx", tmp_path / "val.npz"
    onnx.save(model, src)
    val = load_dataset("mnist", "val")
    save_npz({k: v[:64] for k, v in val.items()}, data)
    result = CliRunner().invoke(main, ["passes", "run", str(src), "--pipeline", str(bundled_pipeline("float")),
                                       "--data", str(data), "--verify", "-o", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    folded = onnx.load(out)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node] or name == "repvgg"
    x = {"input": val["input"][:64]}
    ref, new = run_model(model, x)["logits"], run_model(folded, x)["logits"]
    np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
