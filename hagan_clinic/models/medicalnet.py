"""MedicalNet's 3D ResNet (Chen, Ma and Zheng, "Med3D", 2019) as its weights were trained, without the head.

Shapes for an input (N, 1, D, H, W), with e = 1 for basic blocks (depth 10, 18, 34) and e = 4 for bottleneck
blocks (depth 50, 101), and every size rounded up:

    conv1 7^3 stride 2, BN, ReLU          -> (N, 64, D/2, H/2, W/2)
    max pool 3^3 stride 2                 -> (N, 64, D/4, H/4, W/4)
    layer1  stride 1                      -> (N, 64e, D/4, H/4, W/4)
    layer2  stride 2                      -> (N, 128e, D/8, H/8, W/8)
    layer3  stride 1, dilation 2          -> (N, 256e, D/8, H/8, W/8)
    layer4  stride 1, dilation 4          -> (N, 512e, D/8, H/8, W/8)
    global average pool                   -> (N, 512e): 512 or 2048 features

Parameter and buffer names are MedicalNet's (``conv1``, ``bn1``, ``layerK.B.convJ``, ``layerK.B.bnJ``,
``layerK.B.downsample.0`` / ``.1``), so its published weights load with ``strict=True`` once the DataParallel
prefix ``module.`` is stripped and its segmentation head ``conv_seg`` is dropped.

Written here rather than taken from MONAI: MONAI's ResNet has no dilation, so its layer3 and layer4 halve the grid
again; MedicalNet's weights load into it (the names and shapes agree) but compute other features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS: dict[int, tuple[int, int, int, int]] = {
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
# (width, stride, dilation) of layer1..layer4
STAGES = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))
# the shortcut each published weights file was trained with: 'A' zero-pads the identity, 'B' is conv 1^3 + BN
PUBLISHED_SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B", 101: "B"}


def is_bottleneck(depth: int) -> bool:
    return depth >= 50


class ZeroPadShortcut(nn.Module):
    """Shortcut 'A': the identity subsampled by ``stride`` with zero channels appended; no parameters."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.channels, self.stride = channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        x = x[:, :, ::s, ::s, ::s]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.channels - x.shape[1]))


def _shortcut(kind: str, c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    if kind == "A":
        return ZeroPadShortcut(c_out, stride)
    return nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm3d(c_out))


def _conv3(c_in: int, c_out: int, stride: int, dilation: int) -> nn.Conv3d:
    # padding = dilation keeps the grid at stride 1 whatever the dilation
    return nn.Conv3d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3^3 convolutions (the first one strided) and a shortcut: (N, c_in, ...) -> (N, width, .../stride)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, dilation: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = _conv3(c_in, width, stride, dilation)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = _conv3(width, width, 1, dilation)
        self.bn2 = nn.BatchNorm3d(width)
        self.downsample = _shortcut(shortcut, c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


class Bottleneck(nn.Module):
    """1^3 reduce, 3^3 (strided, dilated), 1^3 expand to 4 x width, and a shortcut."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, dilation: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = _conv3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(width * 4)
        self.downsample = _shortcut(shortcut, c_in, width * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


class MedicalNetResNet(nn.Module):
    """MedicalNet's ResNet-``depth`` backbone: volumes (N, 1, D, H, W) -> pooled features (N, 512 or 2048).

    ``shortcut``: 'A' or 'B'; by default the one the published weights of that depth were trained with.
    """

    def __init__(self, depth: int, shortcut: str | None = None) -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"depth must be one of {sorted(BLOCKS)}, got {depth}")
        shortcut = shortcut or PUBLISHED_SHORTCUT[depth]
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.depth, self.shortcut = depth, shortcut
        block = Bottleneck if is_bottleneck(depth) else BasicBlock
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        c_in, stages = 64, []
        for n_blocks, (width, stride, dilation) in zip(BLOCKS[depth], STAGES):
            blocks = []
            for b in range(n_blocks):
                blocks.append(block(c_in, width, stride if b == 0 else 1, dilation, shortcut))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_features = c_in

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> layer4's output (N, 512e, D/8, H/8, W/8)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool3d(self.feature_map(x), 1), 1)
