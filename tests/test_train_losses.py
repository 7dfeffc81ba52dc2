"""The loss object (training/losses.py) and the one build function (training/build.py).

The first test pins the numbers: a literal transcript of the phase maths as the loop computed them inline, before
they moved into :class:`HAGANLoss`, is run beside ``build`` + ``train_step`` in the same process; losses, weights,
optimiser states and the EMA generator must agree bit for bit (CPU, fp32, same seed).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hagan_clinic.config import NUM_SLABS, load_config
from hagan_clinic.devices import resolve_device
from hagan_clinic.models.discriminator import DiscriminatorOutput
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.training import losses
from hagan_clinic.training.build import build
from hagan_clinic.training.loop import train_only, train_step
from hagan_clinic.training.losses import PHASES, HAGANLoss, PhaseInputs, ema_update, low_res

# ---- the maths as the loop computed them before the loss object (frozen: do not edit) ---------------------------


def _old_phase_loss(phase, model, tc, real_slab, real_low, x, y, z_d, z_g, r):
    parts = {}
    if phase == "D":
        with torch.no_grad():
            fake_slab, fake_low = model.G(z_d, r, y)
        if tc.r1_gamma > 0:
            real_slab = real_slab.detach().requires_grad_(True)
            real_low = real_low.detach().requires_grad_(True)
        real = model.D(real_slab, real_low, r)
        fake = model.D(fake_slab, fake_low, r)
        loss = losses.discriminator_loss(real, fake, tc)
        cls = losses.class_loss(real, y)
        if cls is not None:
            parts["loss_D_class"] = float(cls.detach())
            loss = loss + cls
        if tc.r1_gamma > 0:
            r1 = losses.r1_penalty(real, (real_slab, real_low), tc)
            parts["loss_D_r1"] = float(r1.detach())
            loss = loss + r1
        return loss, parts
    if phase == "G":
        fake_slab, fake_low = model.G(z_g, r, y)
        out = model.D(fake_slab, fake_low, r)
        loss = losses.generator_loss(out, tc)
        cls = losses.class_loss(out, y)
        if cls is not None:
            parts["loss_G_class"] = float(cls.detach())
            loss = loss + tc.class_weight_g * cls
        return loss, parts
    if phase == "EH":
        recon = model.G.high(model.EH(real_slab))
        return tc.encoder_weight * losses.l1(recon, real_slab), parts
    with torch.no_grad():
        d = model.config.model.slab_depth
        feats = torch.cat([model.EH(x[:, :, i * d : (i + 1) * d]) for i in range(NUM_SLABS)], dim=2)
    z_hat = model.EG(feats)
    fake_slab, fake_low = model.G(z_hat, r, y)
    rec = (losses.l1(fake_slab, real_slab) + losses.l1(fake_low, real_low)) / 2
    return tc.encoder_weight * rec, parts


def _old_step(model, opts, tc, x, y, gen, ema):
    mcfg = model.config.model
    k = int(torch.randint(mcfg.feature_size - mcfg.feature_slab_depth + 1, (1,), generator=gen))
    r = k * mcfg.upsample
    real_slab = model.select_image_slab(x, r)
    real_low = x[:, :, ::4, ::4, ::4] if tc.low_res == "nearest" else F.avg_pool3d(x, kernel_size=4)
    z_d = torch.randn(x.shape[0], mcfg.latent_dim, generator=gen)
    z_g = torch.randn(x.shape[0], mcfg.latent_dim, generator=gen)
    values = {}
    for phase in PHASES:
        for name in PHASES:
            getattr(model, name).requires_grad_(name == phase)
        opts[phase].zero_grad(set_to_none=True)
        loss, parts = _old_phase_loss(phase, model, tc, real_slab, real_low, x, y, z_d, z_g, r)
        values[f"loss_{phase}"] = float(loss.detach())
        values.update(parts)
        loss.backward()
        opts[phase].step()
    for name in PHASES:
        getattr(model, name).requires_grad_(False)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.G.parameters()):
                e.lerp_(p, 1.0 - tc.ema_decay)
            for e, b in zip(ema.buffers(), model.G.buffers()):
                e.copy_(b)
    return values


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("model.num_classes=2", "train.r1_gamma=1.0", "train.d_loss=separate", "train.low_res=nearest")
        + ("train.ema=true", "train.ema_decay=0.9", "train.encoder_weight=2.0", "train.d_low_weight=0.5"),
    ],
    ids=["reference", "every-option"],
)
@pytest.mark.slow
def test_the_loss_object_computes_what_the_loop_computed(overrides):
    cfg = load_config("tiny", ["seed=3", *overrides])
    tc, conditional = cfg.train, bool(cfg.model.num_classes)
    data = torch.Generator().manual_seed(11)
    batches = [torch.rand(2, 1, 32, 32, 32, generator=data) * 2 - 1 for _ in range(2)]
    y = torch.tensor([1, 0]) if conditional else None

    # old: the networks and optimisers as train() made them, and the inline maths
    old = HAGAN.from_config(cfg).train()
    old_ema = copy.deepcopy(old.G).eval().requires_grad_(False) if tc.ema else None
    lrs = {"D": tc.lr_d, "G": tc.lr_g, "EH": tc.lr_eh, "EG": tc.lr_eg}
    old_opts = {
        p: torch.optim.Adam(getattr(old, p).parameters(), lr=lrs[p], betas=tc.betas, eps=tc.eps, fused=True)
        for p in PHASES
    }
    gen_old = torch.Generator().manual_seed(5)
    old_values = [_old_step(old, old_opts, tc, x, y, gen_old, old_ema) for x in batches]

    # new: build() and the loop's step through the loss object
    parts = build(cfg, torch.device("cpu"))
    gen_new = torch.Generator().manual_seed(5)
    new_values = [train_step(parts, x, y, gen_new)[0] for x in batches]

    assert new_values == old_values  # every float, bit for bit
    if conditional:
        assert {"loss_D_class", "loss_D_r1", "loss_G_class"} <= new_values[0].keys()
    for p in PHASES:
        for (name, a), b in zip(getattr(old, p).state_dict().items(), getattr(parts.model, p).state_dict().values()):
            assert torch.equal(a, b), f"{p}.{name}"
        for a, b in zip(old_opts[p].state_dict()["state"].values(), parts.optimizers[p].state_dict()["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in a), p
    if tc.ema:
        assert parts.ema is not None and old_ema is not None
        for (name, a), b in zip(old_ema.state_dict().items(), parts.ema.state_dict().values()):
            assert torch.equal(a, b), f"ema.{name}"
    assert torch.equal(gen_old.get_state(), gen_new.get_state())  # the same draws, in the same order


def test_build_makes_what_train_trains():
    cfg = load_config("tiny", ["train.ema=true", "train.precision=fp16", "train.lr_d=0.003", "train.betas=[0.5, 0.9]"])
    parts = build(cfg, resolve_device("cpu"))
    assert parts.model.training and parts.loss.model is parts.model and parts.loss.tc == cfg.train
    fresh = HAGAN.from_config(cfg)
    for p in PHASES:  # the initial weights are the config's, each Adam holds exactly its network's parameters
        net, opt = getattr(parts.model, p), parts.optimizers[p]
        initial = getattr(fresh, p).state_dict().values()
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), initial))
        assert [id(q) for g in opt.param_groups for q in g["params"]] == [id(q) for q in net.parameters()]
        assert opt.defaults["fused"] and parts.scalers[p].is_enabled()  # fp16: live grad scalers
    assert parts.optimizers["D"].defaults["lr"] == 0.003 and parts.optimizers["G"].defaults["betas"] == (0.5, 0.9)
    assert parts.ema is not None and not any(q.requires_grad for q in parts.ema.parameters())
    assert all(torch.equal(a, b) for a, b in zip(parts.ema.parameters(), parts.model.G.parameters()))
    # a state round trip restores every part
    state = parts.state_dict()
    other = build(load_config("tiny", ["seed=9", "train.ema=true", "train.precision=fp16"]), torch.device("cpu"))
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.model.parameters(), parts.model.parameters()))
    assert other.state_dict()["scalers"] == state["scalers"]

    plain = build(load_config("tiny", ["train.channels_last=true"]), torch.device("cpu"))
    assert plain.ema is None and not plain.scalers["G"].is_enabled()
    conv = next(m for m in plain.model.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)


# ---- each phase ---------------------------------------------------------------------------------------------


def phase_inputs(model: HAGAN, x: torch.Tensor, y: torch.Tensor | None, r: int, gen: torch.Generator) -> PhaseInputs:
    mc, tc = model.config.model, model.config.train
    z_d = torch.randn(x.shape[0], mc.latent_dim, generator=gen)
    z_g = torch.randn(x.shape[0], mc.latent_dim, generator=gen)
    return PhaseInputs(x, y, r, model.select_image_slab(x, r), low_res(x, mc.upsample, tc.low_res), z_d, z_g)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize(
    "overrides",
    [(), ("model.num_classes=2", "train.r1_gamma=1.0", "train.d_loss=separate")],
    ids=["reference", "conditional-r1-separate"],
)
@pytest.mark.slow
def test_each_phase_changes_only_its_own_network(overrides):
    cfg = load_config("tiny", overrides)
    mc = cfg.model
    model = HAGAN.from_config(cfg).train()
    loss_fn = HAGANLoss(model, cfg.train)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 32, 32, 32, generator=gen) * 2 - 1
    y = torch.tensor([0, 1]) if mc.num_classes else None
    inputs = phase_inputs(model, x, y, 3 * mc.upsample, gen)
    # ONE optimiser over every network: it steps whatever received a gradient, so a phase that leaked
    # gradient into another network (or one that left another network trainable) changes that network too
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for phase in PHASES:
        before = params(model)
        train_only(model, phase)
        assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {phase}
        opt.zero_grad(set_to_none=True)
        loss, parts = loss_fn.phase(phase, inputs)
        assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss), phase
        loss.backward()
        with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {phase}, f"phase {phase} sent gradients to {sorted(with_grad)}"
        opt.step()
        changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {phase}, f"phase {phase} changed {sorted(changed)}"
        if phase == "D" and mc.num_classes:
            assert {"loss_D_class", "loss_D_r1"} <= parts.keys()
        if phase == "G" and mc.num_classes:
            assert "loss_G_class" in parts
    train_only(model, None)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_encoder_weight_scales_the_encoder_losses():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, 32, generator=gen) * 2 - 1
    results = {}
    for weight in (1.0, 5.0):
        cfg = load_config("tiny", [f"train.encoder_weight={weight}"])
        model = HAGAN.from_config(cfg).train()
        inputs = phase_inputs(model, x, None, 8, torch.Generator().manual_seed(1))
        with torch.no_grad():
            results[weight] = [float(HAGANLoss(model, cfg.train).phase(p, inputs)[0]) for p in ("EH", "EG")]
    # the same fp32 reconstruction error times 1 or 5: one rounding apart at most
    assert results[5.0] == pytest.approx([5 * v for v in results[1.0]], rel=1e-6)


def test_draw_takes_slab_starts_on_the_feature_grid_and_x_low_as_configured():
    cfg = load_config("tiny", ["train.low_res=nearest"])
    model = HAGAN.from_config(cfg)
    x = torch.randn(2, 1, 32, 32, 32)
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        b = HAGANLoss(model, cfg.train).draw(x, None, gen)
        starts.add(b.r)
        assert torch.equal(b.real_slab, x[:, :, b.r : b.r + 4]) and torch.equal(b.real_low, x[:, :, ::4, ::4, ::4])
        assert b.z_d.shape == b.z_g.shape == (2, 32) and not torch.equal(b.z_d, b.z_g)
    assert starts == {0, 4, 8, 12, 16, 20, 24, 28}  # every slab start on the 8^3 feature grid, 4 slices apart


# ---- the pieces -------------------------------------------------------------------------------------------------


def test_ema_update_is_a_moving_average():
    live, ema = torch.nn.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4)
    torch.nn.init.constant_(live.weight, 3.0)
    torch.nn.init.constant_(ema.weight, 1.0)
    live.register_buffer("count", torch.tensor(7.0))
    ema.register_buffer("count", torch.tensor(0.0))
    ema_update(ema, live, 0.75)
    torch.testing.assert_close(ema.weight, torch.full((4,), 1.5))  # 0.75 * 1 + 0.25 * 3
    assert ema.count == 7.0  # buffers are copied


def fake_output(high: torch.Tensor, low: torch.Tensor) -> DiscriminatorOutput:
    return DiscriminatorOutput(high, low, None, None)


def test_discriminator_loss_averaged_and_separate():
    real = fake_output(torch.tensor([[2.0], [0.5]]), torch.tensor([[1.0], [-1.0]]))
    fake = fake_output(torch.tensor([[-1.0], [0.3]]), torch.tensor([[0.0], [2.0]]))

    def bce(logit, target):
        return F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, target))

    averaged = load_config("tiny").train
    separate = load_config("tiny", ["train.d_loss=separate", "train.d_high_weight=2", "train.d_low_weight=0.5"]).train
    torch.testing.assert_close(
        losses.discriminator_loss(real, fake, averaged),
        bce((real.high + real.low) / 2, 1.0) + bce((fake.high + fake.low) / 2, 0.0),
    )
    torch.testing.assert_close(
        losses.discriminator_loss(real, fake, separate),
        2 * (bce(real.high, 1.0) + bce(fake.high, 0.0)) + 0.5 * (bce(real.low, 1.0) + bce(fake.low, 0.0)),
    )
    torch.testing.assert_close(losses.generator_loss(fake, averaged), bce((fake.high + fake.low) / 2, 1.0))
    torch.testing.assert_close(
        losses.generator_loss(fake, separate), 2 * bce(fake.high, 1.0) + 0.5 * bce(fake.low, 1.0)
    )


def test_r1_penalty_matches_the_analytic_gradient():
    tc = load_config("tiny", ["train.r1_gamma=4.0"]).train
    slab = torch.randn(3, 1, 2, 2, 2, requires_grad=True)
    low = torch.randn(3, 1, 2, 2, 2, requires_grad=True)
    w_slab, w_low = torch.randn(1, 1, 2, 2, 2), torch.randn(1, 1, 2, 2, 2)
    high = (slab * w_slab).flatten(1).sum(1, keepdim=True)
    low_logit = (low * w_low).flatten(1).sum(1, keepdim=True)
    out = fake_output(high, low_logit)
    # averaged: d logit / d slab = w_slab / 2, d logit / d low = w_low / 2
    expected = 0.5 * 4.0 * ((w_slab / 2).pow(2).sum() + (w_low / 2).pow(2).sum())
    torch.testing.assert_close(losses.r1_penalty(out, (slab, low), tc), expected)
    tc_sep = load_config("tiny", ["train.r1_gamma=4.0", "train.d_loss=separate"]).train
    expected_sep = 0.5 * 4.0 * (w_slab.pow(2).sum() + w_low.pow(2).sum())
    torch.testing.assert_close(losses.r1_penalty(out, (slab, low), tc_sep), expected_sep)


def test_low_res_matches_a_direct_computation():
    x = torch.randn(2, 1, 32, 32, 32)
    nearest = low_res(x, 4, "nearest")
    assert nearest.shape == (2, 1, 8, 8, 8)
    assert torch.equal(nearest, F.interpolate(x, scale_factor=0.25, mode="nearest"))  # the reference's
    assert nearest[1, 0, 2, 5, 7] == x[1, 0, 8, 20, 28]
    area = low_res(x, 4, "area")
    torch.testing.assert_close(area, x.reshape(2, 1, 8, 4, 8, 4, 8, 4).mean(dim=(3, 5, 7)))
    torch.testing.assert_close(area[1, 0, 2, 5, 7], x[1, 0, 8:12, 20:24, 28:32].mean())
    # what the generator's low-resolution branch is compared with really is this x_low
    assert not torch.allclose(area, nearest)
