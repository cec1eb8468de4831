"""The CIFAR model zoo of the distillation literature, under its usual names, plus
torchvision's ImageNet models by name.

Architectures follow RepDistiller (Tian et al., ICLR 2020), the reference code behind most
CIFAR-100 KD tables, with the same parameter names, so its published checkpoints
(`{'model': state_dict}`) load through `teacher.checkpoint`:
  resnet8/14/20/32/44/56/110 (filters 16-16-32-64), resnet8x4/resnet32x4 (32-64-128-256),
  wrn_16_2/wrn_40_1/wrn_40_2, vgg8/vgg13 (with BatchNorm, as RepDistiller's vgg8_bn/vgg13_bn),
  mobilenetv2 (RepDistiller's "MobileNetV2" = mobile_half: expansion 6, width 0.5),
  shufflenet_v1 (ShuffleV1, groups 3), shufflenet_v2 (ShuffleV2, net size 1).
Changes that leave the parameters as they are: the input channels follow the dataset, the
final pooling is adaptive (any H x W works, down to 8x8 digits), max-pooling uses ceil_mode
(a 1x1 map stays 1x1), and activations that the reference code applies as functions are
modules here so that feature taps can reach them (no parameters, so no new state-dict keys).

torchvision: resnet18, resnet34, resnet50, mobilenet_v3_small, mobilenet_v3_large, randomly
initialized (no weight download), with the first convolution taking the dataset's channels.
"""
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdexp.errors import ConfigError
from kdexp.models.layers import MaxPool2d
from kdexp.models.registry import register_model
from kdexp.models.taps import set_feature_layers


def _channels(name: str, in_shape) -> int:
    if len(in_shape) != 3:
        raise ConfigError(f"model {name!r} needs image inputs (C,H,W); this dataset gives shape {tuple(in_shape)}")
    return in_shape[0]


# ------------------------------------------------------------------------------- ResNet (CIFAR)

def fan_out_init(model: nn.Module, linear_std=None) -> None:
    """RepDistiller's initialization of WRN, VGG and MobileNetV2 (in module order, so seeded
    models are reproducible): conv weights N(0, sqrt(2 / (k_h k_w out))) and biases 0, BatchNorm
    1 and 0, linear biases 0 and, given linear_std, linear weights N(0, linear_std)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                m.weight.data.normal_(0, linear_std)
            m.bias.data.zero_()


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.out_relu = nn.ReLU()  # its input is the block's pre-activation ("...out_relu:in")

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.out_relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """He et al. 2016, CIFAR variant: 3x3 stem, 3 stages of (depth-2)/6 basic blocks (stride 2
    at stages 2 and 3), global average pooling, linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, depth: int, filters: Sequence[int]):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ConfigError(f"resnet depth={depth}: must be 6n+2 (8, 14, 20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU()
        c = filters[0]
        for i, width in enumerate(filters[1:4]):
            blocks = [BasicBlock(c if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        set_feature_layers(self, stem="relu", stages=["layer1", "layer2", "layer3"],
                           preact=[f"layer{i}.{n - 1}.out_relu:in" for i in (1, 2, 3)], embedding="flatten")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _resnet(depth: int, filters: Sequence[int], name: str):
    def build(in_shape, num_classes, width: int = 1):
        if width < 1:
            raise ConfigError(f"{name} width={width}: must be an integer >= 1")
        return CifarResNet(_channels(name, in_shape), num_classes, depth, [width * f for f in filters])

    build.__doc__ = (f"CIFAR ResNet-{depth}, filters {'-'.join(map(str, filters))} (stem-stage1-stage2-stage3); "
                     f"`width` multiplies them.")
    return build


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}")(_resnet(_depth, (16, 16, 32, 64), f"resnet{_depth}"))
for _depth in (8, 32):
    register_model(f"resnet{_depth}x4")(_resnet(_depth, (32, 64, 128, 256), f"resnet{_depth}x4"))


# ------------------------------------------------------------------------------- Wide ResNet

class WideBasic(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
            out = x
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return (x if self.equal_in_out else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasic(in_planes if i == 0 else out_planes, out_planes,
                                               stride if i == 0 else 1, dropout) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """Zagoruyko & Komodakis 2016: WRN-depth-k, 3 groups of (depth-4)/6 pre-activation blocks
    of widths 16k, 32k, 64k, then BN-ReLU, global average pooling, linear."""

    def __init__(self, in_channels: int, num_classes: int, depth: int, widen: int, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ConfigError(f"wrn depth={depth}: must be 6n+4 (10, 16, 22, 28, 40, ...)")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, dropout)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, dropout)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(ch[3], num_classes)
        fan_out_init(self)
        # Stage outputs as the network produces them (pre-activation design: before BN-ReLU);
        # preact: the BN that the next stage applies to them (RepDistiller's preact features).
        set_feature_layers(self, stem="conv1", stages=["block1", "block2", "block3"],
                           preact=["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"], embedding="flatten")

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn1(out)))))


def _wrn(depth: int, widen: int, name: str):
    def build(in_shape, num_classes, dropout: float = 0.0):
        return WideResNet(_channels(name, in_shape), num_classes, depth, widen, dropout)

    build.__doc__ = f"Wide ResNet-{depth}-{widen} (CIFAR); `dropout` between the convolutions of a block."
    return build


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register_model(f"wrn_{_depth}_{_widen}")(_wrn(_depth, _widen, f"wrn_{_depth}_{_widen}"))


# ------------------------------------------------------------------------------- VGG (CIFAR)

VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class VGG(nn.Module):
    """VGG with BatchNorm for CIFAR (RepDistiller): 5 conv blocks, max-pooling after blocks
    0-2 (and 3 for inputs of 64 pixels or more), global average pooling, one linear layer."""

    def __init__(self, cfg, in_channels: int, num_classes: int):
        super().__init__()
        c = in_channels
        for i, block in enumerate(cfg):
            layers = []
            for width in block:
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                c = width
            setattr(self, f"block{i}", nn.Sequential(*layers[:-1]))  # the last ReLU is act{i}
            setattr(self, f"act{i}", nn.ReLU())
        for i in range(4):
            setattr(self, f"pool{i}", MaxPool2d(2, 2, ceil_mode=True))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        fan_out_init(self, linear_std=0.01)
        set_feature_layers(self, stem="act0", stages=["act1", "act2", "act3", "act4"],
                           preact=["block1", "block2", "block3", "block4"], embedding="flatten")

    def forward(self, x):
        h = x.shape[2]
        x = self.pool0(self.act0(self.block0(x)))
        x = self.pool1(self.act1(self.block1(x)))
        x = self.pool2(self.act2(self.block2(x)))
        x = self.act3(self.block3(x))
        if h >= 64:
            x = self.pool3(x)
        x = self.act4(self.block4(x))
        return self.classifier(self.flatten(self.pool4(x)))


def _vgg(name: str):
    def build(in_shape, num_classes):
        return VGG(VGG_CFG[name], _channels(name, in_shape), num_classes)

    build.__doc__ = f"{name} with BatchNorm (CIFAR), blocks {VGG_CFG[name]}."
    return build


for _name in ("vgg8", "vgg13"):
    register_model(_name)(_vgg(_name))


# ------------------------------------------------------------------------------- MobileNetV2

def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear), + identity when the
    shape is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """Sandler et al. 2018 in RepDistiller's CIFAR form (stride-2 stem, strides 1,1,2,2,1,2,1)."""
    SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
               (None, 160, 3, 2), (None, 320, 1, 1)]  # (expansion or None = T, channels, blocks, stride)

    def __init__(self, in_channels: int, num_classes: int, expand: int = 6, width_mult: float = 0.5):
        super().__init__()
        c = int(32 * width_mult)
        self.conv1 = _conv_bn(in_channels, c, 2)
        self.blocks = nn.ModuleList()
        for t, ch, n, s in self.SETTING:
            out = int(ch * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, expand if t is None else t))
                c = out
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(nn.Conv2d(c, last, 1, 1, 0, bias=False), nn.BatchNorm2d(last), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        fan_out_init(self, linear_std=0.01)
        # block outputs are linear (no ReLU): stages and preact coincide
        set_feature_layers(self, stem="conv1", stages=["blocks.1", "blocks.2", "blocks.4", "blocks.6"],
                           embedding="flatten")

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.flatten(self.avgpool(self.conv2(x))))


@register_model("mobilenetv2")
def mobilenetv2(in_shape, num_classes, expand: int = 6, width_mult: float = 0.5) -> nn.Module:
    """MobileNetV2 for CIFAR as in RepDistiller's tables (mobile_half: expansion 6, width 0.5)."""
    return MobileNetV2(_channels("mobilenetv2", in_shape), num_classes, expand, width_mult)


# ------------------------------------------------------------------------------- ShuffleNet V1

class ShuffleBlock(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; stride 2 concatenates an average-
    pooled shortcut, stride 1 adds the input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.out_relu = nn.ReLU()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(self.shuffle1(out))))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.out_relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """Zhang et al. 2018 (CIFAR form): 1x1 stem, 3 stages of [4, 8, 4] blocks to 240-480-960
    channels with 3 groups, global average pooling, linear."""

    def __init__(self, in_channels: int, num_classes: int, out_planes=(240, 480, 960), blocks=(4, 8, 4),
                 groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        c = 24
        for i, (out, n) in enumerate(zip(out_planes, blocks)):
            layers = []
            for j in range(n):
                layers.append(ShuffleV1Block(c, out - (c if j == 0 else 0), 2 if j == 0 else 1, groups))
                c = out
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(c, num_classes)
        set_feature_layers(self, stem="relu", stages=["layer1", "layer2", "layer3"],
                           preact=[f"layer{i + 1}.{n - 1}.out_relu:in" for i, n in enumerate(blocks)],
                           embedding="flatten")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


@register_model("shufflenet_v1")
def shufflenet_v1(in_shape, num_classes) -> nn.Module:
    """ShuffleNet V1 for CIFAR (RepDistiller's ShuffleV1: 240-480-960 channels, groups 3)."""
    return ShuffleNetV1(_channels("shufflenet_v1", in_shape), num_classes)


# ------------------------------------------------------------------------------- ShuffleNet V2

class SplitBlock(nn.Module):
    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class ShuffleV2Block(nn.Module):
    """Channel split; one half through 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU; concat; shuffle."""

    def __init__(self, in_channels: int, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.split = SplitBlock(0.5)
        c = int(in_channels * 0.5)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(2)
        self.preact = nn.Identity()  # tap point: concat of the kept half and the pre-ReLU branch

    def forward(self, x):
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        pre = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        if self.is_last:
            self.preact(torch.cat([x1, pre], 1))
        return self.shuffle(torch.cat([x1, F.relu(pre)], 1))


class ShuffleV2Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """Ma et al. 2018 (CIFAR form, net size 1): 1x1 stem, 3 stages (a stride-2 down block +
    [3, 7, 3] blocks) to 116-232-464 channels, 1x1 conv to 1024, global average pooling, linear."""

    def __init__(self, in_channels: int, num_classes: int, out_channels=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        c = 24
        for i, (out, n) in enumerate(zip(out_channels[:3], blocks)):
            layers = [ShuffleV2Down(c, out)] + [ShuffleV2Block(out, is_last=(j == n - 1)) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            c = out
        self.conv2 = nn.Conv2d(c, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(out_channels[3], num_classes)
        set_feature_layers(self, stem="relu", stages=["layer1", "layer2", "layer3"],
                           preact=[f"layer{i + 1}.{n}.preact" for i, n in enumerate(blocks)], embedding="flatten")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(self.relu2(self.bn2(self.conv2(x))))))


@register_model("shufflenet_v2")
def shufflenet_v2(in_shape, num_classes) -> nn.Module:
    """ShuffleNet V2 for CIFAR (RepDistiller's ShuffleV2, net size 1)."""
    return ShuffleNetV2(_channels("shufflenet_v2", in_shape), num_classes)


# ------------------------------------------------------------------------------- torchvision

def _replace_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _tv_resnet(name: str):
    def build(in_shape, num_classes):
        import torchvision.models as tvm

        model = getattr(tvm, name)(weights=None, num_classes=num_classes)
        model.conv1 = _replace_first_conv(model.conv1, _channels(name, in_shape))
        last = {i: len(getattr(model, f"layer{i}")) - 1 for i in (1, 2, 3, 4)}
        # a block's ReLU runs more than once; a tap keeps the last call: the block output
        return set_feature_layers(model, stem="relu", stages=[f"layer{i}" for i in (1, 2, 3, 4)],
                                  preact=[f"layer{i}.{last[i]}.relu:in" for i in (1, 2, 3, 4)],
                                  embedding="avgpool")

    build.__doc__ = f"torchvision {name} (ImageNet architecture, random init), first conv takes the input channels."
    return build


def _tv_mobilenet_v3(name: str):
    def build(in_shape, num_classes):
        import torchvision.models as tvm

        model = getattr(tvm, name)(weights=None, num_classes=num_classes)
        model.features[0][0] = _replace_first_conv(model.features[0][0], _channels(name, in_shape))
        # stage ends: the last block at each spatial size (for this input size)
        sizes = []
        with torch.no_grad():
            model.eval()
            x = torch.zeros(1, *in_shape)
            for block in model.features:
                x = block(x)
                sizes.append(tuple(x.shape[-2:]))
            model.train()
        ends = [i for i in range(1, len(sizes)) if i == len(sizes) - 1 or sizes[i + 1] != sizes[i]]
        return set_feature_layers(model, stem="features.0", stages=[f"features.{i}" for i in ends],
                                  embedding="avgpool")

    build.__doc__ = f"torchvision {name} (ImageNet architecture, random init), first conv takes the input channels."
    return build


for _name in ("resnet18", "resnet34", "resnet50"):
    register_model(_name)(_tv_resnet(_name))
for _name in ("mobilenet_v3_small", "mobilenet_v3_large"):
    register_model(_name)(_tv_mobilenet_v3(_name))
