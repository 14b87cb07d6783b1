"""U-ViT: a ViT backbone for diffusion with long skip connections (Bao et al., 2023).

Key-for-key compatible with the public U-ViT checkpoints: the module names, parameter shapes and
token order ([label, time, patches]) follow the released code, so a released state dict loads with
``strict=True``.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps: cos half first, then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def patchify(imgs, patch_size):
    """Images to a sequence of flattened patches."""
    return rearrange(imgs, "B C (h p1) (w p2) -> B (h w) (p1 p2 C)", p1=patch_size, p2=patch_size)


def unpatchify(x, channels):
    """A sequence of flattened square patches (a square grid of them) back to images."""
    B, L, patch_dim = x.shape
    p = int(round((patch_dim // channels) ** 0.5))
    h = int(round(L ** 0.5))
    assert h * h == L and p * p * channels == patch_dim, (L, patch_dim, channels)
    return rearrange(x, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=h, p1=p, p2=p)


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` projection, scaled dot-product attention, ``proj``."""

    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        # The K-H-D split of U-ViT's checkpoints: qkv's output features are (query, key, value) × heads.
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "B H L D -> B L (H D)"))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; out-blocks first fuse the long skip with ``skip_linear``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, skip=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches, each projected to one token by a strided convolution."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return rearrange(self.proj(x), "B D h w -> B (h w) D")


class UViT(nn.Module):
    """Tokens [label, time, patches] through in-blocks, a mid-block and out-blocks fed by long skips;
    ``forward(x, timesteps, y=None)`` returns the predicted noise ε, shaped like ``x``."""

    def __init__(self, img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8,
                 mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False, num_classes=-1, conv=True, skip=True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = (nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
                           if mlp_time_embed else nn.Identity())
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
            self.extras = 2
        else:
            self.extras = 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.in_blocks = nn.ModuleList([Block(**block) for _ in range(depth // 2)])
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList([Block(**block, skip=skip) for _ in range(depth // 2)])

        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        return {"pos_embed"}

    def forward(self, x, timesteps, y=None):
        x = self.patch_embed(x)
        # The sinusoidal embedding is computed in float32; cast it to the parameters' dtype so a model
        # converted with .half()/.to(bfloat16) runs (under autocast the parameters stay float32).
        t_emb = timestep_embedding(timesteps, self.embed_dim).to(self.pos_embed.dtype)
        tokens = [self.time_embed(t_emb).unsqueeze(1)]
        if y is not None:
            tokens.insert(0, self.label_emb(y).unsqueeze(1))
        x = torch.cat(tokens + [x], dim=1) + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.decoder_pred(self.norm(x))
        x = unpatchify(x[:, self.extras:, :], self.in_chans)
        return self.final_layer(x)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
