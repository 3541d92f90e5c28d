"""Make `tests/fixtures/torch_cnn.onnx`: a small CNN trained and exported by PyTorch.

Run once by a developer, never at run time (torch is not a qgraph dependency), from a
separate environment that has torch:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 "onnx==1.17.*" numpy
    /tmp/torchvenv/bin/python scripts/export_torch_fixture.py

The committed fixture was made exactly so, with torch 2.13.0+cpu, onnx 1.17.0, on CPU, by
the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`), opset 17, input `input`
float32 [N, 1, 28, 28] (pixels in [0, 1]), output `logits` [N, 10], batch axis dynamic.

The network (`TorchCNN`) is written the way people write PyTorch models, so the export
carries what real exports carry: Conv2d + BatchNorm2d + ReLU (the eval-mode exporter folds
BN into the conv), MaxPool2d, a residual basic block (Add), a depthwise 3x3 conv
(groups = channels) and a pointwise conv, AdaptiveAvgPool2d(1) (GlobalAveragePool), the
flatten as `x.view(x.size(0), -1)` (a Shape/Gather/Unsqueeze/Concat/Reshape chain), Dropout
(dropped in eval mode) and Linear (Gemm).

It is trained for `EPOCHS` epochs of Adam (one-cycle learning rate, peak `LR`) on the bundled MNIST-5k train split (4,000
images), read straight from `models/data/mnist5k.npz` with the same pixel scaling as
`qgraph.models.datasets.load_dataset` (x / 255), with fixed seeds, so its weights are
meaningful (about 96 % top-1 on the 1,000-image val split).

`tests/test_torch_export.py` imports `export_onnx` from here (a developer script, not part
of the installed package) to export the same architecture live when torch is installed;
torch is imported only inside the functions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "torch_cnn.onnx"
VIEW_FIXTURE = ROOT / "tests" / "fixtures" / "torch_cnn_view.onnx"
DATA = ROOT / "models" / "data" / "mnist5k.npz"
OPSET = 17
SEED = 0
EPOCHS = 8
BATCH = 64
LR = 1e-2


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, 1, 28, 28) in [0, 1], labels int64) of the bundled MNIST-5k split."""
    with np.load(DATA, allow_pickle=False) as stored:
        keep = stored["split"] == {"train": 0, "val": 1}[split]
        images, labels = stored["images"][keep], stored["labels"][keep]
    return (images.astype(np.float32) / np.float32(255.0))[:, None], labels.astype(np.int64)


def build_model(seed: int = SEED, flatten: str = "flatten"):
    """The fixture's architecture with seeded random weights (an nn.Module in train mode).

    `flatten` is how the pooled features become a matrix: "flatten" (`x.flatten(1)`, exported
    as Flatten) or "view" (`x.view(x.size(0), -1)`, exported with a dynamic batch axis as a
    Shape/Gather/Unsqueeze/Concat chain feeding Reshape). It can be changed on the trained
    module (`model.flatten = "view"`): it has no weights.
    """
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + x)

    class TorchCNN(nn.Module):
        def __init__(self, width: int = 16, num_classes: int = 10, flatten: str = "flatten"):
            super().__init__()
            self.flatten = flatten
            self.stem = nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            self.pool = nn.MaxPool2d(2)
            self.block = BasicBlock(width)
            self.dw = nn.Sequential(
                nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width, bias=False),
                nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            self.pw = nn.Sequential(
                nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True))
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.dropout = nn.Dropout(0.1)
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            x = self.pool(self.stem(x))          # 28 -> 14
            x = self.block(x)
            x = self.pw(self.dw(x))              # 14 -> 7
            x = self.gap(x)
            if self.flatten == "view":
                x = x.view(x.size(0), -1)        # Shape -> Gather -> Unsqueeze -> Concat -> Reshape
            else:
                x = x.flatten(1)                 # Flatten(axis=1)
            return self.fc(self.dropout(x))

    torch.manual_seed(seed)
    return TorchCNN(flatten=flatten)


def train(model, epochs: int = EPOCHS, seed: int = SEED, log=print):
    """Adam with a one-cycle learning rate on the MNIST-5k train split; returns the model in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    images, labels = load_mnist("train")
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    steps = epochs * -(-len(x_all) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            optimizer.zero_grad()
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"epoch {epoch + 1}/{epochs}: val top-1 {evaluate(model):.4f}")
    return model.eval()


def evaluate(model) -> float:
    """Top-1 of `model` (eval mode) on the MNIST-5k val split."""
    import torch

    images, labels = load_mnist("val")
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(images))
    return float((logits.argmax(1).numpy() == labels).mean())


def export_onnx(model, path) -> Path:
    """Export `model` in eval mode: opset 17, input `input` [N,1,28,28], output `logits`, batch dynamic."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.zeros(2, 1, 28, 28)
    kwargs = dict(opset_version=OPSET, input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=True)
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=False, **kwargs)
    except TypeError:  # torch < 2.5 has no `dynamo` argument; its only exporter is TorchScript
        torch.onnx.export(model, (example,), str(path), **kwargs)
    return path


def main(out: Path = FIXTURE, view_out: Path = VIEW_FIXTURE) -> None:
    """Train once; export the `x.flatten(1)` form to `out` and the `view` form to `view_out`."""
    import onnx
    import torch

    torch.set_num_threads(2)
    model = train(build_model())
    top1 = evaluate(model)
    for flatten, path in (("flatten", out), ("view", view_out)):
        model.flatten = flatten
        export_onnx(model, path)
        onnx.checker.check_model(onnx.load(path), full_check=True)
        print(f"torch {torch.__version__}, onnx {onnx.__version__}: float val top-1 {top1:.4f}; "
              f"wrote {path} ({path.stat().st_size} bytes, {flatten})")


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:3]))
