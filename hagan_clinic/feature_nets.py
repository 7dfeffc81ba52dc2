"""Feature networks for distribution metrics (FID, MMD, memorisation): MedicalNet-style 3D ResNets or our encoder.

Every number computed with a feature network must name it: :class:`FeatureNet` carries a name and the SHA-256 of
its weights. Nothing is downloaded: MedicalNet weights are a local file given by path (the published
``resnet_10.pth`` ... ``resnet_50.pth``), read with ``torch.load(weights_only=True)``; the architecture is MONAI's
ResNet with the arguments MedicalNet was trained with (MONAI's ``get_medicalnet_pretrained_resnet_args``), its
classifier removed, so a volume maps to the globally pooled last stage (512 or 2048 features).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import file_sha256, load_untrusted
from .errors import HaganError

BLOCKS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


class FeatureNetError(HaganError):
    """A feature-network file that cannot be used; the message names the file and the problem."""


@dataclass
class FeatureNet:
    """``extract`` maps volumes (N, 1, S, S, S) in [-1, 1] to features (N, D) float64."""

    name: str
    sha256: str
    extract: Callable[[torch.Tensor], np.ndarray]

    def describe(self) -> dict[str, str]:
        return {"feature_net": self.name, "feature_net_sha256": self.sha256}


def _depth_of(state: dict[str, torch.Tensor]) -> int:
    """ResNet depth from the layer keys: blocks per stage, and bottleneck blocks (conv3) for depth >= 50."""
    counts = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(ids))
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    for depth, blocks in BLOCKS.items():
        if blocks == counts and bottleneck == (depth >= 50):
            return depth
    raise FeatureNetError(f"not a MedicalNet ResNet (blocks per stage {counts})")


def medicalnet(path: str | Path, device: str = "cpu") -> FeatureNet:
    """A MedicalNet ResNet from a local weights file (a state dict, or {'state_dict': ...} as published)."""
    from monai.networks.nets import ResNet
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    path = Path(path)
    if not path.is_file():
        raise FeatureNetError(f"feature-network weights not found: {path}")
    payload = load_untrusted(path)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatureNetError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc")}
    depth = _depth_of(state)
    bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
    net = ResNet(
        "bottleneck" if depth >= 50 else "basic", BLOCKS[depth], [64, 128, 256, 512], spatial_dims=3,
        n_input_channels=1, conv1_t_size=7, conv1_t_stride=2, shortcut_type=shortcut, feed_forward=False,
        bias_downsample=bias_downsample,
    )  # fmt: skip
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:160]
        raise FeatureNetError(f"{path}: weights do not fit a MedicalNet ResNet-{depth} ({first})") from None
    net = net.to(device).eval()

    @torch.no_grad()
    def extract(x: torch.Tensor) -> np.ndarray:
        x = x.to(device, torch.float32)
        # MedicalNet was trained on volumes normalised to zero mean and unit variance, one by one
        mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        std = x.std(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        return net((x - mean) / std).double().cpu().numpy()

    return FeatureNet(f"medicalnet-resnet{depth}", file_sha256(path), extract)


def hagan_encoder(model, checkpoint_sha256: str) -> FeatureNet:
    """The checkpoint's own encoder (E^G after E^H): latent vectors as features. Always available, but a model
    judged by its own encoder is judged leniently: prefer an independent network when one is at hand."""

    @torch.no_grad()
    def extract(x: torch.Tensor) -> np.ndarray:
        return model.encode(x).double().cpu().numpy()

    return FeatureNet("hagan-encoder", checkpoint_sha256, extract)
