"""ResNets for 32x32 inputs (He et al. 2016, CIFAR variant): 3 stages of basic blocks,
depth = 6n + 2, global average pooling, so smaller inputs (digits' 8x8) work too."""
import torch.nn as nn
import torch.nn.functional as F

from kdexp.errors import ConfigError
from kdexp.models import register_model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, depth: int, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ConfigError(f"resnet depth={depth}: must be 6n+2 (8, 14, 20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        c = widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(c if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c = w
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


def _resnet(depth: int):
    def build(in_shape, num_classes, width: int = 1):
        if len(in_shape) != 3:
            raise ConfigError(f"resnet{depth} needs image inputs (C,H,W); this dataset gives shape {in_shape}")
        return CifarResNet(in_shape[0], num_classes, depth, tuple(width * w for w in (16, 32, 64)))

    build.__doc__ = f"CIFAR ResNet-{depth}; `width` multiplies the stage widths 16-32-64."
    return build


for _depth in (8, 20):
    register_model(f"resnet{_depth}")(_resnet(_depth))
