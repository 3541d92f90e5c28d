"""qgraph.models.exported: valid, runnable, deterministic graphs that contain the exporters' idioms."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qgraph.model_io import check_model
from qgraph.models.exported import (CTC_BLANK_SHARE, DB_FOREGROUND, build_exported, db_detector, pplcnet_paddle,
                                    probe_batch, svtr_recognizer, vit_encoder)

# Small configurations: the idioms are the same as at full size, the tests stay fast.
SMALL = {
    "pplcnet": (pplcnet_paddle, dict(input_shape=(3, 64, 64), num_classes=10)),
    "textdir": (pplcnet_paddle, dict(input_shape=(3, 48, 192), num_classes=2, scale=0.25)),
    "vit": (vit_encoder, dict(input_shape=(3, 32, 32), patch=8, dim=32, depth=2, heads=2, num_classes=10)),
    "db": (db_detector, dict(input_shape=(3, 64, 64), scale=0.25, fpn_channels=32)),
    "svtr": (svtr_recognizer, dict(input_shape=(3, 48, 64), dim=32, depth=1, heads=2, num_classes=20)),
}


@pytest.fixture(scope="module")
def built() -> dict[str, onnx.ModelProto]:
    return {key: builder(**kwargs) for key, (builder, kwargs) in SMALL.items()}


def run(model: onnx.ModelProto, x: np.ndarray, extra: list[str] = ()) -> list[np.ndarray]:
    if extra:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {model.graph.input[0].name: x})


def shape_of(key: str) -> tuple[int, int, int]:
    return SMALL[key][1]["input_shape"]


class Graph:
    """Producer/consumer lookups and constant values, for pattern counting."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def ops(self, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == op_type]

    def only(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        users = [n for n in self.consumers.get(tensor, []) if n.op_type == op_type]
        return users[0] if len(users) == 1 else None

    def const(self, name: str):
        return self.consts.get(name)

    def is_scalar(self, name: str, value: float) -> bool:
        array = self.const(name)
        return array is not None and array.size == 1 and np.isclose(float(array), value)


def count_hardswish(g: Graph) -> int:
    """x * Clip(x + 3, 0, 6) / 6 chains."""
    found = 0
    for add in g.ops("Add"):
        x, three = add.input
        clip = g.only(add.output[0], "Clip")
        if not (g.is_scalar(three, 3.0) and clip and g.is_scalar(clip.input[1], 0) and g.is_scalar(clip.input[2], 6)):
            continue
        mul = g.only(clip.output[0], "Mul")
        div = mul and g.only(mul.output[0], "Div")
        found += bool(mul and x in mul.input and div and g.is_scalar(div.input[1], 6.0))
    return found


def count_layernorm(g: Graph) -> int:
    """ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(gamma) -> Add(beta)."""
    found = 0
    for mean in g.ops("ReduceMean"):
        sub = g.only(mean.output[0], "Sub")
        if not sub:
            continue
        power = g.only(sub.output[0], "Pow")
        var = power and g.is_scalar(power.input[1], 2.0) and g.only(power.output[0], "ReduceMean")
        add = var and g.only(var.output[0], "Add")
        sqrt = add and g.only(add.output[0], "Sqrt")
        div = sqrt and g.only(sqrt.output[0], "Div")
        mul = div and sub.output[0] in div.input and g.only(div.output[0], "Mul")
        beta = mul and g.only(mul.output[0], "Add")
        found += bool(beta)
    return found


def count_channel_affine(g: Graph) -> int:
    """Conv -> Mul(const [C,1,1]) -> Add(const [C,1,1])."""
    found = 0
    for conv in g.ops("Conv"):
        mul = g.only(conv.output[0], "Mul")
        add = mul and g.only(mul.output[0], "Add")
        if add and all(g.const(n) is not None and g.const(n).ndim == 3 for n in (mul.input[1], add.input[1])):
            found += 1
    return found


@pytest.mark.parametrize("key", SMALL)
def test_builder_is_valid_and_runs_with_spread_outputs(built, key):
    model = built[key]
    onnx.checker.check_model(model, full_check=True)
    check_model(model, origin=key)  # qgraph's own gate: checker + strict shape inference
    assert model.opset_import[0].version == 17
    outputs = run(model, probe_batch(shape_of(key), seed=99, count=3))
    for output in outputs:
        assert np.isfinite(output).all()
        assert output.reshape(len(output), -1).std(axis=1).min() > 1e-3, f"{key}: degenerate output"


@pytest.mark.parametrize("key", SMALL)
def test_small_input_perturbations_are_not_amplified(built, key):
    """Not chaotic (see the exported module docstring): input noise at -50 dB stays below -30 dB at the output,
    else quantization noise would be measured through an amplifier the trained wheel models are not."""
    x = probe_batch(shape_of(key), seed=42)
    noise = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32) * np.float32(0.003 * x.std())
    clean, noisy = run(built[key], x)[0], run(built[key], x + noise)[0]
    snr = 10 * np.log10((clean.astype(np.float64) ** 2).sum() / ((clean - noisy).astype(np.float64) ** 2).sum())
    assert snr > 30.0


def test_pplcnet_has_paddle_idioms(built):
    g = Graph(built["pplcnet"])
    convs_with_act = len(g.ops("BatchNormalization")) + count_channel_affine(g)
    # every conv-norm pair but none of the SE / head convs is followed by a decomposed HardSwish; plus the head
    assert count_hardswish(g) == convs_with_act + 1
    assert count_channel_affine(g) >= 4, "folded BN written as Conv -> Mul(c) -> Add(c)"
    assert len(g.ops("HardSigmoid")) == 2 and len(g.ops("GlobalAveragePool")) == 3
    assert g.ops("Softmax") and g.ops("MatMul") and not g.ops("Gemm")
    assert all(n.name.startswith("p2o.") for n in g.nodes)
    assert "conv2d_0.w_0" in g.consts and "batch_norm_0.w_2" in g.consts


def test_vit_has_torch_idioms(built):
    g = Graph(built["vit"])
    depth = SMALL["vit"][1]["depth"]
    assert count_layernorm(g) == 2 * depth + 1
    assert len(g.ops("Erf")) == depth and len(g.ops("Softmax")) == depth
    assert len(g.ops("MatMul")) == 6 * depth  # qkv, q k^T, probs v, proj, fc1, fc2
    for op in ("Shape", "Gather", "Unsqueeze", "Concat", "ConstantOfShape", "Where", "Expand", "Constant"):
        assert g.ops(op), f"torch idiom {op} missing"
    assert "/blocks.0/attn/qkv/MatMul" in {n.name for n in g.nodes}
    assert any(name.startswith("onnx::MatMul_") for name in g.consts)


def test_vit_batch_is_dynamic(built):
    x = probe_batch(shape_of("vit"), seed=3, count=5)
    one_by_one = np.concatenate([run(built["vit"], x[i:i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(run(built["vit"], x)[0], one_by_one, rtol=1e-4, atol=1e-4)


def test_db_detector_has_fpn_and_head_idioms(built):
    g = Graph(built["db"])
    transposes = g.ops("ConvTranspose")
    assert len(transposes) == 2
    assert g.only(transposes[0].output[0], "BatchNormalization"), "ConvTranspose + BN"
    assert len(g.ops("Resize")) == 6 and any(len(n.input) == 4 for n in g.ops("Concat"))
    hard_sigmoids = [n for n in g.ops("Clip") if g.is_scalar(n.input[2], 1.0)]
    assert len(hard_sigmoids) == 2 and not g.ops("HardSigmoid"), "SE gates decomposed as Clip(x * 0.2 + 0.5, 0, 1)"
    prob = run(built["db"], probe_batch(shape_of("db"), seed=0))[0]
    assert prob.shape == (8, 1, 64, 64)
    assert abs(float((prob > 0.5).mean()) - DB_FOREGROUND) < 0.02, "the map is text where the builder put it"


def test_svtr_is_a_ctc_recognizer(built):
    g = Graph(built["svtr"])
    assert count_layernorm(g) == 3 and count_hardswish(g) > 0 and g.ops("Split")
    probs = run(built["svtr"], probe_batch(shape_of("svtr"), seed=0))[0]
    assert probs.shape == (8, 8, 20)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert abs(float((probs.argmax(-1) == 0).mean()) - CTC_BLANK_SHARE) < 0.05


def test_norm_statistics_are_the_probes(built):
    """Each BN's running mean/var is the batch statistic of its input on the probe."""
    model = built["pplcnet"]
    g = Graph(model)
    bns = g.ops("BatchNormalization")
    values = run(model, probe_batch(shape_of("pplcnet"), seed=0), extra=[bns[0].input[0], bns[-1].input[0]])[1:]
    for bn, value in zip((bns[0], bns[-1]), values):
        np.testing.assert_allclose(value.mean(axis=(0, 2, 3)), g.const(bn.input[3]), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(value.var(axis=(0, 2, 3)), g.const(bn.input[4]), rtol=1e-3, atol=1e-4)


def test_builders_are_deterministic_by_seed():
    kwargs = SMALL["vit"][1]
    first, again = vit_encoder(**kwargs, seed=1), vit_encoder(**kwargs, seed=1)
    assert first.SerializeToString() == again.SerializeToString()
    assert vit_encoder(**kwargs, seed=2).SerializeToString() != first.SerializeToString()
    db_kwargs = SMALL["db"][1]
    assert db_detector(**db_kwargs).SerializeToString() == db_detector(**db_kwargs).SerializeToString()


def test_probe_of_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="does not fit input"):
        pplcnet_paddle(input_shape=(3, 64, 64), num_classes=10, probe=np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="unknown exported-style builder"):
        build_exported("resnet")
