"""qgraph analyze on real data: cumulative and local SNR per tensor, per-quantizer sensitivity
through the switchboard, range use, the report files; local workers and Ray give the same report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qgraph import quant
from qgraph.analyze import analyze_models, find_quantizers, public
from qgraph.annotations import read_quantizers
from qgraph.api import apply_pipeline
from qgraph.cli import main
from qgraph.graph import QModel
from qgraph.models.builders import build_model
from qgraph.models.datasets import load_dataset
from qgraph.parallel import Evaluator
from qgraph.qparams import bypassed
from qgraph.runner import run_model


def _cosine_snr(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), float(10 * np.log10((a @ a) / ((a - b) @ (a - b))))


@pytest.fixture(scope="module")
def case():
    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
    float_model = build_model("resnet")
    quantized = apply_pipeline(float_model, "ptq", {"input": train["input"][:128]}, weight_bits=4)
    data = {"input": val["input"][:48], "labels": val["labels"][:48]}
    return float_model, quantized, data


@pytest.fixture(scope="module")
def report(case):
    float_model, quantized, data = case
    return analyze_models(float_model, quantized, data, batch_size=16, evaluator=Evaluator(1))


def test_cumulative_output_is_the_quantized_model_against_the_float_one(case, report):
    float_model, quantized, data = case
    a = run_model(float_model, {"input": data["input"]})["logits"]
    b = run_model(quantized, {"input": data["input"]})["logits"]
    cosine, snr = _cosine_snr(a, b)
    assert report["outputs"]["logits"]["cosine"] == pytest.approx(cosine, abs=1e-6)
    assert report["outputs"]["logits"]["snr_db"] == pytest.approx(snr, abs=1e-3)
    assert report["accuracy"]["float"] == np.mean(a.argmax(1) == data["labels"])
    first = report["first_below_threshold"]
    below = [t for t in report["tensors"] if t["cumulative_snr_db"] < report["threshold_db"]]
    assert (first is None and not below) or first == below[0]


def test_sensitivity_of_one_quantizer_is_the_model_with_only_it_quantized(case, report):
    float_model, quantized, data = case
    assert report["sensitivity"][0]["output_snr_db"] <= report["sensitivity"][-1]["output_snr_db"]
    assert len(report["sensitivity"]) == len(report["quantizers"])
    # independently, in NumPy: the classifier's weight alone on its grid, everything before it float
    row = next(r for r in report["sensitivity"] if r["group"] == "head.fc.weight")
    gemm = next(n for n in float_model.graph.node if n.op_type == "Gemm")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in float_model.graph.initializer}
    x = run_model(float_model, {"input": data["input"]}, [gemm.input[0], "logits"])
    _, sites, _ = find_quantizers(quantized)
    site = next(s for s in sites if s.name == "head.fc.weight")
    w = site.fake_quantize(inits[gemm.input[1]])
    logits = x[gemm.input[0]] @ w.T + inits[gemm.input[2]]
    cosine, snr = _cosine_snr(x["logits"], logits)
    assert row["output_cosine"] == pytest.approx(cosine, abs=1e-5)
    assert row["output_snr_db"] == pytest.approx(snr, abs=0.05)
    assert row["top1"] == np.mean(logits.argmax(1) == data["labels"])


def test_a_variant_runs_as_the_switchboard_with_its_switches_set(case):
    from qgraph.analyze import ALTERNATES, SWITCHES, materialize, switchboard
    from qgraph.runner import Runner
    _, quantized, data = case
    model, sites, _ = find_quantizers(quantized)
    acts = [i for i, s in enumerate(sites) if s.kind == "activation"]
    # every activation also gets a coarser alternate grid (4x the step), as mixed_precision adds them
    alternates = {i: [(np.asarray(sites[i].grid.scale, np.float32) * 4, np.asarray(sites[i].grid.zero_point),
                       None)] for i in acts}
    board, weights = switchboard(model, sites, alternates)
    switches = np.zeros(len(sites), np.bool_)
    switches[acts[::2]] = True
    switches[[i for i in weights][:3]] = True
    alt = np.zeros(len(sites), np.bool_)
    alt[acts[::4]] = True
    swapped = {name: base for i, (name, base, _) in weights.items() if switches[i]}
    feeds = {"input": data["input"][:16]}
    # the Where switchboard itself, with the switched weights' fake-quantized values swapped in
    where = onnx.ModelProto()
    where.CopyFrom(board)
    for init in where.graph.initializer:
        if init.name in swapped:
            init.CopyFrom(onnx.numpy_helper.from_array(swapped[init.name], init.name))
    expected = Runner(where).run({**feeds, SWITCHES: switches, ALTERNATES: alt})["logits"]
    variant = materialize(board, switches, alt, swapped)
    got = Runner(variant).run(feeds)["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    ops = [n.op_type for n in variant.graph.node]
    assert "Where" not in ops and "Gather" not in ops
    # one pair per activation switched on, on the alternate grid where chosen; the others dropped
    quantize = [n.name for n in variant.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == int(switches[acts].sum())
    assert sum(name.endswith("_qgraph_alt_QuantizeLinear") for name in quantize) == int((switches & alt)[acts].sum())
    off = Runner(materialize(board, np.zeros(len(sites), np.bool_))).run(feeds)["logits"]
    assert not np.allclose(off, got)
    np.testing.assert_allclose(off, run_model(bypassed(QModel.from_onnx(quantized)).to_onnx(), feeds)["logits"],
                               rtol=1e-5, atol=1e-5)


def test_a_weight_with_several_alternate_grids_is_evaluated_on_the_one_chosen(case):
    """mixed_precision gives a weight two other grids (4 and 16 bits beside its own): choice k of
    the alternates input must run the weight fake-quantized on the k-th grid, nothing else."""
    from qgraph.analyze import evaluate_variant, switchboard
    float_model, quantized, data = case
    model, sites, _ = find_quantizers(quantized)
    i = next(k for k, s in enumerate(sites) if s.kind == "weight" and s.name == "head.fc.weight")
    site = sites[i]
    scale = np.asarray(site.grid.scale, np.float32)
    coarse = (scale * 4, np.asarray(site.grid.zero_point), site.axis, (-1, 1))
    fine = (scale / 64, np.asarray(site.grid.zero_point).astype(np.int16), site.axis, (-32767, 32767))
    board, weights = switchboard(model, sites, {i: [coarse, fine]})
    feeds = {"input": data["input"]}
    reference = run_model(float_model, feeds)["logits"]
    shared = {"model": board, "weights": weights, "feeds": [feeds], "reference": [{"logits": reference}],
              "labels": [None], "outputs": ["logits"]}
    switches = np.zeros(len(sites), np.bool_)
    switches[i] = True
    gemm = next(n for n in float_model.graph.node if n.op_type == "Gemm")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in float_model.graph.initializer}
    x = run_model(float_model, feeds, [gemm.input[0]])[gemm.input[0]]
    snrs = []
    for choice, grid in enumerate([None, coarse, fine]):
        alternates = np.zeros(len(sites), np.int8)
        alternates[i] = choice
        got = evaluate_variant(shared, (switches, alternates))["outputs"]["logits"]["snr_db"]
        w = (site.fake_quantize(inits[gemm.input[1]]) if grid is None else
             quant.fake_quantize(inits[gemm.input[1]], grid[0], grid[1], *grid[3], axis=grid[2]))
        expected = _cosine_snr(reference, x @ w.T + inits[gemm.input[2]])[1]
        assert got == pytest.approx(expected, abs=0.05), choice
        snrs.append(got)
    assert snrs[1] < snrs[0] < snrs[2]      # ternary < 4-bit < 16-bit


def test_local_weight_snr_and_range_use(case, report):
    _, quantized, _ = case
    _, sites, _ = find_quantizers(quantized)
    weight = next(s for s in sites if s.kind == "weight")
    row = next(q for q in report["quantizers"] if q["name"] == weight.name)
    cosine, snr = _cosine_snr(weight.weight, weight.fake_quantize(weight.weight))
    assert row["local_snr_db"] == pytest.approx(snr, abs=1e-3) and row["bits"] == 4
    codes = weight.codes(weight.weight)
    per_channel = [len(np.unique(c)) for c in codes.reshape(codes.shape[0], -1)]
    levels = weight.qmax - weight.qmin + 1
    assert row["unused_levels"] == pytest.approx(np.mean([(levels - u) / levels for u in per_channel]))
    assert row["clipped_share"] == 0.0    # minmax weight scales clip nothing
    # activation quantizers ahead of a ReLU are compared as the ReLU sees them: nothing clipped below 0
    acts = [q for q in report["quantizers"] if q["kind"] == "activation"]
    assert acts and max(q["clipped_share"] for q in acts) < 0.01


def test_a_too_narrow_grid_shows_as_clipping_and_a_low_local_snr(case):
    float_model, quantized, data = case
    narrowed = onnx.ModelProto()
    narrowed.CopyFrom(quantized)
    records = read_quantizers(narrowed)
    target = next(r for r in records.values() if r.kind == "activation" and r.tensor != "input")
    for init in narrowed.graph.initializer:
        if init.name == target.scale:
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) / 8, init.name))
    rep = analyze_models(float_model, narrowed, data, evaluator=Evaluator(1), local=False)
    row = next(q for q in rep["quantizers"] if q["name"] == target.tensor)
    assert row["clipped_share"] > 0.05 and row["local_snr_db"] < 15
    assert rep["quantizers"][0]["name"] == target.tensor      # the worst local SNR comes first
    assert rep["sensitivity"] == []


def test_layer_granularity_groups_a_layer_with_its_input_quantizer(case):
    float_model, quantized, data = case
    rep = analyze_models(float_model, quantized, data, granularity="layer", evaluator=Evaluator(1))
    stem = next(r for r in rep["sensitivity"] if r["group"] == "stem.conv")
    assert set(stem["quantizers"]) == {"input", "stem.conv.weight"}


def test_two_local_workers_give_the_same_report(case, report):
    float_model, quantized, data = case
    other = analyze_models(float_model, quantized, data, batch_size=16, evaluator=Evaluator(2))
    mine, theirs = public(report), public(other)
    assert mine.pop("evaluated_by") != theirs.pop("evaluated_by")
    assert json.dumps(mine, sort_keys=True) == json.dumps(theirs, sort_keys=True)


def test_models_from_ort_quantize_static_are_analyzed(case, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    float_model, _, data = case
    onnx.save(float_model, tmp_path / "f.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": data["input"][:16]}])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    ort_model = onnx.load(tmp_path / "q.onnx")
    rep = analyze_models(float_model, ort_model, data, evaluator=Evaluator(1))
    kinds = {q["kind"] for q in rep["quantizers"]}
    assert kinds == {"weight", "activation"} and rep["outputs"]["logits"]["cosine"] > 0.9
    # int8 weights stored quantized are switched off through their float originals, by name
    weights = {q["name"] for q in rep["quantizers"] if q["kind"] == "weight"}
    assert "stem.conv.weight" in weights and len(rep["sensitivity"]) == len(rep["quantizers"])
    assert not any("stays quantized" in s["reason"] for s in rep["skipped"])


@pytest.fixture
def cli_files(case, tmp_path, monkeypatch):
    """float.onnx, q.onnx and val.npz in the working directory."""
    float_model, quantized, data = case
    onnx.save(float_model, tmp_path / "float.onnx")
    onnx.save(quantized, tmp_path / "q.onnx")
    np.savez(tmp_path / "val.npz", **data)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_writes_the_report_folder(cli_files):
    tmp_path = cli_files
    result = CliRunner().invoke(main, ["analyze", "float.onnx", "q.onnx", "--data", "val.npz", "-o", "rep",
                                       "--workers", "1", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "costliest quantizers" in result.stdout and "range use" in result.stdout
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["samples"] == 48 and saved["sensitivity"][0]["group"]
    assert "## SNR along depth" in (tmp_path / "rep" / "report.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "rep" / "snr_depth.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_names_the_order_when_the_models_are_swapped(cli_files):
    tmp_path = cli_files
    result = CliRunner().invoke(main, ["analyze", "q.onnx", "float.onnx", "--data", "val.npz", "-o", "rep"])
    assert result.exit_code == 2
    assert "float.onnx: holds no QuantizeLinear/DequantizeLinear pairs but q.onnx does: the float model comes " \
           "first (qgraph analyze float.onnx q.onnx" in result.output
    assert not (tmp_path / "rep").exists()


def test_ray_runs_give_the_same_report_and_calibration(case):
    ray = pytest.importorskip("ray", reason="Ray is the optional extra qgraph[ray]")
    from qgraph.pipeline import PassContext, run_pass
    float_model, quantized, data = case
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        local = public(analyze_models(float_model, quantized, data, evaluator=Evaluator(1)))
        remote = public(analyze_models(float_model, quantized, data, evaluator=Evaluator(2, ray="auto")))
        local.pop("evaluated_by"), remote.pop("evaluated_by")
        assert json.dumps(local, sort_keys=True) == json.dumps(remote, sort_keys=True)
        calib = {"input": load_dataset("mnist", "train")["input"][:160]}
        scales = []
        for params in ({}, {"ray": "auto"}):
            model = QModel.from_onnx(float_model)
            ctx = PassContext(data=calib, batch_size=32)
            run_pass(model, "insert_qdq", {"activations": {"observer": "entropy"}}, ctx)
            run_pass(model, "calibrate", {"progress": False, **params}, ctx)
            scales.append({i.name: onnx.numpy_helper.to_array(i) for i in model.to_onnx().graph.initializer
                           if i.name.endswith(("_scale", "_zero_point"))})
        assert scales[0].keys() == scales[1].keys()
        assert all(np.array_equal(scales[0][k], scales[1][k]) for k in scales[0])
    finally:
        if started:
            ray.shutdown()


def test_16_bit_grids_are_read_from_any_storage(case):
    _, quantized, _ = case
    _, sites, _ = find_quantizers(quantized)
    assert {s.grid.dtype.name for s in sites} <= {"int8", "uint8"}
    assert all(s.qmin == quant.qrange(s.bits, s.grid.dtype.kind == "i", s.qmin != -(1 << (s.bits - 1))
                                      and s.grid.dtype.kind == "i")[0] for s in sites if s.kind == "activation")


def test_repair_hints_name_the_pass_for_what_each_costly_quantizer_shows():
    """repair_hints reads each costliest quantizer's range use: a weight → gptq; a LayerNorm output
    with outlier channels → smooth, a HardSwish output with them → equalize_activations; clipping → the percentile search; unused levels → equalize;
    a well-used grid → 16 bits; and mixed_precision for all of them, last."""
    from qgraph.analyze import repair_hints

    def q(name, kind="activation", producer="Conv", clipped=0.0, unused=0.1, spread=1.5, gain=2.0):
        return {"name": name, "kind": kind, "producer": producer, "clipped_share": clipped,
                "unused_levels": unused, "channel_spread": spread, "channel_gain": gain}
    quantizers = [q("w", kind="weight", producer=""), q("ln", producer="LayerNormalization", spread=9.0),
                  q("clip", clipped=0.01), q("wide", unused=0.7), q("fine"), q("ln_even", producer="LayerNormalization"),
                  q("hswish", producer="HardSwish", spread=8.0, gain=100.0)]
    report = {"quantizers": quantizers, "sensitivity": [{"group": x["name"], "quantizers": [x["name"]]}
                                                        for x in quantizers]}
    hints = repair_hints(report, top=7)
    expect = {"w": "gptq", "ln": "`smooth`", "clip": "percentiles", "wide": "`equalize`", "fine": "16-bit",
              "ln_even": "16-bit", "hswish": "`equalize_activations`"}
    assert [h.split(":")[0] for h in hints[:-1]] == list(expect)
    for hint, word in zip(hints, expect.values()):
        assert word in hint, hint
    assert "mixed_precision" in hints[-1]
    assert len(repair_hints(report, top=2)) == 3 and repair_hints({"quantizers": [], "sensitivity": []}) == []


def test_a_hardswish_input_is_compared_as_the_hardswish_sees_it():
    """ptq.yaml bounds a HardSwish input's grid at -3 (ahead_relu's range_bounds): the values
    below it, which the HardSwish maps to 0 whatever they are, are not reported as clipped and
    do not count against its local SNR."""
    from qgraph.models import exported
    shape = (3, 32, 64)
    float_model = exported.pplcnet_paddle(input_shape=shape, num_classes=10)
    data = {"x": exported.probe_batch(shape, seed=2, count=16)}
    quantized = apply_pipeline(float_model, "ptq", data)
    bounded = [r for r in read_quantizers(quantized).values() if r.range_floor is not None]
    assert bounded
    values = run_model(bypassed(QModel.from_onnx(quantized)).to_onnx(), data, [r.tensor for r in bounded])
    below = [r.tensor for r in bounded if (values[r.tensor] < r.range_floor - 1).mean() > 0.01]
    assert below, "the premise: some bounded inputs reach well below -3"
    rep = analyze_models(float_model, quantized, data, evaluator=Evaluator(1), local=False)
    rows = {q["name"]: q for q in rep["quantizers"]}
    for name in below:
        assert rows[name]["clipped_share"] < 0.001, (name, rows[name]["clipped_share"])


def test_batches_shrink_to_hold_every_compared_tensor_in_the_memory_budget(case, monkeypatch):
    """The comparison holds every shared tensor of both models for a whole batch at once (DNSMOS:
    9 s of raw audio, 20 GB for a batch of 16): the batch is cut to what fits the budget, measured
    on one sample, and the report is the same."""
    from qgraph import analyze
    from qgraph.data import check_data
    from qgraph.runner import Runner
    float_model, quantized, data = case
    names = [t for t in analyze._shared_tensors(float_model, QModel.from_onnx(quantized))]
    runner = Runner(float_model, names, threads=1)
    plan = check_data(data, float_model)
    one = sum(v.nbytes for v in runner.run(next(plan.batches(1, 1))[0]).values())
    assert analyze.fitting_batch(plan, [runner], 16, budget=3 * one) == 3
    assert analyze.fitting_batch(plan, [runner], 16, budget=100 * one) == 16
    assert analyze.fitting_batch(plan, [runner], 16, budget=1) == 1
    whole = analyze_models(float_model, quantized, data, batch_size=16, local=False)
    monkeypatch.setattr(analyze, "BATCH_BYTES", 6 * one)
    seen = []
    monkeypatch.setattr(analyze, "_batches", lambda plan, size, limit, original=analyze._batches:
                        seen.append(size) or original(plan, size, limit))
    small = analyze_models(float_model, quantized, data, batch_size=16, local=False)
    assert seen == [3]                               # 6 budgets of one sample, two models
    assert small["outputs"]["logits"]["snr_db"] == pytest.approx(whole["outputs"]["logits"]["snr_db"], abs=1e-6)
    assert small["samples"] == whole["samples"]
