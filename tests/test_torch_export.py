"""End to end on a model the project did not build: a CNN exported by `torch.onnx.export`.

`tests/fixtures/torch_cnn.onnx` was trained on the bundled MNIST train split and exported by
PyTorch (`scripts/export_torch_fixture.py` records how): BN folded into the convs by the
exporter, a residual Add, MaxPool, a depthwise conv, GlobalAveragePool, Flatten, Gemm,
PyTorch's node/tensor names (`/block/conv1/Conv`, `onnx::Conv_63`). It goes through the
bundled ptq.yaml, `qgraph lower` to both targets and `qgraph diff`, all through the CLI, with
no torch needed. `torch_cnn_view.onnx` is the same network flattened with
`x.view(x.size(0), -1)` (a Shape/Gather/Unsqueeze/Concat chain feeding Reshape).
When torch is importable, the architecture is also exported live (random weights) and pushed
through the same chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qgraph.api import bundled_pipeline
from qgraph.cli import main
from qgraph.models.datasets import load_dataset, save_npz
from qgraph.runner import run_concatenated

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE = FIXTURES / "torch_cnn.onnx"
VIEW_FIXTURE = FIXTURES / "torch_cnn_view.onnx"
CALIB_SAMPLES = 256
TARGETS = ("qlinear", "integer")


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """calib.npz (first CALIB_SAMPLES of the shuffled train split) and val.npz (1,000), as files."""
    folder = tmp_path_factory.mktemp("mnist")
    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
    calib = {k: v[:CALIB_SAMPLES] for k, v in train.items()}
    return save_npz(calib, folder / "calib.npz"), save_npz(val, folder / "val.npz"), val


def run_chain(model_path: Path, work: Path, calib: Path, val: Path) -> dict:
    """ptq.yaml -> lower (both targets) -> diff --against the QDQ model, all via the CLI."""
    work.mkdir(parents=True, exist_ok=True)
    ptq = work / "ptq.onnx"
    result = invoke("passes", "run", model_path, "--pipeline", bundled_pipeline("ptq"), "--data", calib, "-o", ptq)
    assert result.exit_code == 0, result.output
    out = {"ptq": ptq, "lower": {}, "diff": {}, "diff_exit": {}}
    for target in TARGETS:
        lowered, report = work / f"ptq.{target}.onnx", work / f"lower.{target}.json"
        result = invoke("lower", ptq, "--target", target, "-o", lowered, "--report", report)
        assert result.exit_code == 0, f"lower --target {target}: {result.output}"
        out["lower"][target] = json.loads(report.read_text())
        diff_json = work / f"diff.{target}.json"
        result = invoke("diff", lowered, "--data", val, "--against", ptq, "--json", diff_json)
        out["diff_exit"][target] = result.exit_code
        assert result.exit_code in (0, 1), f"diff {target}: {result.output}"
        out["diff"][target] = json.loads(diff_json.read_text())
    return out


def assert_fully_lowered_and_bit_exact(chain: dict) -> None:
    for target in TARGETS:
        lower, diff = chain["lower"][target], chain["diff"][target]
        assert lower["float_nodes"] == [], f"{target}: left in float: {lower['skipped']}"
        assert lower["lowered"].get("Conv") == 5 and lower["lowered"].get("Gemm") == 1, lower["lowered"]
        assert chain["diff_exit"][target] == 0 and diff["bit_exact"] is True, f"{target}: ORT != interpreter"


# -- the committed fixture (no torch needed) -----------------------------------------------

@pytest.fixture(scope="module")
def fixture_chain(tmp_path_factory, mnist):
    calib, val, _ = mnist
    return run_chain(FIXTURE, tmp_path_factory.mktemp("torch_cnn"), calib, val)


def test_fixture_is_a_pytorch_export():
    assert FIXTURE.stat().st_size < 200_000
    model = onnx.load(FIXTURE)
    onnx.checker.check_model(model, full_check=True)
    assert model.producer_name == "pytorch"
    assert [(i.domain, i.version) for i in model.opset_import] == [("", 17)]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    ops = [n.op_type for n in model.graph.node]
    for op in ("Conv", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten", "Gemm"):
        assert op in ops, op
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
               for n in model.graph.node), "no depthwise conv"
    assert any(n.name.startswith("/block/") for n in model.graph.node)  # PyTorch's scoped names


def test_fixture_ptq_lower_diff_bit_exact(fixture_chain):
    assert_fully_lowered_and_bit_exact(fixture_chain)


def test_fixture_accuracy_float_ptq_lowered(fixture_chain, mnist):
    _, _, val = mnist
    logits = run_concatenated(onnx.load(FIXTURE), {"input": val["input"]})["logits"]
    float_top1 = float((logits.argmax(1) == val["labels"]).mean())
    assert float_top1 > 0.9, "the fixture is not the trained network"
    for target in TARGETS:
        acc = fixture_chain["diff"][target]["accuracy"]
        ptq_top1, lowered_top1 = acc["against:logits"], acc["ort:logits"]
        assert ptq_top1 >= float_top1 - 0.02, (float_top1, ptq_top1)
        assert abs(lowered_top1 - ptq_top1) <= 0.01, (target, ptq_top1, lowered_top1)
        assert acc["interp:logits"] == lowered_top1


def test_view_flatten_fixture_ptq_lower_diff(tmp_path, mnist):
    calib, val, _ = mnist
    assert "Shape" in [n.op_type for n in onnx.load(VIEW_FIXTURE).graph.node]
    assert_fully_lowered_and_bit_exact(run_chain(VIEW_FIXTURE, tmp_path, calib, val))


def test_view_fixture_is_the_same_network(mnist):
    _, _, val = mnist
    feeds = {"input": val["input"][:64]}
    a = run_concatenated(onnx.load(FIXTURE), feeds)["logits"]
    b = run_concatenated(onnx.load(VIEW_FIXTURE), feeds)["logits"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# -- live export (only where torch is installed; never a qgraph dependency) -----------------

def test_live_torch_export_ptq_lower_diff(tmp_path, mnist):
    torch = pytest.importorskip("torch")
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "export_torch_fixture", Path(__file__).resolve().parents[1] / "scripts" / "export_torch_fixture.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    build_model, export_onnx = script.build_model, script.export_onnx

    torch.manual_seed(0)
    model = build_model(seed=1).eval()
    with torch.no_grad():  # non-trivial BN statistics so the exporter's BN fold does something
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    path = export_onnx(model, tmp_path / "live.onnx")
    exported = onnx.load(path)
    assert exported.producer_name == "pytorch" and exported.graph.input[0].name == "input"
    calib, val, _ = mnist
    assert_fully_lowered_and_bit_exact(run_chain(path, tmp_path / "chain", calib, val))
