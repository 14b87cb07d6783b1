"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021), written from the paper.

DSA is a set of differentiable, randomly parameterised transforms applied to a whole batch with
tensor ops. The evaluation protocol of the ECCV 2024 dataset-distillation challenge trains its
ConvNet with the strategy ``color_crop_cutout_flip_scale_rotate``: for every batch ONE group of
that list is drawn uniformly at random and applied, with parameters drawn per image:

    group    op          parameter (challenge value)     per-image random draw u ~ U(0, 1)
    color    brightness  1.0                             x + (u − 0.5)·1.0
             saturation  2.0                             (x − mean_c x)·(2.0·u) + mean_c x
             contrast    0.5                             (x − mean_chw x)·(u + 0.5) + mean_chw x
    crop     crop        0.125 (of the side)             translate by an integer in [−s, s], s = round(0.125·side), zero fill
    cutout   cutout      0.5 (of the side)               zero a square of side round(0.5·side) at a random centre
    flip     flip        0.5 (probability)               mirror left-right where u < 0.5
    scale    scale       1.2                             x and y scaled independently by factors in [1/1.2, 1.2]
    rotate   rotate      15 (degrees)                    rotate by an angle in [−15°, 15°]

"Siamese" means the same parameters can be applied to two batches (real and synthetic, in DSA's
gradient matching): give each call a ``torch.Generator`` in the same state (``g.get_state()`` /
``set_state``). Random numbers are drawn on the generator's device and moved to the batch's
device, so a given generator state gives the same augmentation on CPU and GPU.

``strength`` scales every op towards the identity: strength 1 is the challenge's setting,
strength 0 is exactly (up to float rounding for the resampling ops) the identity.

Value range. The challenge applies DSA to *normalised* images and does not clamp; this module
does the same by default. The geometric ops (crop, cutout, flip, scale, rotate) keep the range by
construction: they move pixels, and bilinear resampling and zero fill give convex combinations of
input values and 0 (0 is the mean of normalised data, inside its range). The colour ops
(brightness, saturation, contrast) can leave the input's range; pass ``clamp=(lo, hi)`` to clamp
their output (e.g. ``(-1, 1)`` in model space, or the normalised images of [0, 1] pixels).
"""
import math

import torch
import torch.nn.functional as F

# The challenge's DSA parameters (DC-benchmark's ParamDiffAug defaults).
DSA_PARAMS = {
    "flip": 0.5,
    "scale": 1.2,
    "rotate": 15.0,
    "crop": 0.125,
    "cutout": 0.5,
    "brightness": 1.0,
    "saturation": 2.0,
    "contrast": 0.5,
}
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _uniform(n, generator, like):
    """n draws of U(0,1) from ``generator`` (on the generator's device), as ``like``'s device/dtype."""
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, device=device)
    return u.to(device=like.device, dtype=like.dtype)


def _randint(low, high, n, generator, like):
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(low, high, (n,), generator=generator, device=device).to(like.device)


def _clamp(x, clamp):
    return x if clamp is None else x.clamp(clamp[0], clamp[1])


# --- colour ------------------------------------------------------------------------------------

def brightness(x, generator, strength=1.0, ratio=DSA_PARAMS["brightness"], clamp=None):
    """Add a per-image offset in [−ratio/2, ratio/2]·strength."""
    u = _uniform(x.shape[0], generator, x).view(-1, 1, 1, 1)
    return _clamp(x + (u - 0.5) * ratio * strength, clamp)


def saturation(x, generator, strength=1.0, ratio=DSA_PARAMS["saturation"], clamp=None):
    """Scale each pixel's deviation from its channel mean by a factor in [0, ratio] (strength 1).

    The factor is 1 + strength·(ratio·u − 1), so strength 0 gives 1. Identity on 1-channel images.
    """
    u = _uniform(x.shape[0], generator, x).view(-1, 1, 1, 1)
    factor = 1.0 + strength * (ratio * u - 1.0)
    mean = x.mean(dim=1, keepdim=True)
    return _clamp((x - mean) * factor + mean, clamp)


def contrast(x, generator, strength=1.0, ratio=DSA_PARAMS["contrast"], clamp=None):
    """Scale each image's deviation from its mean by a factor in [ratio, 1 + ratio] (strength 1)."""
    u = _uniform(x.shape[0], generator, x).view(-1, 1, 1, 1)
    factor = 1.0 + strength * (u + ratio - 1.0)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return _clamp((x - mean) * factor + mean, clamp)


def color(x, generator, strength=1.0, clamp=None):
    """The "color" group: brightness, then saturation, then contrast (as DSA applies them)."""
    x = brightness(x, generator, strength, clamp=clamp)
    x = saturation(x, generator, strength, clamp=clamp)
    return contrast(x, generator, strength, clamp=clamp)


# --- geometry ----------------------------------------------------------------------------------

def _affine(x, theta):
    # align_corners=True maps the identity matrix exactly onto pixel centres, so theta = I
    # resamples every pixel onto itself; zeros outside the image.
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def scale(x, generator, strength=1.0, ratio=DSA_PARAMS["scale"]):
    """Scale x and y independently by factors in [1/r, r], r = ratio**strength."""
    n = x.shape[0]
    r = ratio ** strength
    sx = _uniform(n, generator, x) * (r - 1.0 / r) + 1.0 / r
    sy = _uniform(n, generator, x) * (r - 1.0 / r) + 1.0 / r
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def rotate(x, generator, strength=1.0, ratio=DSA_PARAMS["rotate"]):
    """Rotate about the centre by an angle in [−ratio, ratio]·strength degrees."""
    n = x.shape[0]
    angle = (_uniform(n, generator, x) - 0.5) * 2.0 * ratio * strength * math.pi / 180.0
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def flip(x, generator, strength=1.0, prob=DSA_PARAMS["flip"]):
    """Mirror left-right each image with probability prob·strength."""
    u = _uniform(x.shape[0], generator, x).view(-1, 1, 1, 1)
    return torch.where(u < prob * strength, x.flip(3), x)


def crop(x, generator, strength=1.0, ratio=DSA_PARAMS["crop"]):
    """DSA's "crop": translate each image by whole pixels in [−s, s] along each axis, zero fill.

    s = round(ratio·strength·side). Done with one gather over the batch and a validity mask.
    """
    n, _, h, w = x.shape
    sh, sw = int(h * ratio * strength + 0.5), int(w * ratio * strength + 0.5)
    ty = _randint(-sh, sh + 1, n, generator, x)
    tx = _randint(-sw, sw + 1, n, generator, x)
    rows = torch.arange(h, device=x.device)[None, :] + ty[:, None]          # [N, H] source rows
    cols = torch.arange(w, device=x.device)[None, :] + tx[:, None]          # [N, W] source cols
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = x[batch, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # [N,H,W,C]
    out = out.permute(0, 3, 1, 2)
    return out * valid[:, None].to(x.dtype)


def cutout(x, generator, strength=1.0, ratio=DSA_PARAMS["cutout"]):
    """Zero a square of side round(ratio·strength·side) centred at a random pixel (clipped at borders)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio * strength + 0.5), int(w * ratio * strength + 0.5)
    # Centres range over [0, side + (1 − size % 2)), as in DSA, so even-sized holes can touch both edges.
    cy = _randint(0, h + (1 - ch % 2), n, generator, x)
    cx = _randint(0, w + (1 - cw % 2), n, generator, x)
    r = torch.arange(h, device=x.device)[None, :]
    c = torch.arange(w, device=x.device)[None, :]
    top, left = (cy - ch // 2)[:, None], (cx - cw // 2)[:, None]
    in_rows = (r >= top) & (r < top + ch)                                    # [N, H]
    in_cols = (c >= left) & (c < left + cw)                                  # [N, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


OPS = {
    "color": color,
    "crop": crop,
    "cutout": cutout,
    "flip": flip,
    "scale": scale,
    "rotate": rotate,
}


def dsa(x, generator, strategy=DEFAULT_STRATEGY, strength=1.0, clamp=None, pick_generator=None):
    """Apply DSA to a batch x [N,C,H,W]: draw ONE op group of ``strategy`` for the whole batch.

    ``strategy`` is op names joined by "_" (groups: color, crop, cutout, flip, scale, rotate);
    "none" or "" returns x. The draw and every per-image parameter come from ``generator``.
    ``pick_generator`` (the opt-in fast evaluation): the op group is drawn from it instead, so with a
    CPU ``pick_generator`` and a CUDA ``generator`` the batch is augmented with no host sync (the
    group is a Python choice; every per-image parameter is drawn on the GPU).
    """
    if x.dim() != 4:
        raise ValueError(f"dsa: expected a batch [N, C, H, W], got shape {tuple(x.shape)}.")
    if strategy in (None, "", "none"):
        return x
    names = strategy.split("_")
    unknown = [s for s in names if s not in OPS]
    if unknown:
        raise ValueError(f"dsa: unknown op(s) {unknown} in strategy {strategy!r}; known: {sorted(OPS)}.")
    pick_gen = generator if pick_generator is None else pick_generator
    device = pick_gen.device if pick_gen is not None else torch.device("cpu")
    pick = names[int(torch.randint(len(names), (1,), generator=pick_gen, device=device))]
    if pick == "color":
        return color(x, generator, strength, clamp=clamp)
    return OPS[pick](x, generator, strength)
