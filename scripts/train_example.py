"""The ort-training script: build a model, train it in float with ONNX Runtime, save it.

    python scripts/train_example.py [--model lenet] [--epochs 5] [-o lenet_trained.onnx]

Everything runs on ONNX: the model is an ONNX graph from qgraph's builders, training runs
through ONNX Runtime's training artifacts (no torch), and the result is a plain .onnx file.
"""

from __future__ import annotations

import argparse
import tempfile

from qgraph.model_io import save_model
from qgraph.models.builders import build_model
from qgraph.models.datasets import load_dataset
from qgraph.train import train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet", help="lenet, mlp, resnet, mobilenetv2 or repvgg")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("-o", "--output", default="trained.onnx")
    args = parser.parse_args()

    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")  # 4000 / 1000 real digits
    model = build_model(args.model, input_shape=(1, 28, 28), num_classes=10, seed=0)
    with tempfile.TemporaryDirectory() as workdir:  # artifacts and per-epoch checkpoints
        trained, history = train_model(model, train, val, epochs=args.epochs, lr=args.lr, batch_size=64,
                                       optimizer="adamw", schedule="linear", workdir=workdir)
    for h in history:
        print(f"epoch {h['epoch']}: train loss {h['train_loss']:.4f}, val loss {h['val_loss']:.4f}, "
              f"val top-1 {h['val_top1']:.3f}, {h['images_per_s']:.0f} images/s")
    save_model(trained, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
