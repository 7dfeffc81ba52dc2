"""Shape tables, equivalences and invariants of the HA-GAN networks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hagan_clinic.config import load_config
from hagan_clinic.models.discriminator import HighDiscriminator, LowDiscriminator
from hagan_clinic.models.encoder import GroundEncoder, SlabEncoder
from hagan_clinic.models.generator import HighBranch, LowBranch, Trunk, select_feature_slab, select_image_slab
from hagan_clinic.models.hagan import HAGAN, parameter_table
from hagan_clinic.models.layers import UpConv3d

KEYS = json.loads((Path(__file__).parent / "fixtures" / "reference_state_dict_keys.json").read_text())


def small(size: int, *more: str):
    return load_config("tiny", [f"model.size={size}", *more]).model


# (size, expected feature edge F, slab depth S/8, feature slab depth F/8); tiny widths: c = 8, L = 32
GEOMETRY = [(32, 8, 4, 1), (64, 16, 8, 2), (128, 32, 16, 4), (256, 64, 32, 8), (512, 64, 64, 8)]


@pytest.mark.slow
@pytest.mark.parametrize(("size", "f", "slab", "fslab"), GEOMETRY)
@pytest.mark.parametrize("n", [1, 2])
def test_shape_table(size, f, slab, fslab, n):
    cfg = small(size)
    c2, latent = 2 * cfg.g_width, cfg.latent_dim
    cases = [
        (Trunk(cfg), [(n, latent)], (n, c2, f, f, f)),
        (LowBranch(cfg), [(n, c2, f, f, f)], (n, 1, f, f, f)),
        (HighBranch(cfg), [(n, c2, fslab, f, f)], (n, 1, slab, size, size)),
        (SlabEncoder(cfg), [(n, 1, slab, size, size)], (n, c2, fslab, f, f)),
        (GroundEncoder(cfg), [(n, c2, f, f, f)], (n, latent)),
        (LowDiscriminator(cfg), [(n, 1, f, f, f)], (n, 1)),
    ]
    with torch.no_grad():
        for net, in_shapes, expected in cases:
            out = net(*[torch.randn(s) for s in in_shapes])
            out = out[0] if isinstance(out, tuple) else out
            assert tuple(out.shape) == expected, type(net).__name__
        logit, cls = HighDiscriminator(cfg)(torch.randn(n, 1, slab, size, size), torch.rand(n))
        assert tuple(logit.shape) == (n, 1) and cls is None


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.slow
def test_model_generate_encode_and_training_pass(size):
    cfg = load_config("tiny", [f"model.size={size}"])
    model = HAGAN.from_config(cfg).eval()
    z = torch.randn(2, cfg.model.latent_dim)
    vol = model.generate(z)
    assert vol.shape == (2, 1, size, size, size)
    assert vol.min() >= -1 and vol.max() <= 1
    assert model.encode(vol).shape == (2, cfg.model.latent_dim)
    assert model.encode(vol, mode="whole").shape == (2, cfg.model.latent_dim)
    r = cfg.model.max_slab_start
    slab, low = model.G(z, r)
    assert slab.shape == (2, 1, size // 8, size, size)
    assert low.shape == (2, 1, cfg.model.feature_size, cfg.model.feature_size, cfg.model.feature_size)
    out = model.D(slab, low, r)
    assert out.logit.shape == (2, 1) and out.class_logit is None
    torch.testing.assert_close(out.logit, (out.high + out.low) / 2)


@pytest.mark.slow
def test_batch_of_one_keeps_the_batch_axis():
    cfg = load_config("tiny")
    model = HAGAN.from_config(cfg).eval()
    z = torch.randn(1, cfg.model.latent_dim)
    slab, low = model.G(z, 0)
    assert model.D(slab, low, 0).logit.shape == (1, 1)
    assert model.encode(model.generate(z)).shape == (1, cfg.model.latent_dim)


@pytest.mark.slow
def test_conditional_generation_and_class_logits():
    cfg = load_config("tiny", ["model.num_classes=3"])
    model = HAGAN.from_config(cfg).eval()
    z = torch.randn(2, cfg.model.latent_dim)
    a = model.generate(z, torch.tensor([0, 2]))
    b = model.generate(z, torch.tensor([1, 1]))
    assert a.shape == (2, 1, 32, 32, 32)
    assert not torch.allclose(a, b)  # the label reaches the output
    slab, low = model.G(z, 4, torch.tensor([0, 1]))
    assert model.D(slab, low, 4).class_logit.shape == (2, 3)
    with pytest.raises(ValueError, match="conditional"):
        model.generate(z)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        model.generate(z, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="-1"):
        model.generate(z, torch.tensor([-1, 0]))
    uncond = HAGAN.from_config(load_config("tiny")).eval()
    with pytest.raises(ValueError, match="unconditional"):
        uncond.generate(z, torch.tensor([0, 1]))


@pytest.mark.parametrize("cin,cout,shape", [(3, 2, (5, 6, 7)), (16, 1, (9, 4, 4)), (8, 8, (1, 3, 2))])
def test_upconv_equals_upsample_then_conv(cin, cout, shape):
    layer = UpConv3d(cin, cout)
    x = torch.randn(2, cin, *shape)
    expected = F.conv3d(F.interpolate(x, scale_factor=2, mode="nearest"), layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.phase_decomposed = False
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)


def test_upconv_gradients_match_upsample_then_conv():
    layer = UpConv3d(4, 3)
    x = torch.randn(1, 4, 3, 4, 5, requires_grad=True)
    layer(x).square().sum().backward()
    g_fast, gx_fast = layer.weight.grad.clone(), x.grad.clone()
    layer.weight.grad, x.grad = None, None
    layer.phase_decomposed = False
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, g_fast, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, gx_fast, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("size", "slab"), [(64, 1), (64, 3), (64, 1000), (128, 5)])
@pytest.mark.slow
def test_slab_generation_equals_one_pass(size, slab):
    cfg = load_config("tiny", [f"model.size={size}", "model.num_classes=2"])
    model = HAGAN.from_config(cfg).eval()
    z = torch.randn(2, cfg.model.latent_dim)
    labels = torch.tensor([0, 1])
    full = model.generate(z, labels)
    chunked = model.generate(z, labels, slab=slab)
    assert (full - chunked).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_slab_generation_equals_one_pass_at_512():
    cfg = load_config("tiny", ["model.size=512"])
    assert cfg.model.stages == 3  # one more G^H stage than at 256
    model = HAGAN.from_config(cfg).eval()
    z = torch.randn(1, cfg.model.latent_dim)
    chunked = model.generate(z, slab=16)
    assert chunked.shape == (1, 1, 512, 512, 512)
    full = model.generate(z)
    assert (full - chunked).abs().max().item() <= 1e-5


def test_slab_selectors_align_real_and_generated_slabs():
    cfg = small(64)  # F = 16: feature slab 2 slices, image slab 8 slices, starts on multiples of 4
    x = torch.arange(64.0).view(1, 1, 64, 1, 1).expand(1, 1, 64, 64, 64)
    h = torch.arange(16.0).view(1, 1, 16, 1, 1).expand(1, 4, 16, 16, 16)
    for r in range(0, cfg.max_slab_start + 1, cfg.upsample):
        real = select_image_slab(x, r, cfg)
        feat = select_feature_slab(h, r, cfg)
        assert real[0, 0, :, 0, 0].tolist() == list(range(r, r + 8))
        # the feature slices that G^H upsamples x4 into output slices r .. r + 7
        assert (feat[0, 0, :, 0, 0] * cfg.upsample).tolist() == [r, r + 4]
    for bad in (2, -4, cfg.max_slab_start + 4):
        with pytest.raises(ValueError, match="multiple of 4"):
            select_image_slab(x, bad, cfg)


def test_bad_input_shapes_raise_value_error(tiny_model):
    with pytest.raises(ValueError, match="volume"):
        tiny_model.encode(torch.zeros(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="z"):
        tiny_model.generate(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="slab"):
        tiny_model.generate(torch.zeros(1, 32), slab=0)


def _reference_count(size: str, net: str) -> int:
    # spectral-norm bookkeeping (u0, sv0) is buffers, not parameters
    return sum(math.prod(shape) for key, shape in KEYS[size][net] if not key.endswith(("u0", "sv0")))


@pytest.mark.parametrize(("name", "total"), [("paper_128", 79_583_972), ("paper_256", 79_744_884)])
def test_paper_parameter_counts(name, total):
    model = HAGAN(load_config(name))
    table = parameter_table(model)
    size = str(model.config.model.size)
    assert table["total"] == total  # 79.58M at 128^3 and 79.74M at 256^3
    assert table["G"] == _reference_count(size, "G")
    assert table["D"] == _reference_count(size, "D")
    assert table["EH"] == _reference_count(size, "E")
    assert table["EG"] == _reference_count(size, "Sub_E")
    assert table["G"] == table["G^A"] + table["G^L"] + table["G^H"]


def test_initialisation_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = HAGAN.from_config(load_config("tiny", ["seed=5"]))
    assert torch.equal(torch.rand(1), expected_next)
    b = HAGAN.from_config(load_config("tiny", ["seed=5"]))
    c = HAGAN.from_config(load_config("tiny", ["seed=6"]))
    assert torch.equal(a.G.trunk.fc.weight, b.G.trunk.fc.weight)
    assert not torch.equal(a.G.trunk.fc.weight, c.G.trunk.fc.weight)


@pytest.mark.parametrize("mode", ["slabs", "whole"])
def test_inference_encoders_keep_the_features_and_leave_the_model_alone(mode):
    """encode(precision=...) runs copies of E^H and E^G cast once (no autocast) and stored channels-last: fp32 gives
    the plain model's features to rounding, bf16 agrees to bf16's precision, and the model's own weights stay fp32
    (a later fp32 caller, a checkpoint or a registered model never sees bf16 weights)."""
    cfg = load_config("tiny", ["model.size=64"])
    model = HAGAN.from_config(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand((2, 1, 64, 64, 64), generator=torch.Generator().manual_seed(3)) * 2 - 1
    expected = model.encode(x, mode)

    eh, eg = model.inference_encoders("fp32")
    weight = eh.blocks[0].conv.weight
    assert weight.dtype == torch.float32 and weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(model.encode(x, mode, precision="fp32"), expected, rtol=1e-4, atol=1e-5)

    z = model.encode(x, mode, precision="bf16")
    eh, eg = model.inference_encoders("bf16")
    assert {p.dtype for p in [*eh.parameters(), *eg.parameters()]} == {torch.bfloat16}
    assert z.dtype == torch.bfloat16 and z.shape == expected.shape
    a, b = expected.flatten().double(), z.flatten().double()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.999
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert model.inference_encoders("bf16")[0] is eh  # made once
    torch.testing.assert_close(model.encode(x, mode, precision="bf16"), z, rtol=0, atol=0)

    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(model.encode(x, mode), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="'fp32' or 'bf16'"):
        model.encode(x, mode, precision="fp16")


def test_inference_encoders_follow_the_weights():
    """A loaded state dict or an optimiser step changes the encoders: the inference copies are made again."""
    cfg = load_config("tiny")
    model = HAGAN.from_config(cfg).eval()
    x = torch.rand((1, 1, 32, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1
    first = model.encode(x, precision="bf16").float()
    other = HAGAN.from_config(load_config("tiny", ["seed=7"]))
    model.EH.load_state_dict(other.EH.state_dict())
    model.EG.load_state_dict(other.EG.state_dict())
    torch.testing.assert_close(
        model.encode(x, precision="bf16").float(), other.eval().encode(x, precision="bf16").float()
    )
    assert not torch.allclose(model.encode(x, precision="bf16").float(), first)
    stale = model.encode(x, precision="fp32")  # an fp32 copy is cached before the update
    with torch.no_grad():
        model.EG.out.bias.add_(1.0)  # an in-place update, as an optimiser step makes
    fresh = model.encode(x, precision="fp32")
    torch.testing.assert_close(fresh, model.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fresh, stale + 1.0, rtol=1e-4, atol=1e-5)  # the bias moved every feature by 1


def test_upconv_backward_makes_the_phase_tensor_gradient_once():
    """The phases' gradient is gathered into one buffer. Autograd of eight slice assignments would build a
    zero-filled gradient of the whole 8-phase tensor once per phase and add them up (8x its size, 15 tensors),
    which cost more than the convolution's own backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    phases = 2 * 8 * 3 * 7 * 7 * 7  # (N, 8 Co, d+1, h+1, w+1): the tensor the phases are computed in

    class FullSize(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.made: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == phases and out._base is None:
                self.made.append(func.overloadpacket.__name__)
            return out

    layer = UpConv3d(4, 3)
    x = torch.randn(2, 4, 6, 6, 6, requires_grad=True)
    y = layer(x)
    with FullSize() as counter:
        y.sum().backward()
    assert 1 <= len(counter.made) <= 2, counter.made  # the one buffer (and a view of it); none: nothing counted
    ref = UpConv3d(4, 3)
    ref.load_state_dict(layer.state_dict())
    ref.phase_decomposed = False
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


def test_layers_whose_weights_outweigh_their_output_run_outside_autocast():
    """Under bf16 autocast, G^A's fully connected layer and E^G's last convolution keep fp32 (casting their weights
    on every pass costs more than it saves); the convolutions around them still run in bf16."""
    model = HAGAN.from_config(load_config("tiny"))
    seen: dict[str, torch.dtype] = {}
    watched = {"fc": model.G.trunk.fc, "EG.out": model.EG.out, "conv": model.G.trunk.blocks[1].conv}
    for name, module in watched.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out.dtype))
    z = torch.randn(2, model.config.model.latent_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.generate(z)
        model.encode(torch.rand(2, 1, 32, 32, 32) * 2 - 1)
    assert seen == {"fc": torch.float32, "EG.out": torch.float32, "conv": torch.bfloat16}


@pytest.mark.parametrize("dhw", [(1, 1, 1), (1, 2, 3), (3, 4, 5)])
def test_the_phase_interleave_has_exact_gradients(dhw):
    """The interleave's hand-written backward against finite differences (float64, any upstream gradient): every
    phase's gradient lands where its output voxels are, and the border slices no output reads get none."""
    from hagan_clinic.models.layers import _Interleave

    d, h, w = dhw
    y = torch.randn(2, 2, 2, 2, 3, d + 1, h + 1, w + 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Interleave.apply, (y,))
