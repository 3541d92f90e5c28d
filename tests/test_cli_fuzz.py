"""Every CLI command over a generated matrix of bad input: broken models, bad data, bad options,
hostile YAML and output paths that alias inputs. For each case the promise of the README holds:
exit code 2, exactly one `error:` line on stderr (warnings aside), no traceback, no internal
error, no new file anywhere in the work folder, and every file there byte-identical.

The matrix runs in-process (click's CliRunner) from one template folder copied per case.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import make_small_cnn, small_data
from qgraph.cli import main


@dataclass(frozen=True)
class Case:
    """One bad invocation. `args` may name files of the template folder; `prepare(folder)`
    makes extra files (FIFOs, links, folders) inside the case's own folder first."""
    id: str
    args: tuple
    expect: str = ""                      # regex the error line must match (case-insensitive)
    prepare: object = None
    env: dict = field(default_factory=dict)


# -- the template folder: good files and bad files, built once ----------------------------------

def _write_model(path, model):
    onnx.save(model, str(path))


def _gemm_mismatch():
    """The checker and shape inference accept it (the mismatch hides behind a Reshape to
    [-1, 64]); ORT refuses to run it: Gemm's weight wants 5 features."""
    w = numpy_helper.from_array(np.ones((3, 5), np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 64], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["flat"], name="reshape"),
             helper.make_node("Gemm", ["flat", "w"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [w, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _no_inputs():
    value = helper.make_tensor("v", TensorProto.FLOAT, [1, 3], [1.0, 2.0, 3.0])
    nodes = [helper.make_node("Constant", [], ["c"], value=value, name="const"),
             helper.make_node("Relu", ["c"], ["logits"], name="relu")]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _custom_op(model):
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.node[2].domain = "com.acme"   # Relu from a domain no runtime has
    bad.opset_import.add(domain="com.acme", version=1)
    return bad


def _with_metadata(model, key, value):
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    kept = [(p.key, p.value) for p in bad.metadata_props if p.key != key]
    del bad.metadata_props[:]
    for k, v in kept + [(key, value)]:
        bad.metadata_props.add(key=k, value=v)
    return bad


def _fixed_batch(model, batch):
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    fixed.graph.output[0].type.tensor_type.shape.dim[0].dim_value = batch
    return fixed


def _renamed_output(model, name):
    """A teacher whose output has another name than the student's."""
    other = onnx.ModelProto()
    other.CopyFrom(model)
    old = other.graph.output[0].name
    for node in other.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    other.graph.output[0].name = name
    return other


def _renamed_input(model, name):
    """A teacher that reads an input the student does not have."""
    other = onnx.ModelProto()
    other.CopyFrom(model)
    old = other.graph.input[0].name
    for node in other.graph.node:
        node.input[:] = [name if i == old else i for i in node.input]
    other.graph.input[0].name = name
    return other


def _external_missing(folder, model):
    path = folder / "external.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)   # saving with external data rewrites the tensors in place
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.onnx.data", size_threshold=0)
    os.unlink(folder / "external.onnx.data")


def _yaml_bomb(levels=9, where="top"):
    """A "billion laughs" document: each anchor is a list of nine references to the previous one."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    bomb = "[" + ", ".join(anchors) + "]"
    if where == "top":
        return f"lol: {bomb}\npasses: [canonicalize]\n"
    return f"passes:\n  - normalize:\n      skip: {bomb}\n"


PIPELINES = {
    "bomb_top.yaml": _yaml_bomb(where="top"),
    "bomb_param.yaml": _yaml_bomb(where="param"),
    "dup_top.yaml": "passes: [canonicalize]\npasses: [canonicalize]\n",
    "dup_param.yaml": "passes:\n  - calibrate: {observer: minmax, observer: entropy}\n",
    "passes_int.yaml": "passes: 5\n",
    "passes_str.yaml": "passes: canonicalize\n",
    "pass_name_int.yaml": "passes:\n  - 5\n",
    "pass_name_none.yaml": "passes:\n  - null\n",
    "pass_two_keys.yaml": "passes:\n  - {canonicalize: {}, fuse_conv_bn: {}}\n",
    "data_list.yaml": "data: [a.npz]\npasses: [canonicalize]\n",
    "data_int.yaml": "data: 5\npasses: [canonicalize]\n",
    "data_missing.yaml": "data: nowhere.npz\npasses: [canonicalize, insert_qdq, calibrate]\n",
    "data_bad_file.yaml": "data: noise.npz\npasses: [canonicalize, insert_qdq, calibrate]\n",
    "seed_true.yaml": "seed: true\npasses: [canonicalize]\n",
    "seed_float.yaml": "seed: 1.5\npasses: [canonicalize]\n",
    "seed_negative.yaml": "seed: -1\npasses: [canonicalize]\n",
    "seed_string.yaml": "seed: abc\npasses: [canonicalize]\n",
    "python_tag.yaml": "passes: !!python/object/apply:os.system ['echo pwned']\n",
    "python_name.yaml": "passes:\n  - canonicalize: !!python/name:os.system\n",
    "deep.yaml": "passes: " + "[" * 2000 + "]" * 2000 + "\n",
    "empty.yaml": "",
    "comment.yaml": "# nothing here\n",
    "tabs.yaml": "passes:\n\t- canonicalize\n",
    "unknown_top.yaml": "pases: [canonicalize]\n",
    "unknown_pass.yaml": "passes: [fuse_everything]\n",
    "bad_param.yaml": "passes:\n  - canonicalize: {fold: true}\n",
    "params_list.yaml": "passes:\n  - canonicalize: [1, 2]\n",
    "params_int.yaml": "passes:\n  - canonicalize: 3\n",
    "scalar_doc.yaml": "42\n",
    "percentile_str.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {observer: percentile, observer_params: {percentile: high}}\n",
    "percentile_range.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {observer: percentile, observer_params: {percentile: 250}}\n",
    "fixed_range_str.yaml": "passes:\n  - insert_qdq: {rules: [{op_type: Relu, activations: {fixed_range: [a, b]}}]}\n",
    "fixed_range_len.yaml": "passes:\n  - insert_qdq: {rules: [{op_type: Relu, activations: {fixed_range: [1, 2, 3]}}]}\n",
    "fixed_range_order.yaml": "passes:\n  - insert_qdq: {rules: [{op_type: Relu, activations: {fixed_range: [2, 1]}}]}\n",
    "fixed_range_key.yaml": "passes:\n  - insert_qdq: {rules: [{op_type: Relu, fixed_range: [0, 1]}]}\n",
    "fixed_range_nan.yaml": "passes:\n  - insert_qdq: {activations: {fixed_range: [.nan, 1]}}\n",
    "avg_const_str.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {observer: moving_average, observer_params: {averaging_constant: x}}\n",
    "avg_const_range.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {observer: moving_average, observer_params: {averaging_constant: 5}}\n",
    "bins_zero.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {observer: entropy, observer_params: {bins: 0}}\n",
    "observer_params_list.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {observer_params: [1]}\n",
    "observer_bogus.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {observer: bogus}\n",
    "max_samples_neg.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {max_samples: -5}\n",
    "max_samples_str.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {max_samples: many}\n",
    "bits_99.yaml": "passes:\n  - insert_qdq: {weights: {bits: 99}}\n",
    "bits_0.yaml": "passes:\n  - insert_qdq: {activations: {bits: 0}}\n",
    "bits_str.yaml": "passes:\n  - insert_qdq: {weights: {bits: '8'}}\n",
    "bits_float.yaml": "passes:\n  - insert_qdq: {weights: {bits: 7.5}}\n",
    "per_channel_str.yaml": "passes:\n  - insert_qdq: {weights: {per_channel: 'yes'}}\n",
    "weights_list.yaml": "passes:\n  - insert_qdq: {weights: [8]}\n",
    "rules_str.yaml": "passes:\n  - insert_qdq: {rules: everything}\n",
    "rules_unknown_key.yaml": "passes:\n  - insert_qdq: {rules: [{nmae: conv1, skip: true}]}\n",
    "rules_bad_regex.yaml": "passes:\n  - insert_qdq: {rules: [{regex: '(', skip: true}]}\n",
    "rules_item_int.yaml": "passes:\n  - insert_qdq: {rules: [5]}\n",
    "fuse_mode.yaml": "passes:\n  - fuse_conv_bn: {mode: sideways}\n",
    "fix_act_str.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {fix_activations: 'yes'}\n",
    "normalize_neg.yaml": "passes:\n  - normalize: {weight: -1}\n",
    "equalize_iter.yaml": "passes:\n  - equalize: {iterations: -3}\n",
    "lower_target.yaml": "passes:\n  - insert_qdq: {}\n  - calibrate: {}\n  - lower: {target: fpga}\n",
    "calibrate_first.yaml": "passes:\n  - calibrate: {}\n",
}
BINARY_PIPELINES = {
    "non_utf8.yaml": "passes: [canonicalize]\n# caf\xe9\n".encode("latin-1"),
    "binary.yaml": bytes(range(256)) * 8,
}


def _build_template(folder):
    model = make_small_cnn()
    _write_model(folder / "model.onnx", model)
    np.savez(folder / "data.npz", **small_data(16, seed=0))
    np.savez(folder / "val.npz", **small_data(8, seed=1))
    (folder / "pipe.yaml").write_text("passes:\n  - canonicalize: {}\n")
    (folder / "calib.yaml").write_text("passes: [canonicalize, insert_qdq, calibrate]\n")

    from qgraph.api import apply_pipeline
    from qgraph.lowering import lower_model
    data = small_data(16, seed=0)
    ptq = apply_pipeline(model, "ptq", data)
    _write_model(folder / "ptq.onnx", ptq)
    _write_model(folder / "lowered.onnx", lower_model(ptq, "qlinear")[0])

    # bad models
    rng = np.random.default_rng(0)
    (folder / "noise.onnx").write_bytes(rng.bytes(2048))
    (folder / "truncated.onnx").write_bytes((folder / "model.onnx").read_bytes()[:700])
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "text.onnx").write_text("this is not a model\n")
    (folder / "npz.onnx").write_bytes((folder / "data.npz").read_bytes())
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[0] = "ghost"
    _write_model(folder / "checker.onnx", broken)
    _external_missing(folder, model)
    _write_model(folder / "ort_rejects.onnx", _gemm_mismatch())
    _write_model(folder / "no_inputs.onnx", _no_inputs())
    _write_model(folder / "custom_op.onnx", _custom_op(model))
    _write_model(folder / "meta_json.onnx", _with_metadata(ptq, "qgraph.quantizers", "{not json"))
    _write_model(folder / "meta_type.onnx", _with_metadata(ptq, "qgraph.quantizers", "[1, 2, 3]"))
    _write_model(folder / "meta_record.onnx", _with_metadata(ptq, "qgraph.quantizers",
                                                             json.dumps({"x": {"kind": "activation"}})))
    _write_model(folder / "meta_flag.onnx", _with_metadata(ptq, "qgraph.calibrated", "\"maybe\""))
    records = json.loads({p.key: p.value for p in ptq.metadata_props}["qgraph.quantizers"])
    first = next(iter(records))
    records[first]["scael"] = records[first].pop("scale")
    _write_model(folder / "meta_typo.onnx", _with_metadata(ptq, "qgraph.quantizers", json.dumps(records)))
    _write_model(folder / "fixed_batch2.onnx", _fixed_batch(model, 2))
    _write_model(folder / "renamed_output.onnx", _renamed_output(model, "scores"))
    _write_model(folder / "other_input.onnx", _renamed_input(model, "pixels"))
    (folder / "model_dir.onnx").mkdir()

    # bad data
    np.save(folder / "plain.npy", np.zeros((4, 1, 8, 8), np.float32))
    os.replace(folder / "plain.npy", folder / "npy.npz")
    with zipfile.ZipFile(folder / "zip_text.npz", "w") as z:
        z.writestr("input.txt", "hello")
    np.savez(folder / "empty_npz.npz")
    (folder / "text.npz").write_text("input,labels\n0,1\n")
    (folder / "noise.npz").write_bytes(rng.bytes(4096))
    (folder / "truncated.npz").write_bytes((folder / "data.npz").read_bytes()[:600])
    good = small_data(16, seed=0)
    variants = {
        "missing_key": {"pixels": good["input"], "labels": good["labels"]},
        "dtype": {"input": good["input"].astype(np.float64), "labels": good["labels"]},
        "shape": {"input": good["input"][:, :, :4], "labels": good["labels"]},
        "rank": {"input": good["input"][:, 0], "labels": good["labels"]},
        "nan": {"input": np.where(np.arange(16)[:, None, None, None] == 3, np.nan, good["input"]).astype(np.float32),
                "labels": good["labels"]},
        "inf": {"input": np.where(good["input"] > 0.9, np.inf, good["input"]).astype(np.float32),
                "labels": good["labels"]},
        "lengths": {"input": good["input"], "labels": good["labels"][:5]},
        "zero_rows": {"input": good["input"][:0], "labels": good["labels"][:0]},
        "scalar": {"input": np.float32(1.0), "labels": good["labels"]},
        "labels_float": {"input": good["input"], "labels": good["labels"].astype(np.float32) + 0.5},
        "labels_2d": {"input": good["input"], "labels": good["labels"][:, None]},
        "labels_range": {"input": good["input"], "labels": good["labels"] + 7},
        "labels_negative": {"input": good["input"], "labels": good["labels"] - 1},
        "labels_missing": {"input": good["input"]},
    }
    for name, arrays in variants.items():
        np.savez(folder / f"{name}.npz", **arrays)
    (folder / "object.npz").write_bytes(_object_npz())
    (folder / "data_dir.npz").mkdir()

    for name, text in PIPELINES.items():
        (folder / name).write_text(text)
    for name, payload in BINARY_PIPELINES.items():
        (folder / name).write_bytes(payload)
    (folder / "pipe_dir.yaml").mkdir()
    (folder / "loss.txt").write_text("not a loss graph\n")
    (folder / "notes.txt").write_text("a user's file\n")


def _object_npz() -> bytes:
    """An npz whose array is a pickled object array (never unpickled: allow_pickle=False)."""
    import io
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        inner = io.BytesIO()
        np.save(inner, np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
        z.writestr("input.npy", inner.getvalue())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-template")
    _build_template(folder)
    return folder


# -- preparing special files inside a case folder ------------------------------------------------

def _fifo(name):
    return lambda folder: os.mkfifo(folder / name)


def _chardev(name):
    """A character device (the null device's numbers) inside the case folder: replacing it by
    mistake harms nothing, unlike /dev/null itself. Needs root, like the defect it tests."""
    def prepare(folder):
        try:
            os.mknod(folder / name, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a device node needs root")
    return prepare


def _symlink(name, target):
    return lambda folder: os.symlink(target, folder / name)


def _hardlink(name, target):
    return lambda folder: os.link(folder / target, folder / name)


def _mkdir(name):
    return lambda folder: (folder / name).mkdir()


def _foreign_workdir(folder):
    (folder / "wd").mkdir()
    (folder / "wd" / "epoch10.onnx").write_bytes((folder / "model.onnx").read_bytes())
    (folder / "wd" / "epoch_notes.txt").write_text("mine\n")


def _dangling(folder):
    os.symlink(folder / "gone.onnx", folder / "dangling.onnx")


def _loop(folder):
    os.symlink(folder / "loop_b.onnx", folder / "loop_a.onnx")
    os.symlink(folder / "loop_a.onnx", folder / "loop_b.onnx")


# -- the matrix ----------------------------------------------------------------------------------

TRAIN = ("train", "--quiet", "--epochs", "1", "--batch-size", "8")


def _commands_on_model(model: str):
    """Each command that reads a model, with everything else valid."""
    return {
        "passes": ("passes", "run", model, "--pipeline", "calib.yaml", "--data", "data.npz", "-o", "out.onnx"),
        "inspect": ("inspect", model),
        "train": (*TRAIN, model, "--data", "data.npz", "-o", "out.onnx"),
        "lower": ("lower", model, "-o", "out.onnx"),
        "diff": ("diff", model, "--data", "data.npz"),
        "profile": ("profile", model, "--data", "data.npz", "--repeats", "1"),
    }


# which commands must refuse each bad model (the others may succeed on it)
BAD_MODELS = {
    "absent.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "noise.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "truncated.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "empty.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "text.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "npz.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "checker.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "external.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "model_dir.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "fifo.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "dangling.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "loop_a.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "ort_rejects.onnx": ("passes", "train", "diff", "profile"),
    "no_inputs.onnx": ("passes", "train", "diff", "profile"),
    "custom_op.onnx": ("passes", "train", "diff", "profile"),
    "meta_json.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "meta_type.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "meta_record.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "meta_flag.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "meta_typo.onnx": ("passes", "inspect", "train", "lower", "diff", "profile"),
    "model.onnx": ("lower",),           # a float model has nothing to lower
    "lowered.onnx": ("lower",),         # lowering twice lowers nothing
    "fixed_batch2.onnx": ("train",),    # batch 8 cannot feed a model whose batch is fixed at 2
}
PREPARE_MODEL = {"fifo.onnx": _fifo("fifo.onnx"), "dangling.onnx": _dangling, "loop_a.onnx": _loop}


def _model_cases():
    for model, commands in BAD_MODELS.items():
        for command in commands:
            yield Case(f"model-{model}-{command}", _commands_on_model(model)[command],
                       prepare=PREPARE_MODEL.get(model))


BAD_DATA = ["absent.npz", "npy.npz", "zip_text.npz", "empty_npz.npz", "text.npz", "noise.npz", "truncated.npz",
            "missing_key.npz", "dtype.npz", "shape.npz", "rank.npz", "nan.npz", "inf.npz", "lengths.npz",
            "zero_rows.npz", "scalar.npz", "object.npz", "data_dir.npz", "fifo.npz", "ptq.onnx"]
LABEL_DATA = ["labels_float.npz", "labels_2d.npz", "labels_range.npz", "labels_negative.npz", "labels_missing.npz"]


def _data_cases():
    for data in BAD_DATA:
        prepare = _fifo("fifo.npz") if data == "fifo.npz" else None
        commands = {
            "passes": ("passes", "run", "model.onnx", "--pipeline", "calib.yaml", "--data", data, "-o", "out.onnx"),
            "train": (*TRAIN, "model.onnx", "--data", data, "-o", "out.onnx"),
            "train-val": (*TRAIN, "model.onnx", "--data", "data.npz", "--val", data, "-o", "out.onnx"),
            "diff": ("diff", "ptq.onnx", "--data", data),
            "profile": ("profile", "ptq.onnx", "--data", data, "--repeats", "1"),
        }
        for command, args in commands.items():
            yield Case(f"data-{data}-{command}", args, prepare=prepare)
    for data in LABEL_DATA:
        yield Case(f"labels-{data}-train", (*TRAIN, "model.onnx", "--data", data, "-o", "out.onnx"))
        yield Case(f"labels-{data}-val", (*TRAIN, "model.onnx", "--data", "data.npz", "--val", data,
                                          "-o", "out.onnx"))
    yield Case("labels-negative-mse", (*TRAIN, "--loss", "mse", "model.onnx", "--data", "labels_negative.npz",
                                       "-o", "out.onnx"))
    yield Case("labels-mse-too-many-classes", (*TRAIN, "--loss", "mse", "model.onnx", "--data",
                                               "labels_range.npz", "-o", "out.onnx"), expect="labels|target")


def _pipeline_cases():
    for name in [*PIPELINES, *BINARY_PIPELINES, "pipe_dir.yaml", "absent.yaml", "fifo.yaml"]:
        prepare = _fifo("fifo.yaml") if name == "fifo.yaml" else None
        data = () if name.startswith("data_") else ("--data", "data.npz")   # their own `data:` key is the case
        yield Case(f"pipeline-{name}", ("passes", "run", "model.onnx", "--pipeline", name, *data,
                                        "-o", "out.onnx"), prepare=prepare)


def _option_cases():
    passes = ("passes", "run", "model.onnx", "--pipeline", "calib.yaml", "--data", "data.npz", "-o", "out.onnx")
    for value in ("0", "-1", "-64"):
        yield Case(f"passes-batch-size{value}", (*passes, "--batch-size", value), expect="batch")
    train = ("train", "--quiet", "model.onnx", "--data", "data.npz", "-o", "out.onnx")
    for option, values in {"--epochs": ("0", "-1"), "--lr": ("0", "-1", "inf", "nan", "-inf"),
                           "--batch-size": ("0", "-3"), "--momentum": ("-1", "1.5", "nan"),
                           "--weight-decay": ("-1", "inf", "nan"), "--warmup-steps": ("-1",),
                           "--seed": ("-1",), "--optimizer": ("lbfgs",), "--schedule": ("cosine-ish",)}.items():
        for value in values:
            yield Case(f"train{option}={value}", (*train, option, value))
    for loss in ("absent.onnx", "loss.txt", "data_dir.npz", "noise.onnx", "hinge"):
        yield Case(f"train-loss-{loss}", (*train, "--loss", loss), expect="loss")
    distill = (*train, "--teacher", "model.onnx")
    for teacher in ("absent.onnx", "noise.onnx", "text.onnx", "npz.onnx", "checker.onnx", "model_dir.onnx",
                    "renamed_output.onnx", "other_input.onnx"):
        yield Case(f"train-teacher-{teacher}", (*train, "--teacher", teacher), expect="teacher")
    for option, values in {"--temperature": ("0", "-1", "nan", "inf"), "--feature-weight": ("-1", "nan"),
                           "--label-weight": ("-0.5", "inf")}.items():
        for value in values:
            yield Case(f"train-distill{option}={value}", (*distill, option, value), expect=option)
    for label, extra, expect in [
        ("unknown-feature", ("--feature", "no_such_tensor"), "--feature 'no_such_tensor'"),
        ("feature-is-output", ("--feature", "logits"), "--feature 'logits'"),
        ("distill-loss-kind", ("--distill-loss", "logits=hinge"), "--distill-loss"),
        ("distill-loss-output", ("--distill-loss", "scores=kl"), "--distill-loss 'scores'"),
        ("distill-loss-syntax", ("--distill-loss", "logits"), "--distill-loss 'logits' must be NAME=VALUE"),
        ("loss-without-label-weight", ("--loss", "mse"), "--label-weight"),
        ("label-weight-without-labels", ("--label-weight", "1", "--data", "labels_missing.npz"), "labels"),
        ("fixed-batch-teacher", ("--teacher", "fixed_batch2.onnx"), "batch"),
    ]:
        yield Case(f"train-distill-{label}", (*distill, *extra), expect=expect)
    yield Case("train-keep-best-without-val", (*train, "--keep-best"), expect="--val")
    yield Case("train-keep-best-by-unknown", (*distill, "--keep-best-by", "accuracy"), expect="--keep-best-by")
    for option, value in (("--temperature", "2"), ("--feature", "c1"), ("--label-weight", "0.5"),
                          ("--distill-loss", "logits=kl"), ("--keep-best-by", "cosine")):
        yield Case(f"train-no-teacher{option}", (*train, option, value), expect="--teacher")
    yield Case("lower-target", ("lower", "ptq.onnx", "--target", "fpga", "-o", "out.onnx"))
    diff = ("diff", "ptq.onnx", "--data", "data.npz")
    for option, values in {"--batch-size": ("0", "-3"), "--limit": ("0", "-5"), "--threads": ("-1", "x")}.items():
        for value in values:
            yield Case(f"diff{option}={value}", (*diff, option, value))
    profile = ("profile", "ptq.onnx", "--data", "data.npz", "--repeats", "1")
    for option, values in {"--batch-size": ("0", "-3"), "--repeats": ("0", "-1"), "--threads": ("-1",),
                           "--top": ("0", "-2")}.items():
        for value in values:
            yield Case(f"profile{option}={value}", (*profile, option, value))
    yield Case("profile-batch-beyond-data", (*profile, "--batch-size", "64"), expect="samples")
    build = ("models", "build")
    yield Case("build-unknown", (*build, "vgg", "-o", "out.onnx"))
    for option, values in {"--width": ("0", "-4"), "--classes": ("-3", "0"), "--seed": ("-1",),
                           "--input-shape": ("a,b,c", "", "1,28", "0,28,28", "-1,28,28", "1,100000,100000",
                                             "1,28,28,28", "1.5,28,28")}.items():
        for value in values:
            yield Case(f"build{option}={value}", (*build, "lenet", "-o", "out.onnx", option, value))
    export = ("data", "export")
    yield Case("export-unknown", (*export, "cifar", "-o", "out.npz"))
    yield Case("export-split", (*export, "mnist", "--split", "test", "-o", "out.npz"))
    for option, values in {"--image-size": ("0", "-1", "100000"), "--limit": ("0", "-10")}.items():
        for value in values:
            yield Case(f"export{option}={value}", (*export, "mnist", "-o", "out.npz", option, value))
    yield Case("demo-model", ("demo", "--model", "vgg", "--out", "dd", "--quick"))
    yield Case("demo-seed", ("demo", "--seed", "-1", "--out", "dd", "--quick"))
    yield Case("demo-out-file", ("demo", "--out", "notes.txt", "--quick"))
    yield Case("demo-out-fifo", ("demo", "--out", "fifo", "--quick"), prepare=_fifo("fifo"))


def _alias_cases():
    passes = ("passes", "run", "model.onnx", "--pipeline", "calib.yaml", "--data", "data.npz")
    for label, extra, prepare in [
        ("o=model", ("-o", "model.onnx"), None),
        ("o=./model", ("-o", "./model.onnx"), None),
        ("o=symlink-model", ("-o", "link.onnx"), _symlink("link.onnx", "model.onnx")),
        ("o=hardlink-model", ("-o", "hard.onnx"), _hardlink("hard.onnx", "model.onnx")),
        ("o=data", ("-o", "data.npz"), None),
        ("o=pipeline", ("-o", "calib.yaml"), None),
        ("o=dir", ("-o", "outdir"), _mkdir("outdir")),
        ("o=fifo", ("-o", "fifo.onnx"), _fifo("fifo.onnx")),
        ("o=device", ("-o", "null.dev"), _chardev("null.dev")),
        ("o=missing-dir", ("-o", "nowhere/out.onnx"), None),
        ("o=proc", ("-o", "/proc/qgraph-out.onnx"), None),
        ("report=model", ("-o", "out.onnx", "--report", "model.onnx"), None),
        ("report=data", ("-o", "out.onnx", "--report", "data.npz"), None),
        ("report=pipeline", ("-o", "out.onnx", "--report", "calib.yaml"), None),
        ("report=o", ("-o", "out.onnx", "--report", "out.onnx"), None),
        ("report=fifo", ("-o", "out.onnx", "--report", "fifo.json"), _fifo("fifo.json")),
        ("report=dir", ("-o", "out.onnx", "--report", "outdir"), _mkdir("outdir")),
        ("report=proc", ("-o", "out.onnx", "--report", "/proc/qgraph-report.json"), None),
        ("report=missing-dir", ("-o", "out.onnx", "--report", "nowhere/r.json"), None),
        ("report=symlink-data", ("-o", "out.onnx", "--report", "link.json"), _symlink("link.json", "data.npz")),
    ]:
        yield Case(f"alias-passes-{label}", (*passes, *extra), prepare=prepare)
    yield Case("alias-passes-o=yaml-data", ("passes", "run", "model.onnx", "--pipeline", "data_missing.yaml",
                                            "-o", "nowhere.npz"), expect="nowhere.npz")
    train = ("train", "--quiet", "model.onnx", "--data", "data.npz", "--val", "val.npz")
    for label, extra, prepare in [
        ("o=model", ("-o", "model.onnx"), None),
        ("o=data", ("-o", "data.npz"), None),
        ("o=val", ("-o", "val.npz"), None),
        ("o=loss", ("-o", "loss.onnx", "--loss", "loss.onnx"), lambda f: shutil.copy(f / "model.onnx", f / "loss.onnx")),
        ("o=symlink-val", ("-o", "link.onnx"), _symlink("link.onnx", "val.npz")),
        ("o=dir", ("-o", "outdir"), _mkdir("outdir")),
        ("o=fifo", ("-o", "fifo.onnx"), _fifo("fifo.onnx")),
        ("o=device", ("-o", "null.dev"), _chardev("null.dev")),
        ("workdir=model", ("-o", "out.onnx", "--workdir", "model.onnx"), None),
        ("workdir=data", ("-o", "out.onnx", "--workdir", "data.npz"), None),
        ("workdir=fifo", ("-o", "out.onnx", "--workdir", "fifo"), _fifo("fifo")),
        ("workdir=foreign", ("-o", "out.onnx", "--workdir", "wd"), _foreign_workdir),
        ("workdir=cwd", ("-o", "out.onnx", "--workdir", "."), None),
        ("workdir=proc", ("-o", "out.onnx", "--workdir", "/proc/qgraph-wd"), None),
        ("o-inside-workdir", ("-o", "wd2/out.onnx", "--workdir", "wd2"), _mkdir("wd2")),
        ("o=teacher", ("-o", "teacher.onnx", "--teacher", "teacher.onnx"),
         lambda f: shutil.copy(f / "model.onnx", f / "teacher.onnx")),
        ("o=symlink-teacher", ("-o", "link.onnx", "--teacher", "model.onnx"), _symlink("link.onnx", "model.onnx")),
        ("workdir=teacher", ("-o", "out.onnx", "--workdir", "teacher.onnx", "--teacher", "teacher.onnx"),
         lambda f: shutil.copy(f / "model.onnx", f / "teacher.onnx")),
    ]:
        yield Case(f"alias-train-{label}", (*train, *extra), prepare=prepare)
    lower = ("lower", "ptq.onnx")
    for label, extra, prepare in [
        ("o=model", ("-o", "ptq.onnx"), None),
        ("report=model", ("-o", "out.onnx", "--report", "ptq.onnx"), None),
        ("report=o", ("-o", "out.onnx", "--report", "out.onnx"), None),
        ("o=symlink", ("-o", "link.onnx"), _symlink("link.onnx", "ptq.onnx")),
        ("o=fifo", ("-o", "fifo.onnx"), _fifo("fifo.onnx")),
        ("o=device", ("-o", "null.dev"), _chardev("null.dev")),
        ("o=dir", ("-o", "outdir"), _mkdir("outdir")),
        ("report=dir", ("-o", "out.onnx", "--report", "outdir"), _mkdir("outdir")),
        ("report=proc", ("-o", "out.onnx", "--report", "/proc/qgraph-r.json"), None),
    ]:
        yield Case(f"alias-lower-{label}", (*lower, *extra), prepare=prepare)
    diff = ("diff", "lowered.onnx", "--data", "data.npz", "--against", "ptq.onnx")
    for label, extra, prepare in [
        ("json=model", ("--json", "lowered.onnx"), None),
        ("json=data", ("--json", "data.npz"), None),
        ("json=against", ("--json", "ptq.onnx"), None),
        ("json=fifo", ("--json", "fifo.json"), _fifo("fifo.json")),
        ("json=dir", ("--json", "outdir"), _mkdir("outdir")),
        ("json=symlink-model", ("--json", "link.json"), _symlink("link.json", "lowered.onnx")),
        ("json=device", ("--json", "null.dev"), _chardev("null.dev")),
        ("against=absent", ("--against", "absent.onnx"), None),
        ("against=noise", ("--against", "noise.onnx"), None),
    ]:
        yield Case(f"alias-diff-{label}", (*diff, *extra), prepare=prepare)
    profile = ("profile", "lowered.onnx", "--data", "data.npz", "--against", "ptq.onnx", "--repeats", "1")
    for label, extra, prepare in [
        ("json=model", ("--json", "lowered.onnx"), None),
        ("json=data", ("--json", "data.npz"), None),
        ("json=against", ("--json", "ptq.onnx"), None),
        ("json=fifo", ("--json", "fifo.json"), _fifo("fifo.json")),
        ("json=dir", ("--json", "outdir"), _mkdir("outdir")),
        ("json=symlink-data", ("--json", "link.json"), _symlink("link.json", "data.npz")),
        ("json=device", ("--json", "null.dev"), _chardev("null.dev")),
        ("json=missing-dir", ("--json", "nowhere/p.json"), None),
        ("against=absent", ("--against", "absent.onnx"), None),
        ("against=noise", ("--against", "noise.onnx"), None),
        ("against=dir", ("--against", "model_dir.onnx"), None),
    ]:
        yield Case(f"alias-profile-{label}", (*profile, *extra), prepare=prepare)
    for command, args in {"build": ("models", "build", "lenet", "-o"), "export": ("data", "export", "digits", "-o")}.items():
        for label, target, prepare in [("dir", "outdir", _mkdir("outdir")), ("fifo", "fifo", _fifo("fifo")),
                                       ("device", "null.dev", _chardev("null.dev")), ("notes", "notes.txt/x", None)]:
            yield Case(f"alias-{command}-{label}", (*args, target), prepare=prepare)


def _analyze_cases():
    """`qgraph analyze FLOAT QUANT --data D -o DIR`: bad models in either place, bad data, report
    folders that alias inputs or cannot be made, bad numbers. No report folder may appear."""
    unreadable = [m for m, commands in BAD_MODELS.items() if "inspect" in commands]
    for model in unreadable + ["ort_rejects.onnx", "no_inputs.onnx", "custom_op.onnx"]:
        prepare = PREPARE_MODEL.get(model)
        yield Case(f"analyze-float-{model}", ("analyze", model, "ptq.onnx", "--data", "data.npz", "-o", "rep",
                                              "--workers", "1"), prepare=prepare)
        yield Case(f"analyze-quant-{model}", ("analyze", "model.onnx", model, "--data", "data.npz", "-o", "rep",
                                              "--workers", "1"), prepare=prepare)
    yield Case("analyze-quant-is-float", ("analyze", "model.onnx", "model.onnx", "--data", "data.npz", "-o", "rep"),
               expect="QuantizeLinear")
    for data in BAD_DATA:
        yield Case(f"analyze-data-{data}", ("analyze", "model.onnx", "ptq.onnx", "--data", data, "-o", "rep",
                                            "--workers", "1"), prepare=_fifo("fifo.npz") if data == "fifo.npz" else None)
    base = ("analyze", "model.onnx", "ptq.onnx", "--data", "data.npz", "--workers", "1")
    for label, target, prepare in [("model", "model.onnx", None), ("quant", "ptq.onnx", None), ("data", "data.npz", None),
                                   ("notes-parent", "notes.txt/rep", None), ("missing-parent", "nowhere/rep", None),
                                   ("fifo", "fifo", _fifo("fifo")), ("proc", "/proc/qgraph-rep", None),
                                   ("symlink-data", "link", _symlink("link", "data.npz"))]:
        yield Case(f"analyze-o={label}", (*base, "-o", target), prepare=prepare)
    for option, values in {"--threshold": ("nan", "inf", "x"), "--workers": ("-1",), "--batch-size": ("0", "-2"),
                           "--limit": ("0", "-1"), "--top": ("0",), "--granularity": ("node",)}.items():
        for value in values:
            yield Case(f"analyze{option}={value}", (*base, "-o", "rep", option, value))


ALL_CASES = [*_model_cases(), *_data_cases(), *_pipeline_cases(), *_option_cases(), *_alias_cases(),
             *_analyze_cases()]


def test_the_matrix_covers_the_kinds_of_case_the_issue_lists():
    assert len(ALL_CASES) >= 286
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES)


# -- running one case ---------------------------------------------------------------------------

def _snapshot(folder) -> dict[str, str]:
    """Every entry under `folder` (hidden ones too): files by content hash, others by kind."""
    result = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                result[rel] = "link:" + os.readlink(path)
            elif stat.S_ISREG(mode):
                with open(path, "rb") as handle:
                    result[rel] = hashlib.sha256(handle.read()).hexdigest()
            else:
                result[rel] = "dir" if stat.S_ISDIR(mode) else f"special:{stat.S_IFMT(mode)}"
    return result


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_bad_invocation_is_one_error_line_and_touches_nothing(case, template, tmp_path, monkeypatch):
    folder = tmp_path / "case"
    shutil.copytree(template, folder, symlinks=True)
    if case.prepare:
        case.prepare(folder)
    monkeypatch.chdir(folder)
    before = _snapshot(folder)
    result = CliRunner().invoke(main, [str(a) for a in case.args], catch_exceptions=True)
    after = _snapshot(folder)
    stderr = result.stderr
    detail = f"\nexit {result.exit_code}\nstdout: {result.stdout[-2000:]}\nstderr: {stderr[-2000:]}\n" \
             f"exception: {result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), detail
    assert result.exit_code == 2, detail
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), detail
    assert "Traceback" not in stderr and "internal error" not in lines[0], detail
    if case.expect:
        assert re.search(case.expect, lines[0], re.IGNORECASE), detail
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))}" + detail
