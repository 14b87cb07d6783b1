import pytest
import torch

from diffdistill import augment as A

GEOMETRIC = ["crop", "cutout", "flip", "scale", "rotate"]
COLOUR = ["brightness", "saturation", "contrast", "color"]


def batch(n=16, c=3, s=16, seed=0):
    # Normalised-looking data: values on both sides of 0 (zero fill is inside the range).
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def op(name):
    return getattr(A, name)


@pytest.mark.parametrize("name", GEOMETRIC + COLOUR)
def test_identity_at_strength_zero(name):
    x = batch()
    y = op(name)(x, torch.Generator().manual_seed(1), strength=0.0)
    assert y.shape == x.shape
    # Resampling ops go through affine_grid/grid_sample: exact up to float rounding.
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", GEOMETRIC + COLOUR)
def test_full_strength_changes_the_batch(name):
    x = batch(n=32)
    y = op(name)(x, torch.Generator().manual_seed(2), strength=1.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_ops_keep_the_range_without_clamping(name):
    x = batch() * 0.5 + 0.3          # range about [-0.2, 0.8]; zero fill lies inside it
    y = op(name)(x, torch.Generator().manual_seed(3))
    assert y.min() >= min(x.min(), 0) - 1e-6 and y.max() <= max(x.max(), 0) + 1e-6


@pytest.mark.parametrize("name", COLOUR)
def test_colour_ops_clamp_when_asked(name):
    x = batch()
    y = op(name)(x, torch.Generator().manual_seed(4), strength=1.0, clamp=(-1.0, 1.0))
    assert y.min() >= -1 and y.max() <= 1


def test_brightness_offset_is_bounded_by_half_the_ratio():
    x = batch()
    d = A.brightness(x, torch.Generator().manual_seed(5)) - x
    assert d.abs().max() <= 0.5 + 1e-6
    assert torch.allclose(d, d[:, :1, :1, :1].expand_as(d))     # one offset per image


def test_crop_translates_whole_pixels_with_zero_fill():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat(8, 1, 1, 1)
    y = A.crop(x, torch.Generator().manual_seed(6), strength=2.0)   # shift up to round(0.25*4)=1
    for img in y[:, 0]:
        nz = img[img != 0]
        assert set(nz.tolist()) <= set(range(1, 17))               # values moved, never blended


def test_cutout_zeros_one_square():
    x = torch.ones(64, 1, 16, 16)
    y = A.cutout(x, torch.Generator().manual_seed(7))
    holes = (y == 0).sum(dim=(1, 2, 3))
    assert holes.max() == 64 and holes.min() >= 16          # 8×8; a corner centre keeps 4×4


def test_flip_mirrors_left_right():
    x = batch(n=64)
    y = A.flip(x, torch.Generator().manual_seed(8))
    flipped = (y == x.flip(3)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert (flipped | same).all() and 10 < int(flipped.sum()) < 54


def test_dsa_deterministic_for_a_generator_and_one_op_per_batch():
    x = batch(n=32)
    a = A.dsa(x, torch.Generator().manual_seed(9))
    b = A.dsa(x, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    outs = [A.dsa(x, torch.Generator().manual_seed(s)) for s in range(10, 30)]
    assert any(not torch.equal(o, outs[0]) for o in outs)


def test_dsa_draws_every_group():
    g = torch.Generator().manual_seed(0)
    x = batch(n=8)
    seen = set()
    for _ in range(200):
        state = g.get_state()
        idx = int(torch.randint(6, (1,), generator=g))
        g.set_state(state)
        seen.add(idx)
        A.dsa(x, g)
    assert seen == set(range(6))


def test_dsa_rejects_unknown_ops():
    with pytest.raises(ValueError, match="unknown op"):
        A.dsa(batch(), torch.Generator(), strategy="color_blur")
