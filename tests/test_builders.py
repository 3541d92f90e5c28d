import re
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qgraph.errors import ConfigError, ModelError
from qgraph.models.builders import (BUILDERS, IR_VERSION, OPSET, build_model, build_repvgg, build_resnet,
                                    reparameterize_repvgg)
from qgraph.models.datasets import load_dataset

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")


@pytest.fixture(scope="module")
def mnist_batch():
    return load_dataset("mnist", "val")["input"][:3]


@pytest.fixture(scope="module")
def digits_batch():
    return load_dataset("digits", "val")["input"][:3]


def run(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": batch})[0]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builder_checks_and_runs_on_mnist(name, mnist_batch):
    model = build_model(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION and model.opset_import[0].version == OPSET
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    logits = run(model, mnist_batch)
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits)) and np.ptp(logits) > 1e-3
    # Different images give different logits: the model looks at its input.
    assert not np.allclose(logits[0], logits[1])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builder_fits_digits_and_class_count(name, digits_batch):
    model = build_model(name, input_shape=(1, 8, 8), num_classes=7)
    onnx.checker.check_model(model, full_check=True)
    assert run(model, digits_batch).shape == (3, 7)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_names_are_unique_and_readable(name):
    model = build_model(name)
    node_names = [node.name for node in model.graph.node]
    init_names = [init.name for init in model.graph.initializer]
    assert len(set(node_names)) == len(node_names) and len(set(init_names)) == len(init_names)
    assert all(NAME_PATTERN.match(n) for n in node_names + init_names), node_names + init_names


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_same_seed_same_bytes_other_seed_other_weights(name):
    assert build_model(name, seed=3).SerializeToString() == build_model(name, seed=3).SerializeToString()
    assert build_model(name, seed=3).SerializeToString() != build_model(name, seed=4).SerializeToString()


def test_init_is_he_normal_with_identity_batchnorm():
    model = build_resnet(width=16, blocks=(2, 2, 2))
    params = weights(model)
    kernel = params["stage2.block1.conv2.weight"]  # 16*2 channels in, 3x3: fan_in 288
    assert kernel.shape == (32, 32, 3, 3) and kernel.dtype == np.float32
    assert abs(kernel.std() - np.sqrt(2 / 288)) < 0.05 * np.sqrt(2 / 288)
    assert abs(kernel.mean()) < 0.01
    for role, value in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
        np.testing.assert_array_equal(params[f"stage2.block1.bn2.{role}"], value)
    np.testing.assert_array_equal(params["head.fc.bias"], 0)


def test_resnet_structure_and_projection_shortcuts():
    model = build_resnet(width=8, blocks=(2, 1, 1))
    names = {node.name: node for node in model.graph.node}
    assert "stage1.block0.downsample.conv" not in names  # 8 -> 8 channels, stride 1
    assert names["stage2.block0.downsample.conv"].op_type == "Conv"
    add = names["stage1.block1.add"]
    assert add.input[1] == names["stage1.block0.relu"].output[0]  # identity residual
    assert names["stage3.block0.add"].input[1] == names["stage3.block0.downsample.bn"].output[0]


def test_resnet50_size_builds_fast():
    start = time.perf_counter()
    model = build_resnet(input_shape=(3, 224, 224), width=64, blocks=(3, 4, 6, 3), bottleneck=True,
                         num_classes=1000)
    assert time.perf_counter() - start < 10
    params = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    assert 20e6 < params < 30e6
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Conv") == ops.count("BatchNormalization") == 53
    onnx.checker.check_model(model)


def test_mobilenetv2_depthwise_relu6_and_residuals():
    model = build_model("mobilenetv2")
    params = weights(model)
    clips = [node for node in model.graph.node if node.op_type == "Clip"]
    assert clips and all(list(node.input[1:]) == ["relu6.min", "relu6.max"] for node in clips)
    assert params["relu6.min"] == 0 and params["relu6.max"] == 6
    for node in model.graph.node:
        if node.name.endswith(".depthwise.conv"):
            group = next(a.i for a in node.attribute if a.name == "group")
            assert group == params[node.input[1]].shape[0] and params[node.input[1]].shape[1] == 1
    adds = [node.name for node in model.graph.node if node.op_type == "Add"]
    assert adds == ["stage1.block0.add", "stage2.block1.add", "stage3.block1.add"]  # stride 1, same width


def randomize_batchnorm(model: onnx.ModelProto, seed: int = 1) -> onnx.ModelProto:
    """Non-trivial BN statistics, as after training, so the re-parameterization has real work to do."""
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if ".bn." not in init.name + ".":
            continue
        shape = tuple(init.dims)
        role = init.name.rsplit(".", 1)[1]
        value = {"weight": rng.uniform(0.5, 1.5, shape), "bias": rng.normal(0, 0.2, shape),
                 "running_mean": rng.normal(0, 0.3, shape), "running_var": rng.uniform(0.3, 2.0, shape)}[role]
        init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
    return model


def test_repvgg_deploy_matches_train_form_on_real_data():
    train = randomize_batchnorm(build_repvgg(width=8, blocks=(2, 2, 2)))
    bn_names = [n for n in weights(train) if n.endswith(".bn.running_var")]
    assert any(".identity.bn" in n for n in bn_names) and len(bn_names) == 6 * 2 + 3
    deploy = reparameterize_repvgg(train)
    onnx.checker.check_model(deploy, full_check=True)
    ops = [node.op_type for node in deploy.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 6 and ops.count("Add") == 0
    assert all(node.name.endswith(".conv") and len(node.input) == 3
               for node in deploy.graph.node if node.op_type == "Conv")
    batch = load_dataset("mnist", "val")["input"][:16]
    expected, got = run(train, batch), run(deploy, batch)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(expected).max() > 0.1


def test_repvgg_reparameterization_keeps_input_model_and_rejects_others():
    train = build_repvgg()
    before = train.SerializeToString()
    reparameterize_repvgg(train)
    assert train.SerializeToString() == before
    with pytest.raises(ModelError, match="build_repvgg"):
        reparameterize_repvgg(build_model("lenet"))


def test_build_model_rejects_unknown_names_and_arguments():
    with pytest.raises(ConfigError, match="lenet, resnet, mobilenetv2, repvgg, repvgg_deploy, mlp"):
        build_model("vgg16")
    with pytest.raises(ConfigError, match="bottleneck"):
        build_model("lenet", bottleneck=True)
    with pytest.raises(ConfigError, match="input_shape"):
        build_model("mlp", input_shape=(28, 28))
