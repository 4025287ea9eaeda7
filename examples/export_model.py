#!/usr/bin/env python3
"""Exports a PyTorch model to TorchScript for ringtrain (`model = "net.pt"`).

Run it with the project's Python: `.venv/bin/python examples/export_model.py
--model bn-cnn --out net.pt`. Any nn.Module that torch.jit.script (or
torch.jit.trace) accepts works the same way: ringtrain trains every parameter
that requires a gradient, keeps buffers (BatchNorm statistics) identical on
every replica, runs dropout in training and not in evaluation, and checkpoints
everything under the module's own names (model.safetensors loads back with
`module.load_state_dict(safetensors.torch.load_file(...))`).

Models:
  cnn       the built-in CNN (shared/bench/peers/ddp_train.py) with its names
  bn-cnn    a CNN with BatchNorm and Dropout
  resnet    a small residual network with BatchNorm
  own-loss  an MLP whose forward(inputs, targets) returns its loss (loss = "model")
  tabular   an MLP for feature vectors (--inputs N)
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F


class CNN(nn.Module):
    """The reference CNN: the same layers, names and shapes as ringtrain's `cnn`."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 5, padding=2)
        self.c2 = nn.Conv2d(32, 64, 5, padding=2)
        self.f1 = nn.Linear(3136, 1024)
        self.f2 = nn.Linear(1024, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


class BnCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 128),
                                  nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, classes))

    def forward(self, x):
        return self.head(self.features(x))


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.stage1 = Block(32)
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.stage2 = Block(64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.stage2(F.relu(self.down(self.stage1(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class OwnLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x, y):
        return F.cross_entropy(self.body(x), y)


class Tabular(nn.Module):
    def __init__(self, inputs: int, classes: int):
        super().__init__()
        self.hidden = nn.Linear(inputs, 64)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, classes)

    def forward(self, x):
        return self.out(F.gelu(self.norm(self.hidden(x))))


MODELS = {"cnn": CNN, "bn-cnn": BnCNN, "resnet": ResNet, "own-loss": OwnLoss, "tabular": Tabular}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="bn-cnn")
    p.add_argument("--out", default="net.pt")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inputs", type=int, default=20, help="tabular: features per sample")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    cls = MODELS[args.model]
    if cls is OwnLoss:
        net = cls()
    elif cls is Tabular:
        net = cls(args.inputs, args.classes)
    else:
        net = cls(args.classes)
    scripted = torch.jit.script(net)
    scripted.save(args.out)
    params = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for b in net.buffers())
    print(f"{args.out}: {args.model}, {params} parameters, {buffers} buffer values")


if __name__ == "__main__":
    main()
