"""Feature networks for distribution metrics (FID, MMD, memorisation): MedicalNet's 3D ResNets or our encoder.

Every number computed with a feature network must name it: :class:`FeatureNet` carries a name and the SHA-256 of
its weights. Nothing is downloaded: MedicalNet weights are a local file given by path (the published
``resnet_10.pth`` ... ``resnet_50.pth``, ``resnet_50_23dataset.pth``), read with ``torch.load(weights_only=True)``
into MedicalNet's architecture as published (:mod:`hagan_clinic.models.medicalnet`: layer3 and layer4 at stride 1
with dilation 2 and 4), its segmentation head dropped, so a volume maps to the globally pooled layer4 output (512
or 2048 features). Volumes go in as the paper's evaluation fed them: in [-1, 1], not normalised any further.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import HaganError, one_line
from .io.torch_files import CheckpointError, file_sha256, load_untrusted
from .models.medicalnet import BLOCKS, MedicalNetResNet, is_bottleneck

# model units leave the generator through tanh and the cache clipped; anything beyond this is another scale
_RANGE_SLACK = 1e-2


class FeatureNetError(HaganError):
    """A feature-network file that cannot be used; the message names the file and the problem."""


@dataclass
class FeatureNet:
    """``extract`` maps volumes (N, 1, S, S, S) in [-1, 1] to features (N, D) float64.

    ``network``: the torch module behind ``extract`` when there is one, for inspection; ``file``: the name of the
    weights file, when the weights came from one (which of the published files, at a glance).
    """

    name: str
    sha256: str
    extract: Callable[[torch.Tensor], np.ndarray]
    network: torch.nn.Module | None = None
    file: str | None = None

    def describe(self) -> dict[str, str]:
        """What every result computed with this network carries: its name, its weights file and their SHA-256."""
        described = {"feature_net": self.name, "feature_net_sha256": self.sha256}
        return described if self.file is None else described | {"feature_net_file": self.file}


def _depth_of(state: dict[str, torch.Tensor]) -> int:
    """ResNet depth from the layer keys: blocks per stage, and bottleneck blocks (conv3) for depth >= 50."""
    counts = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(ids))
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    for depth, blocks in BLOCKS.items():
        if list(blocks) == counts and bottleneck == is_bottleneck(depth):
            return depth
    raise FeatureNetError(f"not a MedicalNet ResNet (blocks per stage {counts})")


def _shortcut_of(state: dict[str, torch.Tensor]) -> str:
    """'B' when the file has projection shortcuts (``downsample.0`` convolutions), else the parameter-free 'A'."""
    return "B" if any(".downsample.0." in k for k in state) else "A"


def medicalnet(path: str | Path, device: str = "cpu") -> FeatureNet:
    """MedicalNet's ResNet from a local weights file: a state dict, or {'state_dict': ...} as published (keys may
    carry DataParallel's ``module.``; a ``conv_seg`` segmentation head is dropped). Every other key must fit."""
    path = Path(path)
    if not path.is_file():
        raise FeatureNetError(f"feature-network weights not found: {path}")
    try:
        payload = load_untrusted(path, "feature-network weights file")
    except CheckpointError as err:
        raise FeatureNetError(str(err)) from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatureNetError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("conv_seg.")}
    try:
        depth = _depth_of(state)
    except FeatureNetError as err:
        raise FeatureNetError(f"{path}: {err}") from None
    net = MedicalNetResNet(depth, _shortcut_of(state))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = one_line(err, 160)
        raise FeatureNetError(f"{path}: weights do not fit MedicalNet's ResNet-{depth} ({first})") from None
    net = net.to(device).eval()

    @torch.no_grad()
    def extract(x: torch.Tensor) -> np.ndarray:
        x = x.to(device, torch.float32)
        # as the paper's evaluation fed them, so that FID and MMD mean what its tables mean (MedicalNet's own
        # training z-scored each volume; features of z-scored volumes are another feature space)
        lo, hi = float(x.min()), float(x.max())
        if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise FeatureNetError(f"MedicalNet features need volumes in [-1, 1] (model units), got [{lo:g}, {hi:g}]")
        return net(x).double().cpu().numpy()

    return FeatureNet(f"medicalnet-resnet{depth}", file_sha256(path), extract, net, path.name)


def hagan_encoder(model, checkpoint_sha256: str) -> FeatureNet:
    """The checkpoint's own encoder (E^G after E^H): latent vectors as features. Always available, but a model
    judged by its own encoder is judged leniently: prefer an independent network when one is at hand."""

    @torch.no_grad()
    def extract(x: torch.Tensor) -> np.ndarray:
        return model.encode(x).double().cpu().numpy()

    return FeatureNet("hagan-encoder", checkpoint_sha256, extract)
