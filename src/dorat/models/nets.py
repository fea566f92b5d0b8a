"""Architectures used in the adversarial-training literature.

- SmallCNN: the 4-conv + 3-FC network of TRADES/FAT/GAIRAT for 28×28 data (no BatchNorm).
- ResNet18 and PreActResNet18 with the CIFAR stem (3×3 conv, no max-pool).
- WideResNet-34-10 (Zagoruyko & Komodakis), the standard robust-training backbone.
- Small CIFAR nets for CPU budgets (docs/PERFORMANCE.md, "A CIFAR-10 budget"): ResNet-20 (He et
  al. 2016's CIFAR ResNet, widths 16/32/64), a narrow PreAct-ResNet-18 (base width 16), and
  VGG8, a 7-conv BatchNorm net in the style of airbench's (conv, then three stages of conv,
  max-pool, BN, ReLU, conv), base width 16 or 32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"small-cnn needs images of at least 14 pixels, got {image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 200), nn.ReLU(),
            nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, num_classes),
        )
        # He initialisation: with PyTorch's default init this BatchNorm-free network sits on a
        # loss plateau at chance level for the first epochs of adversarial training.
        # The output layer starts small, so initial losses are near log C for every example (no
        # large first steps, which can kill ReLUs when a reweighting puts weight on the worst).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier[-1].weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class _ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], preact: bool, in_channels: int, num_classes: int,
                 widths: tuple[int, ...] = (64, 128, 256, 512), blocks: int = 2):
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[-1] if preact else widths[0])
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            layers += [block(cin, cout, 1 if i == 0 else 2)]
            layers += [block(cout, cout, 1) for _ in range(blocks - 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.preact:
            out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class ResNet18(_ResNet):
    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__(BasicBlock, False, in_channels, num_classes)


class PreActResNet18(_ResNet):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        # bn1 is the final pre-activation BN on the last block's output
        super().__init__(PreActBlock, True, in_channels, num_classes,
                         (width, 2 * width, 4 * width, 8 * width))


class ResNet20(_ResNet):
    """He et al. (2016), section 4.2: three stages of 3 basic blocks, widths 16, 32, 64."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__(BasicBlock, False, in_channels, num_classes, (16, 32, 64), blocks=3)


class VGG8(nn.Module):
    """conv-BN-ReLU, then three stages of (conv, max-pool 2, BN, ReLU, conv, BN, ReLU) at widths
    w, 2w, 4w, global max-pool, linear: 7 convolutions, ~54 MFLOP per 32×32 image at w = 32."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        layers, cin = conv_bn(in_channels, width), width
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(cout), nn.ReLU(), *conv_bn(cout, cout)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.adaptive_max_pool2d(self.features(x), 1).flatten(1))


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        out = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, width: int = 10, in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, stride in enumerate([1, 2, 2]):
            for j in range(n):
                blocks.append(WideBlock(cin, widths[i + 1], stride if j == 0 else 1))
                cin = widths[i + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
