"""Distillation QAT runs on real exported models (the developers' zoo, benchmarks/zoo_models.py):
YOLOv8n (dynamic batch/H/W, Resize, Split, chained MaxPool, SiLU), the CRNN with a bidirectional
LSTM (batch fixed at 1, dynamic width), and the DB detector (ConvTranspose, nearest Resize, HardSwish).
Each trains from its qat.yaml form without labels, comes back in QDQ form, and moves towards the
teacher. Skips when the wheels cannot be fetched. Fidelity numbers live in benchmarks/qat.py."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo_models as zoo  # noqa: E402

from qgraph.api import apply_pipeline  # noqa: E402
from qgraph.model_io import load_model  # noqa: E402
from qgraph.train import train_model  # noqa: E402


def float_model(key: str):
    entry = zoo.ZOO[key]
    try:
        return load_model(zoo.zoo_model_path(key)) if entry.wheel else zoo.zoo_model(key)
    except zoo.ZooUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("key, lr", [("nudenet_320n", 1e-5), ("ddddocr_ocr", 3e-6), ("db_detector", 3e-5)])
def test_distillation_qat_trains_a_zoo_model_and_exports_qdq(key, lr, tmp_path):
    entry = zoo.ZOO[key]
    teacher = float_model(key)
    try:
        data = zoo.zoo_inputs(key, 4, "calib")
    except zoo.ZooUnavailable as exc:
        pytest.skip(str(exc))
    batch = 1 if entry.fixed_batch else 2
    prepared = apply_pipeline(teacher, "qat", data, batch_size=batch)
    trained, history = train_model(prepared, data, data, teacher=teacher, epochs=3, lr=lr, batch_size=batch,
                                   workdir=tmp_path, progress=False)
    assert Counter(n.op_type for n in trained.graph.node) == Counter(n.op_type for n in prepared.graph.node)
    assert history[3]["val_loss"] < history[0]["val_loss"]       # closer to the teacher than PTQ was
    outputs = zoo.run_entry(entry, zoo.ort_session(trained), data[entry.input_name])
    assert all(np.isfinite(o).all() for o in outputs)
