"""train_model: float training and QAT in ONNX Runtime, export, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_small_cnn
from qgraph.errors import DataError, TrainError
from qgraph.train import classify_parameters, evaluate_training_engine, train_model
from test_fakequant import digits_like, ort_run, tiny_cnn

TESTS = Path(__file__).parent


def params(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def data():
    return digits_like(384), digits_like(128, "val")


def test_float_training_learns_and_exports_what_the_engine_computes(data, tmp_path):
    train, val = data
    trained, history = train_model(tiny_cnn("none"), train, val, epochs=4, lr=2e-2, batch_size=32,
                                   workdir=tmp_path, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "val_top1", "images_per_s", "seconds"}
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    assert history[-1]["val_top1"] > 0.3  # chance is 0.1
    assert not any(n.domain == "com.microsoft" for n in trained.graph.node)
    engine = evaluate_training_engine(tmp_path, {"input": val["input"]})
    np.testing.assert_allclose(ort_run(trained, val["input"]), engine, rtol=1e-5, atol=1e-5)
    # forward-fused BN: W, gamma, beta trained; running statistics untouched
    before, after = params(tiny_cnn("none")), params(trained)
    for name in ("conv.weight", "bn.weight", "bn.bias", "fc.weight"):
        assert not np.array_equal(before[name], after[name]), name
    for name in ("bn.running_mean", "bn.running_var"):
        np.testing.assert_array_equal(before[name], after[name])


def test_keep_best_by_top1_writes_the_epoch_with_the_best_val_top1(data, tmp_path):
    train, val = data
    kept, history = train_model(tiny_cnn("none"), train, val, epochs=3, lr=2e-2, batch_size=32, keep_best=True,
                                keep_best_by="top1", workdir=tmp_path, progress=False)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]       # epoch 0: the input as given
    best = max(history, key=lambda h: h["val_top1"])["epoch"]  # the first of equal ones
    assert [h["kept"] for h in history] == [h["epoch"] == best for h in history] and best > 0
    top1 = float(np.mean(ort_run(kept, val["input"]).argmax(1) == val["labels"]))
    assert top1 == pytest.approx(history[best]["val_top1"])


def test_qat_exports_qdq_with_trained_weights_and_scales(data, tmp_path):
    train, val = data
    model = tiny_cnn("qdq")
    trained, history = train_model(model, train, val, epochs=2, lr=1e-2, batch_size=32, learn_scales=True,
                                   fix_activations=True, workdir=tmp_path, progress=False)
    ops = [n.op_type for n in trained.graph.node]
    assert ops == [n.op_type for n in model.graph.node]  # the input's QDQ structure, nothing else
    engine = evaluate_training_engine(tmp_path, {"input": val["input"]})
    np.testing.assert_allclose(ort_run(trained, val["input"]), engine, rtol=1e-5, atol=1e-5)
    before, after = params(model), params(trained)
    assert not np.array_equal(before["conv.w_scale"], after["conv.w_scale"])  # learned weight scale
    np.testing.assert_array_equal(before["relu_scale"], after["relu_scale"])   # fixed activation scale
    assert after["conv.w_zp"].dtype == np.int8 and after["relu_zp"].dtype == np.uint8
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_bn_trains_in_batch_mode_unless_frozen(tmp_path):
    model = make_small_cnn()
    rng = np.random.default_rng(0)
    train = {"input": rng.random((64, 1, 8, 8), dtype=np.float32), "labels": rng.integers(0, 3, 64)}
    moving, _ = train_model(model, train, epochs=1, batch_size=16, workdir=tmp_path / "a", progress=False)
    frozen, _ = train_model(model, train, epochs=1, batch_size=16, freeze_bn=True, workdir=tmp_path / "b",
                            progress=False)
    before = params(model)
    assert [n.op_type for n in frozen.graph.node] == [n.op_type for n in model.graph.node]
    for name in ("bn1.mean", "bn1.var"):
        assert not np.allclose(params(moving)[name], before[name]), name  # ORT updated running stats
        np.testing.assert_array_equal(params(frozen)[name], before[name])
    for name in ("bn1.scale", "bn1.bias"):
        assert not np.array_equal(params(frozen)[name], before[name]), name
    x = train["input"][:8]
    np.testing.assert_allclose(ort_run(moving, x), evaluate_training_engine(tmp_path / "a", {"input": x}),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ort_run(frozen, x), evaluate_training_engine(tmp_path / "b", {"input": x}),
                               rtol=1e-5, atol=1e-5)


def test_parameter_classification_of_forward_fused_bn_and_scales():
    from qgraph.fakequant import to_training_form

    training, info = to_training_form(tiny_cnn("qdq"))
    trainable, frozen = classify_parameters(training, info.learned_scales, info.fixed_scales)
    assert trainable == ["bn.bias", "bn.weight", "conv.bias", "conv.weight", "fc.bias", "fc.weight"]
    assert {"bn.running_mean", "bn.running_var", "bn.eps", "conv.w_scale", "relu_scale"} <= set(frozen)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_is_deterministic_for_a_seed(data, tmp_path, optimizer):
    train, _ = data
    kwargs = dict(epochs=3, lr=1e-2, batch_size=64, optimizer=optimizer, warmup_steps=3, progress=False)
    full, history = train_model(tiny_cnn("qdq"), train, workdir=tmp_path / "full", **kwargs)
    again, _ = train_model(tiny_cnn("qdq"), train, workdir=tmp_path / "again", **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(params(full).values(), params(again).values()))
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_resume_after_kill_9_mid_epoch(tmp_path):
    """SIGKILL during epoch 2; resuming loses at most that epoch and gives the uninterrupted result."""
    workdir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        import qgraph.train as train
        from test_fakequant import tiny_cnn, digits_like
        step = train._Stepper.step
        def slow_step(self):  # make an epoch long enough to be killed in
            time.sleep(0.01)
            step(self)
        train._Stepper.step = slow_step
        train.train_model(tiny_cnn("qdq"), digits_like(384), epochs=3, lr=1e-2, batch_size=8,
                          schedule="constant", workdir={str(workdir)!r}, resume=True, progress=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    progress = workdir / "progress.json"
    deadline = time.time() + 60
    while time.time() < deadline and child.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["epoch"] == 1:
            break
        time.sleep(0.02)
    time.sleep(0.2)  # well inside epoch 2 (48 steps of >= 10 ms)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert json.loads(progress.read_text())["epoch"] == 1
    kwargs = dict(epochs=3, lr=1e-2, batch_size=8, schedule="constant", progress=False)
    resumed, history = train_model(tiny_cnn("qdq"), digits_like(384), workdir=workdir, resume=True, **kwargs)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    straight, _ = train_model(tiny_cnn("qdq"), digits_like(384), workdir=tmp_path / "straight", **kwargs)
    for name, value in params(straight).items():
        np.testing.assert_array_equal(params(resumed)[name], value, err_msg=name)


def test_resume_with_another_models_checkpoint_is_refused(data, tmp_path):
    train, _ = data
    train_model(tiny_cnn("none"), train, epochs=1, workdir=tmp_path, progress=False)
    with pytest.raises(TrainError, match="belongs to another model"):
        train_model(tiny_cnn("none", seed=3), train, epochs=2, workdir=tmp_path, resume=True, progress=False)


def test_data_without_labels_is_refused(data, tmp_path):
    with pytest.raises(DataError, match="no 'labels'"):
        train_model(tiny_cnn("none"), {"input": data[0]["input"]}, workdir=tmp_path, progress=False)


def test_labels_out_of_range_are_refused(data, tmp_path):
    train = dict(data[0])
    train["labels"] = train["labels"].copy()
    train["labels"][5] = 10
    with pytest.raises(DataError, match=r"labels'\[5\] = 10 is outside \[0, 10\)"):
        train_model(tiny_cnn("none"), train, workdir=tmp_path, progress=False)


def test_model_without_trainable_parameters_is_refused(data, tmp_path):
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]),
             helper.make_node("Slice", ["flat", "start", "end"], ["logits"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "start"),
             numpy_helper.from_array(np.array([10], np.int64), "end")]
    graph = helper.make_graph(nodes, "no_params",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(TrainError, match="no trainable parameters"):
        train_model(model, data[0], workdir=tmp_path, progress=False)


def test_loss_given_as_onnx_graph_and_mse(data, tmp_path):
    train, val = data
    loss_graph = helper.make_graph(
        [helper.make_node("SoftmaxCrossEntropyLoss", ["prediction", "labels"], ["loss", "log_prob"],
                          reduction="mean")],
        "ce", [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, ["N", 10]),
               helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])])
    loss_path = tmp_path / "ce_loss.onnx"
    onnx.save(helper.make_model(loss_graph, opset_imports=[helper.make_opsetid("", 17)]), loss_path)
    kwargs = dict(epochs=2, lr=1e-2, batch_size=64, progress=False)
    _, builtin = train_model(tiny_cnn("none"), train, workdir=tmp_path / "a", **kwargs)
    _, custom = train_model(tiny_cnn("none"), train, workdir=tmp_path / "b", loss=str(loss_path), **kwargs)
    assert [h["train_loss"] for h in custom] == pytest.approx([h["train_loss"] for h in builtin], rel=1e-6)
    _, mse = train_model(tiny_cnn("none"), train, val, workdir=tmp_path / "c", loss="mse", **kwargs)
    assert mse[-1]["train_loss"] < mse[0]["train_loss"] and mse[0]["val_top1"] is None


def test_adamw_runs_in_pytorch_mode(tmp_path):
    """ORT's onnxblock writes Hugging Face-mode AdamW (eps before bias correction); qgraph switches
    the optimizer graph to mode 0, torch.optim.AdamW's update, so `adamw` means what users expect."""
    from qgraph.ort_training import generate_training_artifacts
    model = make_small_cnn()
    weights = [i.name for i in model.graph.initializer if not i.name.startswith("bn1.")]
    frozen = [i.name for i in model.graph.initializer if i.name.startswith("bn1.")]
    generate_training_artifacts(model, weights, frozen, tmp_path, optimizer="adamw")
    optimizer = onnx.load(str(tmp_path / "optimizer_model.onnx"))
    modes = [a.i for n in optimizer.graph.node if n.op_type == "AdamWOptimizer"
             for a in n.attribute if a.name == "adam_mode"]
    assert modes == [0]



def _scaled_weights(model: onnx.ModelProto, factors: dict[str, float]) -> onnx.ModelProto:
    for tensor in model.graph.initializer:
        if tensor.name in factors:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factors[tensor.name]),
                                                    tensor.name))
    return model


@pytest.mark.parametrize("relative", [False, True])
def test_relative_lr_moves_each_tensor_by_lr_times_its_rms(data, tmp_path, relative):
    """Adam's first step moves every element by about lr. A pretrained conv folded with a BN of
    running variance 1e7 (PP-OCRv4's detector head) has weights near 2e-5, which lr 3e-5 wipes
    out; with relative_lr each tensor moves by about lr times its RMS (rounded to a power of two)."""
    train, _ = data
    model = _scaled_weights(tiny_cnn("none", fused_bn=False), {"conv.weight": 0.02, "fc.weight": 20.0})
    lr = 1e-3
    trained, _ = train_model(model, {k: v[:64] for k, v in train.items()}, None, epochs=1, lr=lr, batch_size=64,
                             schedule="constant", relative_lr=relative, workdir=tmp_path, progress=False)
    before, after = params(model), params(trained)
    for name in ("conv.weight", "fc.weight"):
        rms = float(np.sqrt(np.mean(np.square(before[name], dtype=np.float64))))
        unit = 2.0 ** round(np.log2(max(rms, 1e-3))) if relative else 1.0
        step = np.median(np.abs(after[name] - before[name]))
        assert step == pytest.approx(lr * unit, rel=0.05), (name, rms, step)
    assert np.array_equal(before["conv.weight"] == 0, after["conv.weight"] == 0)


def test_relative_lr_exports_what_the_engine_computes(data, tmp_path):
    train, val = data
    model = tiny_cnn("qdq")
    trained, _ = train_model(model, train, val, epochs=1, lr=3e-2, batch_size=32, relative_lr=True,
                             workdir=tmp_path, progress=False)
    engine = evaluate_training_engine(tmp_path, {"input": val["input"]})
    np.testing.assert_allclose(ort_run(trained, val["input"]), engine, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ort_run(trained, val["input"]), ort_run(model, val["input"]), atol=1e-3)
    assert {t.name for t in trained.graph.initializer} == {t.name for t in model.graph.initializer}


# -- reliability: resume settings, non-finite values, the work folder --------------------------

def test_resume_refuses_other_settings_and_data_naming_them(data, tmp_path):
    train, val = data
    kwargs = dict(epochs=2, lr=1e-2, batch_size=32, progress=False)
    train_model(tiny_cnn("none"), train, val, workdir=tmp_path, **kwargs)
    with pytest.raises(TrainError, match=r"other settings: --lr 0\.01 \(now 0\.02\), --batch-size 32 \(now 16\)"):
        train_model(tiny_cnn("none"), train, val, workdir=tmp_path, resume=True,
                    **{**kwargs, "lr": 2e-2, "batch_size": 16})
    other = {k: v.copy() for k, v in train.items()}
    other["labels"][0] = (other["labels"][0] + 1) % 10
    with pytest.raises(TrainError, match="other --data"):
        train_model(tiny_cnn("none"), other, val, workdir=tmp_path, resume=True, **kwargs)
    with pytest.raises(TrainError, match="other settings: --weight-decay"):
        train_model(tiny_cnn("none"), train, val, workdir=tmp_path, resume=True, **{**kwargs, "weight_decay": 0.1})
    # the same settings: nothing left to train, the same result
    again, history = train_model(tiny_cnn("none"), train, val, workdir=tmp_path, resume=True, **kwargs)
    assert [h["epoch"] for h in history] == [1, 2]


def test_resume_with_fewer_or_more_epochs_of_a_linear_schedule_is_refused(data, tmp_path):
    train, _ = data
    train_model(tiny_cnn("none"), train, epochs=3, lr=1e-2, batch_size=64, workdir=tmp_path, progress=False)
    for epochs in (2, 4):
        with pytest.raises(TrainError, match=r"--epochs 3 \(3 done\).*resume with --epochs 3"):
            train_model(tiny_cnn("none"), train, epochs=epochs, lr=1e-2, batch_size=64, workdir=tmp_path,
                        resume=True, progress=False)


def test_resume_may_add_epochs_to_a_constant_schedule(data, tmp_path):
    train, _ = data
    kwargs = dict(lr=1e-2, batch_size=64, schedule="constant", progress=False)
    train_model(tiny_cnn("none"), train, epochs=1, workdir=tmp_path / "a", **kwargs)
    resumed, history = train_model(tiny_cnn("none"), train, epochs=2, workdir=tmp_path / "a", resume=True, **kwargs)
    straight, _ = train_model(tiny_cnn("none"), train, epochs=2, workdir=tmp_path / "b", **kwargs)
    assert [h["epoch"] for h in history] == [1, 2]
    for name, value in params(straight).items():
        np.testing.assert_array_equal(params(resumed)[name], value, err_msg=name)


def test_a_non_finite_loss_stops_training_naming_epoch_and_step_and_keeps_the_last_checkpoint(data, tmp_path,
                                                                                            monkeypatch):
    import qgraph.train as train_module
    train, _ = data
    workdir = tmp_path / "run"
    step = train_module._Stepper.step
    calls = {"n": 0}

    def poisoned_step(self):  # step 8 of epoch 2 (6 steps per epoch) writes NaN into a weight
        step(self)
        calls["n"] += 1
        if calls["n"] == 7:
            self.state.parameters["fc.weight"] = np.full_like(self.state.parameters["fc.weight"].data, np.nan)

    monkeypatch.setattr(train_module._Stepper, "step", poisoned_step)
    with pytest.raises(TrainError, match=r"epoch 2 step 2: the training loss is nan.*epoch1\.ckpt, stays in"):
        train_model(tiny_cnn("none"), train, epochs=3, lr=1e-2, batch_size=64, workdir=workdir, progress=False)
    progress = json.loads((workdir / "progress.json").read_text())
    assert progress["epoch"] == 1 and (workdir / "epoch1.ckpt").exists()


def test_a_learning_rate_that_diverges_is_an_error_not_a_nan_model(data, tmp_path):
    train, _ = data
    with pytest.raises(TrainError, match=r"epoch 1 step \d+: the training loss is (nan|inf)"):
        train_model(tiny_cnn("none"), train, epochs=1, lr=1e6, batch_size=64, optimizer="sgd", momentum=0.0,
                    workdir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()   # nothing to resume from: the folder it created is gone


def test_non_finite_training_data_is_refused_before_any_work(data, tmp_path):
    train = {k: v.copy() for k, v in data[0].items()}
    train["input"][7, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match="'input' holds NaN or Inf"):
        train_model(tiny_cnn("none"), train, workdir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_work_folder_never_loses_a_users_file(data, tmp_path):
    """Regression: `--workdir .` deleted every file named epoch* (the input model included)."""
    train, _ = data
    folder = tmp_path / "here"
    folder.mkdir()
    (folder / "epoch10.onnx").write_bytes(b"the user's model")
    with pytest.raises(TrainError, match="holds files qgraph did not create"):
        train_model(tiny_cnn("none"), train, workdir=folder, progress=False)
    assert (folder / "epoch10.onnx").read_bytes() == b"the user's model"
    # files a user drops into a qgraph work folder later survive checkpoint clean-up too
    workdir = tmp_path / "run"
    train_model(tiny_cnn("none"), train, epochs=1, schedule="constant", workdir=workdir, progress=False)
    (workdir / "epoch_notes.txt").write_text("mine")
    (workdir / "epoch10.onnx").write_bytes(b"mine")
    train_model(tiny_cnn("none"), train, epochs=2, schedule="constant", workdir=workdir, resume=True,
                progress=False)
    assert (workdir / "epoch_notes.txt").read_text() == "mine" and (workdir / "epoch10.onnx").exists()
    assert not (workdir / "epoch1.ckpt").exists() and (workdir / "epoch2.ckpt").exists()


def test_a_second_concurrent_run_on_one_work_folder_is_refused(data, tmp_path):
    from qgraph.workdir import Workdir
    train, _ = data
    with Workdir.open(tmp_path / "run") as held:
        with pytest.raises(TrainError, match="another qgraph train is using this work folder"):
            train_model(tiny_cnn("none"), train, workdir=tmp_path / "run", progress=False)
        assert held.path.is_dir()
    train_model(tiny_cnn("none"), train, workdir=tmp_path / "run", progress=False)   # free again


def test_a_fixed_batch_model_trains_only_at_its_batch(data, tmp_path):
    train, _ = data
    model = tiny_cnn("none")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 32
    with pytest.raises(TrainError, match="fixed at 32; train with --batch-size 32"):
        train_model(model, train, batch_size=64, workdir=tmp_path / "a", progress=False)
    trained, history = train_model(model, train, batch_size=32, workdir=tmp_path / "b", progress=False)
    assert history[0]["train_loss"] > 0


@pytest.mark.parametrize("damage", ["truncated_checkpoint", "progress_not_json", "progress_wrong_fields"])
def test_a_damaged_work_folder_is_one_error_on_resume(data, tmp_path, damage):
    train, _ = data
    kwargs = dict(epochs=2, lr=1e-2, batch_size=64, schedule="constant", progress=False)
    train_model(tiny_cnn("none"), train, workdir=tmp_path, **{**kwargs, "epochs": 1})
    if damage == "truncated_checkpoint":
        ckpt = tmp_path / "epoch1.ckpt"
        ckpt.write_bytes(ckpt.read_bytes()[:100])
        expect = "cannot load the checkpoint"
    elif damage == "progress_not_json":
        (tmp_path / "progress.json").write_text("{epoch: 1")
        expect = "unreadable progress record"
    else:
        (tmp_path / "progress.json").write_text(json.dumps({"epoch": "one", "checkpoint": 5, "history": {}}))
        expect = "unreadable progress record"
    with pytest.raises(TrainError, match=expect):
        train_model(tiny_cnn("none"), train, workdir=tmp_path, resume=True, **kwargs)


def _state_model() -> onnx.ModelProto:
    """logits = Flatten(Conv(x)) + Unsqueeze(mean of state over layers and hidden): a recurrent
    state [layers, batch, hidden] (Silero VAD's layout) next to a batch-first input."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]),
             helper.make_node("ReduceMean", ["state"], ["s"], axes=[0, 2], keepdims=0),
             helper.make_node("Flatten", ["h"], ["hf"]),
             helper.make_node("Unsqueeze", ["s", "one"], ["s2"]),
             helper.make_node("Add", ["hf", "s2"], ["y"])]
    graph = helper.make_graph(
        nodes, "state_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4]),
                               helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.full((1, 1, 2), 0.1, np.float32), "w"),
         numpy_helper.from_array(np.array([1], np.int64), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_input_batched_on_a_later_axis_trains_batch_first_and_comes_back_as_it_was(tmp_path):
    """The state given one whole value per sample ([S, 2, 1, 3]) trains batch-first (a Transpose in
    front of the graph), and the trained model takes it [2, N, 3] again."""
    model = _state_model()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 1, 4)).astype(np.float32)
    state = rng.standard_normal((32, 2, 1, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 32).astype(np.int64)
    trained, history = train_model(model, {"x": x, "state": state, "labels": labels}, workdir=tmp_path,
                                   progress=False, epochs=2, batch_size=8, lr=0.05)
    assert [(i.name, [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]) for i in trained.graph.input] \
        == [("x", ["N", 1, 4]), ("state", [2, "N", 3])]
    assert not [n for n in trained.graph.node if n.op_type == "Transpose"]
    w = next(numpy_helper.to_array(t) for t in trained.graph.initializer if t.name == "w")
    assert not np.allclose(w, 0.1) and len(history) == 2
    batch_state = np.concatenate(list(state[:4]), axis=1)                     # [2, 4, 3]
    session = ort.InferenceSession(trained.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x[:4], "state": batch_state})[0]
    expected = np.stack([np.convolve(x[i, 0], w.reshape(-1)[::-1], "valid") for i in range(4)]) \
        + batch_state.mean(axis=(0, 2))[:, None]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_an_input_batched_on_another_axis_is_refused_naming_it(tmp_path):
    """Given batched along its first axis instead, nothing says which axis holds the samples."""
    data = {"x": np.zeros((4, 1, 4), np.float32), "state": np.zeros((2, 4, 3), np.float32),
            "labels": np.zeros(4, np.int64)}
    model = _state_model()
    for inp in model.graph.input:                # unnamed symbolic dims, as Silero VAD's main file has
        for d in inp.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = ""
    with pytest.raises(TrainError, match=r"input 'state' has shape \[2, 'N', 3\]: its batch is not its first axis"):
        train_model(model, data, workdir=tmp_path, progress=False)


def _if_model(on_gradient_path: bool) -> onnx.ModelProto:
    """y = If(sum(x·w) > 0) of Relu(x·w) (a branch reading the trained product: on the gradient
    path), or x·w times a constant the branch returns (only the condition reads the product)."""
    if on_gradient_path:
        body = [helper.make_node("Relu", ["h"], ["b_out"])]
        tail = []
        out = "y"
    else:
        body = [helper.make_node("Identity", ["k"], ["b_out"])]
        tail = [helper.make_node("Mul", ["h", "m"], ["y"])]
        out = "m"
    branch = helper.make_graph(body, "branch", [], [helper.make_tensor_value_info("b_out", TensorProto.FLOAT,
                                                                                   ["N", 3] if on_gradient_path else [1])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], [out], then_branch=branch, else_branch=branch), *tail]
    graph = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(np.full((4, 3), 0.2, np.float32), "w"),
                               numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                               numpy_helper.from_array(np.array([2.0], np.float32), "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_control_flow_on_the_gradient_path_is_refused_before_ort_aborts(tmp_path):
    """ORT 1.19's gradient builder aborts the process on an If that values reach the loss through;
    qgraph refuses first, naming the node. An If that only branches on them trains."""
    data = {"x": np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32),
            "labels": np.zeros(16, np.int64)}
    with pytest.raises(TrainError, match=r"node 'y' \(If\) lies between a trained parameter and the loss"):
        train_model(_if_model(True), data, workdir=tmp_path / "on", progress=False, epochs=1)
    trained, history = train_model(_if_model(False), data, workdir=tmp_path / "off", progress=False, epochs=1)
    assert len(history) == 1 and [n.op_type for n in trained.graph.node].count("If") == 1
