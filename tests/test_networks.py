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
