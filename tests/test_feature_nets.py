"""MedicalNet's ResNet as published: its weights' layout, its grid, its forward pass, its input scale, its files.

The expected layouts and the reference forward pass below are spelled out from MedicalNet's published architecture
(conv1 7^3 stride 2, max pool stride 2; layer1..4 of 64, 128, 256, 512 channels (x4 for bottleneck blocks), layer2
at stride 2, layer3 and layer4 at stride 1 with dilation 2 and 4; projection shortcuts for depth 10 and 50, zero-pad
shortcuts for 18 and 34), independently of hagan_clinic.models.medicalnet. Weights are random and made here.
"""

from __future__ import annotations

import functools
import hashlib

import pytest
import torch
import torch.nn.functional as F

from hagan_clinic.feature_nets import FeatureNetError, medicalnet
from hagan_clinic.models.medicalnet import MedicalNetResNet

DEPTHS = (10, 18, 34, 50)
STAGE_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
STAGE_STRIDE = (1, 2, 1, 1)
STAGE_DILATION = (1, 1, 2, 4)


def _bn(name: str, c: int) -> dict[str, tuple[int, ...]]:
    """A BatchNorm3d's five entries."""
    shapes = {k: (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {"num_batches_tracked": ()}
    return {f"{name}.{k}": shape for k, shape in shapes.items()}


def published_layout(depth: int) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of MedicalNet's ResNet-``depth`` without its head, with its shape."""
    bottleneck, projection = depth >= 50, depth in (10, 50)
    layout = {"conv1.weight": (64, 1, 7, 7, 7), **_bn("bn1", 64)}
    c_in = 64
    for k, n_blocks in enumerate(STAGE_BLOCKS[depth], start=1):
        width = 64 * 2 ** (k - 1)
        c_out = 4 * width if bottleneck else width
        for b in range(n_blocks):
            convs = [(c_in, width, 1), (width, width, 3), (width, c_out, 1)] if bottleneck else [
                (c_in, width, 3), (width, width, 3)
            ]  # fmt: skip
            for j, (i, o, size) in enumerate(convs, start=1):
                layout[f"layer{k}.{b}.conv{j}.weight"] = (o, i, size, size, size)
                layout |= _bn(f"layer{k}.{b}.bn{j}", o)
            if b == 0 and projection and (STAGE_STRIDE[k - 1] != 1 or c_in != c_out):
                layout[f"layer{k}.{b}.downsample.0.weight"] = (c_out, c_in, 1, 1, 1)
                layout |= _bn(f"layer{k}.{b}.downsample.1", c_out)
            c_in = c_out
    return layout


def published_geometry(depth: int) -> dict[str, tuple[int, int, int]]:
    """(stride, dilation, padding) of every convolution, by name."""
    geometry = {"conv1": (2, 1, 3)}
    strided = "conv2" if depth >= 50 else "conv1"  # the block's first 3^3 convolution carries the stride
    for name, shape in published_layout(depth).items():
        if not name.startswith("layer") or not name.endswith(".weight") or len(shape) != 5:
            continue
        k, b, conv = int(name[5]), int(name.split(".")[1]), name.split(".")[2]
        stride = STAGE_STRIDE[k - 1] if b == 0 and conv in (strided, "downsample") else 1
        dilation, padding = (STAGE_DILATION[k - 1],) * 2 if shape[-1] == 3 else (1, 0)
        geometry[name.removesuffix(".weight").removesuffix(".0")] = (stride, dilation, padding)
    return geometry


@functools.cache
def random_weights(depth: int) -> dict[str, torch.Tensor]:
    """Weights of the published layout, scaled so that activations stay near unit size through every block."""
    g = torch.Generator().manual_seed(depth)
    state = {}
    for name, shape in published_layout(depth).items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif len(shape) == 5:
            state[name] = torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] ** 3)) ** 0.5
        elif name.endswith(("weight", "running_var")):
            state[name] = 0.5 + torch.rand(shape, generator=g)
        else:
            state[name] = 0.1 * torch.randn(shape, generator=g)
    return state


def segmentation_head(depth: int) -> dict[str, torch.Tensor]:
    """MedicalNet's ``conv_seg`` head (transposed conv, BN, conv, BN, conv to 2 classes), as a trained file has it."""
    c = 2048 if depth >= 50 else 512
    head = {"conv_seg.0.weight": torch.zeros(c, 32, 2, 2, 2), "conv_seg.0.bias": torch.zeros(32)}
    head |= {f"conv_seg.1.{k}": torch.ones(32) for k in ("weight", "bias", "running_mean", "running_var")}
    head |= {"conv_seg.3.weight": torch.zeros(32, 32, 3, 3, 3), "conv_seg.6.weight": torch.zeros(2, 32, 1, 1, 1)}
    return head | {f"conv_seg.4.{k}": torch.ones(32) for k in ("weight", "bias", "running_mean", "running_var")}


@pytest.fixture(scope="module")
def published_file(tmp_path_factory):
    """``published_file(depth)``: a weights file as MedicalNet publishes it, {'state_dict': {'module.' + key: ...}}."""
    folder = tmp_path_factory.mktemp("medicalnet")

    @functools.cache
    def write(depth: int):
        path = folder / f"resnet_{depth}.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in random_weights(depth).items()}}, path)
        return path

    return write


@pytest.fixture(scope="module")
def loaded(published_file):
    """``loaded(depth)``: ``medicalnet`` of ``published_file(depth)``, read once per depth."""
    return functools.cache(lambda depth: medicalnet(published_file(depth)))


def reference_features(state: dict[str, torch.Tensor], depth: int, x: torch.Tensor) -> torch.Tensor:
    """MedicalNet's forward pass on ``x`` as it is, in torch.nn.functional, then the global average of layer4."""

    def bn(h, name):
        p = {k: state[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        return F.batch_norm(h, p["running_mean"], p["running_var"], p["weight"], p["bias"], False, 0.0, 1e-5)

    def conv(h, name, stride=1, dilation=1):
        w = state[f"{name}.weight"]
        return F.conv3d(h, w, stride=stride, padding=dilation * (w.shape[-1] // 2), dilation=dilation)

    h = F.max_pool3d(F.relu(bn(conv(x, "conv1", stride=2), "bn1")), 3, stride=2, padding=1)
    for k, n_blocks in enumerate(STAGE_BLOCKS[depth], start=1):
        d = STAGE_DILATION[k - 1]
        for b in range(n_blocks):
            p, s = f"layer{k}.{b}", STAGE_STRIDE[k - 1] if b == 0 else 1
            if depth >= 50:
                out = F.relu(bn(conv(h, f"{p}.conv1"), f"{p}.bn1"))
                out = F.relu(bn(conv(out, f"{p}.conv2", s, d), f"{p}.bn2"))
                out = bn(conv(out, f"{p}.conv3"), f"{p}.bn3")
            else:
                out = F.relu(bn(conv(h, f"{p}.conv1", s, d), f"{p}.bn1"))
                out = bn(conv(out, f"{p}.conv2", 1, d), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in state:
                short = bn(conv(h, f"{p}.downsample.0", s), f"{p}.downsample.1")
            else:  # 'A': every s-th voxel, missing channels zero
                short = F.avg_pool3d(h, 1, stride=s)
                short = torch.cat(
                    [short, short.new_zeros(short.shape[0], out.shape[1] - short.shape[1], *short.shape[2:])], 1
                )
            h = F.relu(out + short)
    return h.mean(dim=(2, 3, 4))


def _volumes(n: int = 2, size: int = 32, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(size)
    return scale * (torch.rand(n, 1, size, size, size, generator=g) * 2 - 1)


@pytest.mark.slow
@pytest.mark.parametrize("depth", DEPTHS)
def test_network_has_medicalnets_layout_geometry_and_feature_size(loaded, depth):
    net = loaded(depth)
    assert isinstance(net.network, MedicalNetResNet)
    assert {k: tuple(v.shape) for k, v in net.network.state_dict().items()} == published_layout(depth)
    convs = {name: m for name, m in net.network.named_modules() if isinstance(m, torch.nn.Conv3d)}
    got = {name.removesuffix(".0"): (m.stride[0], m.dilation[0], m.padding[0]) for name, m in convs.items()}
    assert got == published_geometry(depth)
    assert net.extract(_volumes(1)).shape == (1, 2048 if depth >= 50 else 512)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.slow
def test_dilated_stages_keep_the_grid_of_layer2(loaded, depth):
    net = loaded(depth)
    grids = {}
    hooks = [
        getattr(net.network, f"layer{k}").register_forward_hook(lambda m, i, o, k=k: grids.update({k: o.shape[2:]}))
        for k in range(1, 5)
    ]
    net.extract(_volumes(1))
    for hook in hooks:
        hook.remove()
    assert grids == {1: (8, 8, 8), 2: (4, 4, 4), 3: (4, 4, 4), 4: (4, 4, 4)}


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.slow
def test_features_are_the_published_forward_pass_of_the_volume_as_given(loaded, depth):
    x = _volumes(2)
    got = torch.from_numpy(loaded(depth).extract(x))
    with torch.no_grad():
        want = reference_features(random_weights(depth), depth, x).double()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.slow
def test_input_is_not_normalised_per_volume(loaded):
    net = loaded(10)
    x = _volumes(2, scale=0.5)
    base = net.extract(x)
    # a per-volume z-score would make all three identical
    for other in (net.extract(2 * x), net.extract(x + 0.3)):
        assert abs(other - base).max() > 1e-3 * abs(base).max()


def test_volumes_outside_the_model_range_are_refused(loaded):
    net = loaded(10)
    with pytest.raises(FeatureNetError, match=r"\[-1, 1\]") as err:
        net.extract(_volumes(1) * 1000 - 24)  # Hounsfield units, not model units
    assert "\n" not in str(err.value)


def test_a_published_file_with_module_prefix_and_segmentation_head_loads(tmp_path):
    # files written before BatchNorm counted its batches have no num_batches_tracked: BatchNorm fills it in
    state = {k: v for k, v in random_weights(10).items() if "num_batches" not in k} | segmentation_head(10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "resnet_10.pth")
    net = medicalnet(tmp_path / "resnet_10.pth")
    loaded = net.network.state_dict()
    assert set(loaded) == set(random_weights(10))
    for k, v in random_weights(10).items():
        assert torch.equal(loaded[k], v), k


def _drop(state, key):
    return {k: v for k, v in state.items() if k != key}


MISMATCHES = {
    "a missing weight": (lambda s: _drop(s, "layer4.0.bn2.weight"), "do not fit"),
    "a wrong shape": (lambda s: s | {"conv1.weight": torch.zeros(64, 3, 7, 7, 7)}, "do not fit"),
    "a classifier": (lambda s: s | {"fc.weight": torch.zeros(2, 512), "fc.bias": torch.zeros(2)}, "do not fit"),
    "biased projections": (lambda s: s | {"layer2.0.downsample.0.bias": torch.zeros(128)}, "do not fit"),
    "missing blocks": (lambda s: {k: v for k, v in s.items() if not k.startswith("layer4")}, "not a MedicalNet"),
    "not tensors": (lambda s: {"conv1.weight": [1, 2, 3]}, "not a state dict"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_weights_that_do_not_fit_are_refused_in_one_line(tmp_path, case):
    change, message = MISMATCHES[case]
    path = tmp_path / "weights.pth"
    torch.save(change(dict(random_weights(10))), path)
    with pytest.raises(FeatureNetError, match=message) as err:
        medicalnet(path)
    assert "\n" not in str(err.value) and "weights.pth" in str(err.value)


def test_an_unreadable_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "resnet_50.pth").write_bytes(b"not a torch file")
    with pytest.raises(FeatureNetError, match="resnet_50.pth") as err:
        medicalnet(tmp_path / "resnet_50.pth")
    assert "\n" not in str(err.value)


def test_describe_names_the_network_the_file_and_its_sha256(published_file):
    path = published_file(18)
    assert medicalnet(path).describe() == {
        "feature_net": "medicalnet-resnet18",
        "feature_net_file": "resnet_18.pth",
        "feature_net_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"depth": 11}, "depth"), ({"depth": 18, "shortcut": "C"}, "shortcut")]
)
def test_bad_network_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MedicalNetResNet(**kwargs)
