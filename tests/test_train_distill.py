"""Distillation: `train_model(..., teacher=float_model)` trains a quantized model to reproduce the
float model's outputs on unlabelled data (bundled real digits, the builders' lenet)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.api import apply_pipeline
from qgraph.diff import TensorStats
from qgraph.errors import ConfigError, TrainError
from qgraph.models.builders import build_model
from qgraph.models.datasets import load_dataset
from qgraph.runner import run_model
from qgraph.train import TrainConfig, evaluate_training_engine, train_model

TESTS = Path(__file__).parent


def fidelity(reference: onnx.ModelProto, model: onnx.ModelProto, inputs: dict, output: str = "logits"):
    stats = TensorStats(output, "float32")
    stats.update(run_model(reference, inputs)[output], run_model(model, inputs)[output])
    return stats


def params(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "val")


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory):
    train, val = digits
    model = build_model("lenet", input_shape=(1, 8, 8))
    trained, history = train_model(model, train, val, epochs=4, lr=1e-2, progress=False,
                                   workdir=tmp_path_factory.mktemp("teacher"))
    assert history[-1]["val_top1"] > 0.9
    return trained


@pytest.fixture(scope="module")
def w4_student(teacher, digits):
    return apply_pipeline(teacher, "qat", {"input": digits[0]["input"][:256]}, weight_bits=4)


def unlabelled(data: dict) -> dict:
    return {"input": data["input"]}


def test_distillation_without_labels_closes_most_of_the_w4_gap_and_exports_qdq(teacher, w4_student, digits,
                                                                                tmp_path):
    train, val = digits
    before = fidelity(teacher, w4_student, unlabelled(val))
    trained, history = train_model(w4_student, unlabelled(train), val, teacher=teacher, epochs=2, lr=1e-3,
                                   workdir=tmp_path, progress=False)
    after = fidelity(teacher, trained, unlabelled(val))
    assert 1 - after.cosine < 0.3 * (1 - before.cosine), (before.cosine, after.cosine)
    assert after.snr_db > before.snr_db + 6
    # the history reports what the exported model computes
    assert history[-1]["val_cosine"] == pytest.approx(after.cosine, abs=2e-4)
    assert history[-1]["val_outputs"]["logits"]["snr_db"] == pytest.approx(after.snr_db, abs=0.2)
    assert history[-1]["val_top1"] is not None            # the val data has labels: top-1 is reported too
    assert [h["epoch"] for h in history] == [0, 1, 2]     # epoch 0: the input's own fidelity
    assert history[0]["val_cosine"] == pytest.approx(before.cosine, abs=2e-4)
    assert history[1]["train_loss"] > history[2]["train_loss"]
    assert Counter(n.op_type for n in trained.graph.node) == Counter(n.op_type for n in w4_student.graph.node)
    engine = evaluate_training_engine(tmp_path, unlabelled(val), teacher=teacher)
    np.testing.assert_allclose(run_model(trained, unlabelled(val))["logits"], engine, rtol=1e-4, atol=1e-4)


def _loss_at_start(model, data, teacher, tmp_path, **options):
    """The first step's loss: lr so small that nothing moves, the whole data in one batch."""
    _, history = train_model(model, data, teacher=teacher, epochs=1, lr=1e-12, batch_size=len(data["input"]),
                             workdir=tmp_path, progress=False, **options)
    return history[0]["train_loss"]


def _log_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def test_the_loss_terms_are_relative_mse_kl_with_temperature_features_and_labels(teacher, w4_student, digits,
                                                                                  tmp_path):
    data = {k: v[:96] for k, v in digits[0].items()}
    x = unlabelled(data)
    t, s = (run_model(m, x)["logits"].astype(np.float64) for m in (teacher, w4_student))
    relative_mse = np.mean((s - t) ** 2) / np.mean(t ** 2)
    assert _loss_at_start(w4_student, x, teacher, tmp_path / "mse") == pytest.approx(relative_mse, rel=1e-4)

    T = 2.0
    lt, ls = _log_softmax(t / T), _log_softmax(s / T)
    kl = T * T * np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1))
    got = _loss_at_start(w4_student, x, teacher, tmp_path / "kl", distill_loss={"logits": "kl"}, temperature=T)
    assert got == pytest.approx(kl, rel=1e-3)

    feature = next(n.output[0] for n in teacher.graph.node if n.op_type == "Relu")
    ft, fs = (run_model(m, x, [feature])[feature].astype(np.float64) for m in (teacher, w4_student))
    feature_term = np.mean((fs - ft) ** 2) / np.mean(ft ** 2)
    labels = data["labels"]
    cross_entropy = -np.mean(_log_softmax(s)[np.arange(len(labels)), labels])
    got = _loss_at_start(w4_student, data, teacher, tmp_path / "mixed", feature=[feature], feature_weight=0.5,
                         label_weight=0.3)
    assert got == pytest.approx(relative_mse + 0.5 * feature_term + 0.3 * cross_entropy, rel=1e-4)


def test_softmax_outputs_default_to_kl_on_their_distribution(teacher, digits, tmp_path):
    def with_softmax(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.node[-1].output[0] = "raw_logits"
        out.graph.node.append(helper.make_node("Softmax", ["raw_logits"], ["logits"], axis=-1, name="softmax"))
        return out

    _assert_default_loss_is_kl(with_softmax(teacher), digits, tmp_path)


def test_a_softmax_behind_flatten_and_reshape_is_a_distribution_too(teacher, digits, tmp_path):
    """Paddle2ONNX writes PP-OCR's CTC output as Flatten -> Softmax(axis -1) -> Reshape; the last axis
    reaches the output whole, so the default term is KL along it, not MSE on probabilities."""
    def with_paddle_softmax(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.node[-1].output[0] = "raw_logits"
        out.graph.initializer.extend([numpy_helper.from_array(np.array([0, 2, 5], np.int64), "seq_shape"),
                                      numpy_helper.from_array(np.array([-1, 2, 5], np.int64), "out_shape")])
        out.graph.node.extend([
            helper.make_node("Reshape", ["raw_logits", "seq_shape"], ["seq_logits"], name="p2o_to_sequence"),
            helper.make_node("Flatten", ["seq_logits"], ["flat_logits"], axis=2, name="p2o_flatten"),
            helper.make_node("Softmax", ["flat_logits"], ["flat_probs"], axis=-1, name="p2o_softmax"),
            helper.make_node("Reshape", ["flat_probs", "out_shape"], ["logits"], name="p2o_reshape")])
        del out.graph.output[:]
        out.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, 5]))
        return out

    _assert_default_loss_is_kl(with_paddle_softmax(teacher), digits, tmp_path)


def _assert_default_loss_is_kl(probs_teacher, digits, tmp_path):
    """The distillation loss at the start equals KL(teacher ‖ student) over the last axis."""
    student = apply_pipeline(probs_teacher, "qat", {"input": digits[0]["input"][:256]}, weight_bits=4)
    x = unlabelled({k: v[:64] for k, v in digits[0].items()})
    pt = run_model(probs_teacher, x)["logits"].astype(np.float64)
    ps = run_model(student, x)["logits"].astype(np.float64)
    kl = np.mean(np.sum(pt * (np.log(np.maximum(pt, 1e-30)) - np.log(np.maximum(ps, 1e-30))), axis=-1))
    assert _loss_at_start(student, x, probs_teacher, tmp_path) == pytest.approx(kl, rel=1e-3, abs=1e-7)


def _signal_model(seed: int = 0) -> onnx.ModelProto:
    """A 1-D model on a signal of any length [N, 1, L] (each digit read as 64 samples): Conv1d-Relu,
    two outputs: class scores (Softmax over global features) and a per-position Sigmoid map [N, 4, L]."""
    rng = np.random.default_rng(seed)

    def f(name, shape, scale=0.5):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["signal", "c.w", "c.b"], ["feat"], pads=[1, 1], name="conv"),
             helper.make_node("Relu", ["feat"], ["act"], name="relu"),
             helper.make_node("Conv", ["act", "m.w"], ["map_logits"], name="map_conv"),
             helper.make_node("Sigmoid", ["map_logits"], ["map"], name="sigmoid"),
             helper.make_node("GlobalAveragePool", ["act"], ["pooled"], name="gap"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["scores_logits"], transB=1, name="fc"),
             helper.make_node("Softmax", ["scores_logits"], ["scores"], axis=-1, name="softmax")]
    inits = [f("c.w", (8, 1, 3)), f("c.b", (8,), 0.1), f("m.w", (4, 8, 1)), f("fc.w", (10, 8)), f("fc.b", (10,), 0.1)]
    graph = helper.make_graph(nodes, "signal", [helper.make_tensor_value_info("signal", TensorProto.FLOAT,
                                                                             ["N", 1, "L"])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10]),
                               helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", 4, "L"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_several_outputs_dynamic_length_and_non_image_input(digits, tmp_path):
    train, val = ({"signal": d["input"].reshape(len(d["input"]), 1, 64)} for d in digits)
    teacher = _signal_model()
    student = apply_pipeline(teacher, "ptq", {"signal": train["signal"][:256]}, weight_bits=4)
    before = {name: fidelity(teacher, student, val, name) for name in ("scores", "map")}
    trained, history = train_model(student, train, val, teacher=teacher, epochs=2, lr=3e-3, workdir=tmp_path,
                                   progress=False)
    assert set(history[-1]["val_outputs"]) == {"scores", "map"}
    for name in ("scores", "map"):
        after = fidelity(teacher, trained, val, name)
        assert after.snr_db > before[name].snr_db, (name, before[name].snr_db, after.snr_db)
    # the exported model keeps its dynamic length: it runs on a signal of another length
    short = run_model(trained, {"signal": train["signal"][:4, :, :40]})
    assert short["map"].shape == (4, 4, 40)


def test_a_model_with_a_fixed_batch_of_one_distills_one_sample_per_step(teacher, w4_student, digits, tmp_path):
    def batch_one(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for value in (*out.graph.input, *out.graph.output):
            value.type.tensor_type.shape.dim[0].dim_value = 1
        return out

    data = unlabelled({k: v[:24] for k, v in digits[0].items()})
    with pytest.raises(TrainError, match="fixed at 1; train with --batch-size 1"):
        train_model(batch_one(w4_student), data, teacher=batch_one(teacher), workdir=tmp_path / "a", progress=False)
    trained, history = train_model(batch_one(w4_student), data, teacher=batch_one(teacher), batch_size=1, lr=1e-3,
                                   workdir=tmp_path / "b", progress=False)
    assert history[0]["train_loss"] > 0
    assert trained.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_resume_refuses_another_teacher_and_other_distillation_settings(teacher, w4_student, digits, tmp_path):
    data = unlabelled({k: v[:128] for k, v in digits[0].items()})
    kwargs = dict(epochs=2, lr=1e-3, schedule="constant", progress=False, workdir=tmp_path)
    train_model(w4_student, data, teacher=teacher, **{**kwargs, "epochs": 1})
    other = onnx.ModelProto()
    other.CopyFrom(teacher)
    other.graph.initializer[0].raw_data = bytes(len(other.graph.initializer[0].raw_data))
    with pytest.raises(TrainError, match="another --teacher model"):
        train_model(w4_student, data, teacher=other, resume=True, **kwargs)
    with pytest.raises(TrainError, match=r"--temperature 1\.0 \(now 2\.0\)"):
        train_model(w4_student, data, teacher=teacher, resume=True, temperature=2.0, **kwargs)
    with pytest.raises(TrainError, match=r"--distill-loss \{\} \(now \{'logits': 'kl'\}\)"):
        train_model(w4_student, data, teacher=teacher, resume=True, distill_loss={"logits": "kl"}, **kwargs)
    resumed, history = train_model(w4_student, data, teacher=teacher, resume=True, **kwargs)
    straight, _ = train_model(w4_student, data, teacher=teacher, **{**kwargs, "workdir": tmp_path / "straight"})
    assert [h["epoch"] for h in history] == [1, 2]
    for name, value in params(straight).items():
        np.testing.assert_array_equal(params(resumed)[name], value, err_msg=name)


def test_resume_after_kill_9_gives_the_uninterrupted_result(teacher, w4_student, digits, tmp_path):
    workdir = tmp_path / "run"
    onnx.save(teacher, tmp_path / "teacher.onnx")
    onnx.save(w4_student, tmp_path / "student.onnx")
    script = textwrap.dedent(f"""
        import time, onnx
        import qgraph.train as train
        from qgraph.models.datasets import load_dataset
        step = train._Stepper.step
        def slow_step(self):
            time.sleep(0.01)
            step(self)
        train._Stepper.step = slow_step
        data = {{"input": load_dataset("digits", "train")["input"][:384]}}
        train.train_model(onnx.load({str(tmp_path / 'student.onnx')!r}), data,
                          teacher=onnx.load({str(tmp_path / 'teacher.onnx')!r}), epochs=3, lr=1e-3, batch_size=8,
                          schedule="constant", workdir={str(workdir)!r}, resume=True, progress=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    progress = workdir / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["epoch"] == 1:
            break
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert json.loads(progress.read_text())["epoch"] == 1
    data = {"input": digits[0]["input"][:384]}
    kwargs = dict(teacher=teacher, epochs=3, lr=1e-3, batch_size=8, schedule="constant", progress=False)
    resumed, history = train_model(w4_student, data, workdir=workdir, resume=True, **kwargs)
    straight, _ = train_model(w4_student, data, workdir=tmp_path / "straight", **kwargs)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for name, value in params(straight).items():
        np.testing.assert_array_equal(params(resumed)[name], value, err_msg=name)


def test_a_non_finite_distillation_loss_stops_naming_epoch_and_step(teacher, digits, tmp_path, monkeypatch):
    """(A float student: FakeQuant would clamp a NaN weight's output into range.)"""
    import qgraph.train as train_module
    step = train_module._Stepper.step
    calls = {"n": 0}

    def poisoned_step(self):   # after step 7 (4 steps per epoch) a weight holds NaN: epoch 2 step 4 fails
        step(self)
        calls["n"] += 1
        if calls["n"] == 7:
            name = next(n for n, p in self.state.parameters if p.requires_grad)
            self.state.parameters[name] = np.full_like(self.state.parameters[name].data, np.nan)

    monkeypatch.setattr(train_module._Stepper, "step", poisoned_step)
    data = unlabelled({k: v[:256] for k, v in digits[0].items()})
    with pytest.raises(TrainError, match=r"epoch 2 step 4: the distillation loss is nan.*epoch1\.ckpt, stays in"):
        train_model(teacher, data, teacher=teacher, epochs=3, lr=1e-3, workdir=tmp_path, progress=False)


def _renamed_output(model, name):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        node.output[:] = [name if o == "logits" else o for o in node.output]
    out.graph.output[0].name = name
    return out


@pytest.mark.parametrize("case, expect", [
    ("outputs differ", r"the model's output 'logits' is not an output of the teacher \(its outputs: probs\)"),
    ("input differs", r"--teacher: its input 'pixels' is not an input of the model"),
    ("shape differs", r"output 'logits' has shape \[64, 5\] in the teacher and \[64, 10\] in the model"),
    ("unknown feature", r"--feature 'relu_9': the model has no tensor of that name"),
    ("unknown distill output", r"--distill-loss 'probs': the model has no float output of that name"),
    ("feature is an output", r"--feature 'logits' is a model output"),
    ("loss without label weight", r"--loss 'mse' is the loss on the labels"),
    ("setting without teacher", r"--temperature is a distillation setting; give the float model as --teacher"),
])
def test_a_teacher_that_does_not_fit_is_one_clear_error_before_any_work(teacher, w4_student, digits, tmp_path,
                                                                         case, expect):
    data = unlabelled({k: v[:64] for k, v in digits[0].items()})
    options: dict = {"teacher": teacher}
    if case == "outputs differ":
        options["teacher"] = _renamed_output(teacher, "probs")
    elif case == "input differs":
        other = onnx.ModelProto()
        other.CopyFrom(teacher)
        other.graph.input[0].name = "pixels"
        for node in other.graph.node:
            node.input[:] = ["pixels" if i == "input" else i for i in node.input]
        options["teacher"] = other
    elif case == "shape differs":
        other = onnx.ModelProto()
        other.CopyFrom(teacher)
        other.graph.node.append(helper.make_node("Slice", ["logits_full", "s0", "s5", "s1"], ["logits"]))
        other.graph.node[-2].output[0] = "logits_full"
        other.graph.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), n)
                                        for n, v in (("s0", 0), ("s5", 5), ("s1", 1))])
        del other.graph.output[0].type.tensor_type.shape.dim[:]
        options["teacher"] = other
    elif case == "unknown feature":
        options["feature"] = ["relu_9"]
    elif case == "unknown distill output":
        options["distill_loss"] = {"probs": "kl"}
    elif case == "feature is an output":
        options["feature"] = ["logits"]
    elif case == "loss without label weight":
        options["loss"] = "mse"
    else:
        options = {"temperature": 2.0}
    with pytest.raises(TrainError, match=expect):
        train_model(w4_student, data, workdir=tmp_path / "run", progress=False, **options)
    assert not (tmp_path / "run").exists()


def test_bad_distillation_settings_are_refused_by_name():
    from qgraph.api import parse_assignments
    from qgraph.train import TrainConfig
    with pytest.raises(ConfigError, match="--temperature must be a number > 0"):
        TrainConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="--distill-loss must be a mapping"):
        TrainConfig(distill_loss={"logits": "hinge"})
    with pytest.raises(ConfigError, match="--label-weight must be a number >= 0"):
        TrainConfig(label_weight=-1.0)
    with pytest.raises(ConfigError, match="--distill-loss 'logits' must be NAME=VALUE"):
        parse_assignments(["logits"], "--distill-loss")
    assert parse_assignments(["a=b=kl", "logits=mse"], "--distill-loss") == {"a=b": "kl", "logits": "mse"}


def test_keep_best_writes_the_epoch_with_the_lowest_validation_loss_the_input_included(teacher, w4_student, digits,
                                                                                        tmp_path):
    train, val = unlabelled(digits[0]), {k: v[:128] for k, v in digits[1].items()}
    # a learning rate that wrecks the model: no epoch beats the input, which comes back unchanged
    wrecked, history = train_model(w4_student, train, val, teacher=teacher, epochs=2, lr=3.0, keep_best=True,
                                   workdir=tmp_path / "wrecked", progress=False)
    assert [h["kept"] for h in history] == [True, False, False]
    assert history[1]["val_loss"] > history[0]["val_loss"]
    for name, value in params(w4_student).items():
        np.testing.assert_array_equal(params(wrecked)[name], value, err_msg=name)
    # a good one: the best epoch's parameters, also after a resume that adds nothing
    kwargs = dict(teacher=teacher, epochs=3, lr=1e-3, keep_best=True, schedule="constant", progress=False)
    kept, history = train_model(w4_student, train, val, workdir=tmp_path / "good", **kwargs)
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert best > 0 and [h["kept"] for h in history] == [h["epoch"] == best for h in history]
    assert fidelity(teacher, kept, unlabelled(val)).cosine == pytest.approx(history[best]["val_cosine"], abs=2e-4)
    again, _ = train_model(w4_student, train, val, workdir=tmp_path / "good", resume=True, **kwargs)
    for name, value in params(kept).items():
        np.testing.assert_array_equal(params(again)[name], value, err_msg=name)
    with pytest.raises(TrainError, match="--keep-best picks the epoch with the lowest validation loss; give --val"):
        train_model(w4_student, train, teacher=teacher, keep_best=True, workdir=tmp_path / "noval", progress=False)


@pytest.mark.parametrize("by, key, sign", [("cosine", "val_cosine", 1), ("snr", "val_snr_db", 1),
                                           ("loss", "val_loss", -1)])
def test_keep_best_by_fidelity_writes_the_epoch_closest_to_the_teacher(teacher, w4_student, digits, tmp_path,
                                                                       by, key, sign):
    train, val = unlabelled(digits[0]), {k: v[:128] for k, v in digits[1].items()}
    kwargs = dict(teacher=teacher, epochs=3, lr=1e-3, keep_best=True, keep_best_by=by, schedule="constant",
                  progress=False)
    kept, history = train_model(w4_student, train, val, workdir=tmp_path / by, **kwargs)
    best = max(history, key=lambda h: sign * h[key])["epoch"]
    assert best > 0 and [h["kept"] for h in history] == [h["epoch"] == best for h in history]
    assert fidelity(teacher, kept, unlabelled(val)).cosine == pytest.approx(history[best]["val_cosine"], abs=2e-4)
    # a resume keeps what was compared: the same setting resumes, another one is refused by name
    again, _ = train_model(w4_student, train, val, workdir=tmp_path / by, resume=True, **kwargs)
    for name, value in params(kept).items():
        np.testing.assert_array_equal(params(again)[name], value, err_msg=name)
    other = "loss" if by != "loss" else "cosine"
    with pytest.raises(TrainError, match=f"--keep-best-by {by!r} \\(now {other!r}\\)"):
        train_model(w4_student, train, val, workdir=tmp_path / by, resume=True, **{**kwargs, "keep_best_by": other})


def test_keep_best_by_fidelity_needs_keep_best_and_a_teacher(teacher, w4_student, digits, tmp_path):
    train, val = digits
    with pytest.raises(TrainError, match="--keep-best-by cosine chooses what --keep-best compares; give --keep-best"):
        train_model(w4_student, unlabelled(train), val, teacher=teacher, keep_best_by="cosine",
                    workdir=tmp_path / "a", progress=False)
    with pytest.raises(TrainError, match="--keep-best-by is a distillation setting; give the float model"):
        train_model(w4_student, train, val, keep_best=True, keep_best_by="snr", workdir=tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="--keep-best-by must be one of"):
        TrainConfig(keep_best_by="accuracy")
    with pytest.raises(TrainError, match="--keep-best-by top1 compares each epoch's top-1 on the --val labels"):
        train_model(w4_student, unlabelled(train), unlabelled(val), teacher=teacher, keep_best=True,
                    keep_best_by="top1", workdir=tmp_path / "c", progress=False)
