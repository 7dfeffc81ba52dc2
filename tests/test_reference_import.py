"""Importing reference HA-GAN checkpoints: parity with an independent re-implementation of the reference maths.

``reference_impl.py`` (next to this file) computes the reference forward passes functionally, straight from
reference-format state dicts; here we build random reference-format weights, import them with
``hagan_clinic.reference`` and check that our networks compute the same functions:

* the published geometry at 128^3 (whole-volume generation, encoding, D) and at 256^3 (the cheaper paths:
  G's training-mode slab + low-res volume, E^H, E^G, D);
* narrow reference-format weights for fast checks: unconditional and class-conditional, batch 1 and 2,
  chunked generation, first, middle and last slab positions, end-to-end encoding of a 256^3 volume;
* a round trip through files (reference .pth -> import -> our checkpoint -> load);
* malformed weights, which must raise ReferenceImportError naming the key at fault.

Our G folds "nearest x2 upsample + conv3" into one phase-decomposed convolution, so it sums in another order
than the reference: float32 differences of ~1e-5 are expected; 1e-4 is the tolerance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hagan_clinic.models.hagan import load_checkpoint
from hagan_clinic.reference import ReferenceImportError, import_reference, import_reference_state_dicts

try:
    from . import reference_impl as R
except ImportError:  # tests/ is not a package: pytest puts this folder on sys.path
    import reference_impl as R

FIXTURE = Path(__file__).parent / "fixtures" / "reference_state_dict_keys.json"
ATOL = 1e-4
#: our name for each reference network, as import_reference_state_dicts keys them
OURS = {"G": "G", "D": "D", "E": "EH", "Sub_E": "EG"}
#: a narrow reference-format geometry: g_width 16 is the narrowest one whose every GroupNorm splits into 8 groups
NARROW = dict(latent=32, g_width=16, d_high_width=128, d_low_width=64, e_width=64)

#: max |ours - reference| per check, printed at the end of the module (run with -s to see it)
DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_differences():
    yield
    if DIFFS:
        width = max(map(len, DIFFS))
        print("\nmax |ours - reference|:")
        for what, diff in DIFFS.items():
            print(f"  {what:<{width}}  {diff:.2e}")


def check_close(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs().max().item()
    DIFFS[what] = max(diff, DIFFS.get(what, 0.0))
    assert diff <= atol, f"{what}: max |ours - reference| = {diff:.3e} > {atol}"


def as_ours(sds: dict[str, dict[str, torch.Tensor]], wrapped: bool = True) -> dict:
    """Reference networks (G, D, E, Sub_E) -> the keys import_reference_state_dicts takes (G, D, EH, EG)."""
    return {OURS[net]: (R.wrap(sd) if wrapped else sd) for net, sd in sds.items()}


def volume(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A volume in [-1, 1] with some spatial structure (a smooth field plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((shape[0], 1, *(max(1, s // 8) for s in shape[2:])), generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=shape[2:], mode="trilinear", align_corners=False)
    x = 0.7 * (2 * smooth - 1) + 0.3 * (2 * torch.rand(shape, generator=gen) - 1)
    return x.clamp(-1, 1)


def latent(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn((n, dim), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------
# the shape table itself


@pytest.mark.parametrize("size", [128, 256])
def test_shape_table_reproduces_the_reference_key_list(size):
    fixture = json.loads(FIXTURE.read_text())[str(size)]
    ours = R.reference_shapes(size)
    assert set(ours) == set(fixture)
    for net, keys in fixture.items():
        assert [[k, list(s)] for k, s in ours[net].items()] == keys, net


def test_shape_table_parameter_counts_match_the_paper():
    """HAGAN.md: 79.58M (128^3) and 79.74M (256^3) trainable parameters in G + D + E^H + E^G."""
    for size, millions in ((128, 79.58), (256, 79.74)):
        shapes = R.reference_shapes(size)
        n = sum(math.prod(s) for t in shapes.values() for k, s in t.items() if not k.endswith((".u0", ".sv0")))
        assert round(n / 1e6, 2) == millions


# ------------------------------------------------------------------------------------------------------------
# the published geometry


@pytest.fixture(scope="module")
def full_G_E():
    """G's and E's reference tensors have the same shapes at 128 and 256: one random set serves both sizes."""
    shapes = R.reference_shapes(128)
    return R.random_reference_state_dicts({"G": shapes["G"], "E": shapes["E"]}, seed=1)


def _full(full_G_E: dict, size: int, seed: int):
    shapes = R.reference_shapes(size)
    sds = {**full_G_E, **R.random_reference_state_dicts({"D": shapes["D"], "Sub_E": shapes["Sub_E"]}, seed=seed)}
    return sds, import_reference_state_dicts(as_ours(sds), size)


def check_full_import(sds: dict, model, size: int) -> None:
    m = model.config.model
    assert (m.size, m.latent_dim, m.num_classes, m.g_width) == (size, 1024, 0, 32)
    assert (m.d_high_width, m.d_low_width, m.e_ground_width, m.norm_groups) == (512, 256, 256, 8)
    assert not model.training and not model.D.training
    assert model.parts == ("G", "D", "EH", "EG")
    n_ref = sum(t.numel() for sd in sds.values() for k, t in sd.items() if not k.endswith((".u0", ".sv0")))
    assert sum(p.numel() for p in model.parameters()) == n_ref
    # a few tensors, one per network, arrive unchanged
    assert torch.equal(model.G.trunk.fc.weight, sds["G"]["fc1.weight"])
    assert torch.equal(model.G.high.stages[1].conv.weight, sds["G"]["tp_conv7.weight"])
    assert torch.equal(model.EH.blocks[1].norm.bias, sds["E"]["bn2.bias"])
    assert torch.equal(model.EG.out.weight, sds["Sub_E"]["conv5.weight"])
    first = 1 if size == 256 else 2
    assert torch.equal(model.D.high.convs[0].parametrizations.weight.original, sds["D"][f"conv{first}.weight"])
    assert torch.equal(model.D.low.convs[-1].bias, sds["D"]["sub_D.conv5.bias"])
    # the spectral norm our D applies in eval mode is the reference's one-step estimate from u0
    for ours, theirs in (
        (model.D.high.convs[-4], "conv4"),
        (model.D.high.fc1, "fc1"),
        (model.D.low.convs[0], f"sub_D.conv{first}"),
    ):
        torch.testing.assert_close(ours.weight, R.sn_weight(sds["D"], theirs), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
class TestPublishedGeometry128:
    """The published 128^3 geometry (79.58M parameters). Class-scoped, so its weights are freed after it."""

    @pytest.fixture(scope="class")
    def full(self, full_G_E):
        return _full(full_G_E, 128, seed=2)

    def test_import(self, full):
        check_full_import(*full, 128)

    @pytest.mark.slow
    def test_generation(self, full):
        sds, model = full
        z = latent(1, 1024, seed=10)
        with torch.no_grad():
            h_ref = R.g_latent(sds["G"], z, 128)
            h = model.G.features(z)
            check_close(h, h_ref, "128 full: G^A features")
            ref = R.g_high(sds["G"], h_ref)
            assert ref.shape == (1, 1, 128, 128, 128) and ref.std() > 0.05
            check_close(model.generate(z), ref, "128 full: generate (whole volume)")
            check_close(model.G.low(h), R.g_low(sds["G"], h_ref), "128 full: G^L low-res volume")
            for start in (0, 112):  # training mode: the slab at output slices [start, start + 16)
                k = start // 4
                slab = model.G.high(model.select_feature_slab(h, start))
                check_close(slab, R.g_high(sds["G"], h_ref[:, :, k : k + 4]), "128 full: G^H training slab")
            # (a training slab is not a crop of the whole volume: bn6 normalises over the slab only, and the
            # slab's borders are zero-padded)

    def test_encoding(self, full):
        sds, model = full
        x = volume((1, 1, 128, 128, 128), seed=11)
        with torch.no_grad():
            ref = R.encode(sds["E"], sds["Sub_E"], x, 128)
            assert ref.shape == (1, 1024) and ref.std() > 0.05
            check_close(model.encode(x), ref, "128 full: encode")

    def test_discriminator(self, full):
        sds, model = full
        slab, low = volume((2, 1, 16, 128, 128), seed=12), volume((2, 1, 32, 32, 32), seed=13)
        logits = []
        with torch.no_grad():
            for start in (0, 48, 112):
                ref = R.discriminate(sds["D"], slab, low, start, 128)
                out = model.D(slab, low, start)
                for key in ("high", "low", "logit"):
                    check_close(getattr(out, key), ref[key], f"128 full: D {key}", atol=1e-5)
                assert out.class_logit is None and ref["class_logit"] is None
                logits.append(out.high)
        assert not torch.equal(logits[0], logits[2])  # the slab position reaches D^H


@pytest.mark.slow
class TestPublishedGeometry256:
    """The published 256^3 geometry (79.74M parameters): the paths that fit a unit test's time.

    A whole 256^3 volume through the reference's G^H is too costly here; end-to-end encoding of a 256^3 volume
    is checked with narrow weights (test_narrow_256_parity), and E^H and E^G at full width piecewise.
    """

    @pytest.fixture(scope="class")
    def full(self, full_G_E):
        return _full(full_G_E, 256, seed=3)

    def test_import(self, full):
        check_full_import(*full, 256)

    @pytest.mark.slow
    def test_generator_training_mode(self, full):
        sds, model = full
        z = latent(1, 1024, seed=20)
        start = 100  # a multiple of 4: the reference's crop_idx // 4 and our slab_start // 4 agree
        with torch.no_grad():
            slab_ref, low_ref = R.g_train(sds["G"], z, start, 256)
            slab, low = model.G(z, start)
        assert slab_ref.shape == (1, 1, 32, 256, 256) and low_ref.shape == (1, 1, 64, 64, 64)
        assert slab_ref.std() > 0.05 and low_ref.std() > 0.05
        check_close(slab, slab_ref, "256 full: G training slab")
        check_close(low, low_ref, "256 full: G low-res volume")

    def test_encoders(self, full):
        sds, model = full
        x = volume((1, 1, 32, 256, 256), seed=21)
        feats = torch.relu(torch.randn((2, 64, 64, 64, 64), generator=torch.Generator().manual_seed(22)))
        with torch.no_grad():
            check_close(model.EH(x), R.e_high(sds["E"], x), "256 full: E^H on one slab")
            ref = R.e_ground(sds["Sub_E"], feats, 256)
            assert ref.shape == (2, 1024) and ref.std() > 0.05
            check_close(model.EG(feats), ref, "256 full: E^G")

    def test_discriminator(self, full):
        sds, model = full
        slab, low = volume((2, 1, 32, 256, 256), seed=23), volume((2, 1, 64, 64, 64), seed=24)
        with torch.no_grad():
            for start in (0, 224):
                ref = R.discriminate(sds["D"], slab, low, start, 256)
                out = model.D(slab, low, start)
                for key in ("high", "low", "logit"):
                    check_close(getattr(out, key), ref[key], f"256 full: D {key}", atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# narrow reference-format weights: fast, conditional, batch 1 and 2

_NARROW_CACHE: dict = {}


def narrow(size: int, num_classes: int):
    """(reference state dicts, imported model) for the narrow geometry, built once per (size, classes)."""
    key = (size, num_classes)
    if key not in _NARROW_CACHE:
        shapes = R.reference_shapes(size, num_classes=num_classes, **NARROW)
        sds = R.random_reference_state_dicts(shapes, seed=100 + size + num_classes)
        _NARROW_CACHE[key] = sds, import_reference_state_dicts(as_ours(sds), size)
    return _NARROW_CACHE[key]


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.slow
def test_narrow_import_geometry(num_classes):
    _, model = narrow(128, num_classes)
    m = model.config.model
    assert (m.latent_dim, m.num_classes, m.g_width) == (32, num_classes, 16)
    assert (m.d_high_width, m.d_low_width, m.e_ground_width) == (128, 64, 64)
    assert (model.D.high.fc_class is not None) == bool(num_classes)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_narrow_128_parity(num_classes, batch):
    sds, model = narrow(128, num_classes)
    tag = f"128 narrow C={num_classes}"
    z = latent(batch, 32, seed=30 + batch)
    labels = torch.tensor([2, 0][:batch]) if num_classes else None
    x = volume((batch, 1, 128, 128, 128), seed=32 + batch)
    with torch.no_grad():
        h_ref = R.g_latent(sds["G"], z, 128, labels)
        whole = R.g_high(sds["G"], h_ref)
        assert whole.shape == (batch, 1, 128, 128, 128) and whole.std() > 0.05
        h = model.G.features(z, labels)
        check_close(h, h_ref, f"{tag}: G^A features")
        check_close(model.generate(z, labels), whole, f"{tag}: generate")
        if batch > 1:
            check_close(model.generate(z, labels, slab=3), whole, f"{tag}: generate chunked (3 slices)")
        check_close(model.generate_low(z, labels), R.g_low(sds["G"], h_ref), f"{tag}: generate_low")
        # training mode, through G's own forward at one position ...
        slab_ref, low_ref = R.g_train(sds["G"], z, 52, 128, labels)
        assert slab_ref.shape == (batch, 1, 16, 128, 128) and low_ref.shape == (batch, 1, 32, 32, 32)
        slab, low = model.G(z, 52, labels)
        check_close(slab, slab_ref, f"{tag}: G training slab")
        check_close(low, low_ref, f"{tag}: G training low-res")
        # ... and at the first and last positions from the shared feature map
        for start in (0, 112):
            ref = R.g_high(sds["G"], h_ref[:, :, start // 4 : start // 4 + 4])
            check_close(model.G.high(model.select_feature_slab(h, start)), ref, f"{tag}: G training slab")

        ref_z = R.encode(sds["E"], sds["Sub_E"], x, 128)
        assert ref_z.shape == (batch, 32)
        check_close(model.encode(x), ref_z, f"{tag}: encode")

        slab, low = x[:, :, 48:64], volume((batch, 1, 32, 32, 32), seed=34)
        ref = R.discriminate(sds["D"], slab, low, 48, 128)
        out = model.D(slab, low, 48)
        for key in ("high", "low", "logit", "high_class", "low_class", "class_logit"):
            if "class" in key and not num_classes:
                assert getattr(out, key) is None and ref[key] is None
                continue
            assert ref[key].shape == (batch, num_classes if "class" in key else 1)
            check_close(getattr(out, key), ref[key], f"{tag}: D {key}", atol=1e-5)


@pytest.mark.slow
def test_narrow_conditional_labels_matter():
    """A sanity check of the parity tests themselves: the label reaches both implementations' outputs."""
    sds, model = narrow(128, 3)
    z = latent(1, 32, seed=40).expand(2, -1)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        ref = R.g_latent(sds["G"], z, 128, labels)
        ours = model.G.features(z, labels)
    assert (ref[0] - ref[1]).abs().max() > 1e-2 and (ours[0] - ours[1]).abs().max() > 1e-2


@pytest.mark.slow
def test_narrow_256_parity():
    """At 256^3 (narrow widths): G's training mode at several positions, end-to-end encoding of a volume, D."""
    sds, model = narrow(256, 0)
    tag = "256 narrow"
    z = latent(2, 32, seed=50)
    x = volume((1, 1, 256, 256, 256), seed=51)
    with torch.no_grad():
        h_ref = R.g_latent(sds["G"], z, 256)
        h = model.G.features(z)
        check_close(h, h_ref, f"{tag}: G^A features")
        check_close(model.G.low(h), R.g_low(sds["G"], h_ref), f"{tag}: G^L")
        for start in (0, 124, 224):
            k = start // 4
            ref_slab = R.g_high(sds["G"], h_ref[:, :, k : k + 8])
            assert ref_slab.shape == (2, 1, 32, 256, 256)
            check_close(model.G.high(model.select_feature_slab(h, start)), ref_slab, f"{tag}: G training slab")
        check_close(model.encode(x), R.encode(sds["E"], sds["Sub_E"], x, 256), f"{tag}: encode")
        slab, low = x[:, :, 128:160], volume((1, 1, 64, 64, 64), seed=52)
        ref = R.discriminate(sds["D"], slab, low, 128, 256)
        out = model.D(slab, low, 128)
        for key in ("high", "low", "logit"):
            check_close(getattr(out, key), ref[key], f"{tag}: D {key}", atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# files: reference .pth -> import -> our checkpoint -> load


def save_reference_files(sds: dict, folder: Path) -> dict[str, Path]:
    paths = {}
    for net, sd in sds.items():
        paths[net] = folder / f"{net}.pth"
        torch.save(R.wrap(sd), paths[net])
    return paths


@pytest.mark.slow
def test_round_trip_through_files(tmp_path):
    sds, _ = narrow(128, 3)
    paths = save_reference_files(sds, tmp_path)
    model = import_reference(paths["G"], paths["E"], paths["Sub_E"], 128, discriminator=paths["D"])
    assert not model.training and model.parts == ("G", "D", "EH", "EG")
    saved = model.save(tmp_path / "imported.pt")
    reloaded = load_checkpoint(saved)
    assert reloaded.config == model.config and reloaded.parts == model.parts

    z, labels = latent(2, 32, seed=60), torch.tensor([1, 2])
    x = volume((2, 1, 128, 128, 128), seed=61)
    slab, low = x[:, :, 32:48], volume((2, 1, 32, 32, 32), seed=62)
    with torch.no_grad():
        outputs = []
        for m in (model, reloaded):
            d = m.D(slab, low, 32)
            outputs.append((m.generate(z, labels), m.encode(x), d.logit, d.class_logit))
        for a, b in zip(*outputs):
            assert torch.equal(a, b)
        gen, enc, logit, class_logit = outputs[1]
        check_close(gen, R.g_generate(sds["G"], z, 128, labels), "files: generate after reload")
        check_close(enc, R.encode(sds["E"], sds["Sub_E"], x, 128), "files: encode after reload")
        ref = R.discriminate(sds["D"], slab, low, 32, 128)
        check_close(logit, ref["logit"], "files: D logit after reload", atol=1e-5)
        check_close(class_logit, ref["class_logit"], "files: D class logit after reload", atol=1e-5)


@pytest.mark.slow
def test_import_without_discriminator(tmp_path):
    sds, _ = narrow(128, 0)
    paths = save_reference_files(sds, tmp_path)
    model = import_reference(paths["G"], paths["E"], paths["Sub_E"], 128)
    assert model.parts == ("G", "EH", "EG")
    reloaded = load_checkpoint(model.save(tmp_path / "sampler.pt"))
    assert reloaded.parts == ("G", "EH", "EG")
    z = latent(1, 32, seed=63)
    with torch.no_grad():
        check_close(reloaded.generate_low(z), R.g_low(sds["G"], R.g_latent(sds["G"], z, 128)), "files: no D")


def test_bare_state_dicts_without_prefix_are_accepted():
    sds, reference = narrow(128, 0)
    model = import_reference_state_dicts(as_ours(sds, wrapped=False), 128)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# malformed weights


def _copy(sds: dict) -> dict:
    return {net: dict(sd) for net, sd in sds.items()}


def _expect_error(sds: dict, size: int, *names: str) -> str:
    with pytest.raises(ReferenceImportError) as info:
        import_reference_state_dicts(as_ours(sds), size)
    msg = str(info.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, f"{name!r} not named in: {msg}"
    return msg


@pytest.mark.parametrize(
    "net, key",
    [
        ("E", "bn2.weight"),
        ("G", "fc1.weight"),
        ("G", "sub_G.tp_conv3.bias"),
        ("D", "conv3.u0"),
        ("D", "sub_D.conv4.weight"),
        ("Sub_E", "conv5.weight"),
        ("Sub_E", "bn3.bias"),
    ],
)
def test_missing_key(net, key):
    sds = _copy(narrow(128, 0)[0])
    del sds[net][key]
    _expect_error(sds, 128, key)


@pytest.mark.parametrize(
    "net, key", [("E", "conv4.weight"), ("D", "fc3.bias"), ("G", "sub_G.bn3.weight"), ("Sub_E", "conv6.bias")]
)
def test_unknown_key(net, key):
    sds = _copy(narrow(128, 0)[0])
    sds[net][key] = torch.zeros(4)
    _expect_error(sds, 128, key)


@pytest.mark.parametrize(
    "net, key, shape",
    [
        ("E", "conv2.weight", (16, 16, 3, 3, 2)),
        ("E", "bn1.bias", (15,)),
        ("G", "tp_conv3.weight", (128, 256, 3, 3, 2)),
        ("G", "fc1.bias", (16383,)),
        ("G", "fc1.weight", (16384, 31)),  # fewer inputs than Sub_E's latent size
        ("Sub_E", "conv4.weight", (64, 32, 4, 4, 3)),
        ("D", "conv3.weight", (16, 8, 4, 4, 3)),
        ("D", "conv3.weight", (17, 8, 4, 4, 4)),  # a spectral-norm weight whose rows no longer fit u0
        ("D", "conv3.u0", (1, 17)),
        ("D", "fc1.weight", (16, 32)),
        ("D", "sub_D.conv5.weight", (2, 64, 4, 4, 4)),  # a class output in an unconditional model
    ],
)
def test_wrong_shape(net, key, shape):
    sds = _copy(narrow(128, 0)[0])
    sds[net][key] = torch.randn(shape)
    _expect_error(sds, 128, key)


def test_weights_of_the_other_size():
    small, large = narrow(128, 0)[0], narrow(256, 0)[0]
    # 256^3 weights read as 128^3: D^H and D^L, and E^G, have a first layer too many
    _expect_error(_copy(large), 128, "conv1.weight", "128")
    without_d = {k: v for k, v in large.items() if k != "D"}
    _expect_error(without_d, 128, "conv1.weight", "128")
    # 128^3 weights read as 256^3: that first layer is missing
    _expect_error(_copy(small), 256, "conv1.weight")
    without_d = {k: v for k, v in small.items() if k != "D"}
    _expect_error(without_d, 256, "conv1.weight")


def test_unreadable_files_give_a_one_line_error(tmp_path):
    sds, _ = narrow(128, 0)
    paths = save_reference_files(sds, tmp_path)
    junk = tmp_path / "G_junk.pth"
    junk.write_text("this is not a PyTorch checkpoint\nsecond line\n")
    with pytest.raises(ReferenceImportError) as info:
        import_reference(junk, paths["E"], paths["Sub_E"], 128, discriminator=paths["D"])
    msg = str(info.value)
    assert "\n" not in msg and str(junk) in msg

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ReferenceImportError) as info:
        import_reference(paths["G"], not_a_state_dict, paths["Sub_E"], 128)
    assert "\n" not in str(info.value) and str(not_a_state_dict) in str(info.value)

    with pytest.raises(ReferenceImportError, match="not found"):
        import_reference(tmp_path / "absent.pth", paths["E"], paths["Sub_E"], 128)


def test_unsupported_size():
    sds, _ = narrow(128, 0)
    with pytest.raises(ReferenceImportError, match="64"):
        import_reference_state_dicts(as_ours(sds), 64)


@pytest.mark.slow
def test_command_line_import_then_generate(tmp_path, capsys):
    from hagan_clinic.cli import main

    sds, _ = narrow(128, 0)
    paths = save_reference_files(sds, tmp_path)
    out = tmp_path / "imported.pt"
    args = ["import-reference", "--generator", str(paths["G"]), "--encoder", str(paths["E"])]
    args += ["--sub-encoder", str(paths["Sub_E"]), "--discriminator", str(paths["D"]), "--size", "128"]
    args += ["--out", str(out), "--set", "data.modality=MR", "--set", "data.window=[0, 1]"]
    assert main(args) == 0
    assert "parts G, D, EH, EG" in capsys.readouterr().out
    model = load_checkpoint(out)
    assert model.config.data.modality == "MR" and model.config.data.window == (0.0, 1.0)
    z = latent(1, 32, seed=70)
    with torch.no_grad():
        check_close(model.generate(z), R.g_generate(sds["G"], z, 128), "cli: generate after import")
    assert main(["generate", "--checkpoint", str(out), "--out", str(tmp_path / "gen"), "--slab", "4"]) == 0
    assert len(list((tmp_path / "gen").glob("*.nii.gz"))) == 1
    # a file that is not the reference's: one line, exit 2
    paths["E"].write_bytes(b"garbage")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "E.pth" in err
