"""U-ViT: parameter counts of the released models, state-dict names, token order, embedding, and a
forward pass checked against an independent re-implementation written from U-ViT's description."""
import math

import einops
import pytest
import torch
import torch.nn.functional as F

from diffdistill.uvit import UViT, count_parameters, patchify, timestep_embedding, unpatchify

S2 = dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
          qkv_bias=False, mlp_time_embed=False)
M4 = dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16, num_heads=12, mlp_ratio=4,
          qkv_bias=False, mlp_time_embed=False)
TINY = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2,
            qkv_bias=False, mlp_time_embed=False)


def meta_model(**kw):
    # The meta device allocates no memory: the 131M-parameter model costs nothing to count.
    with torch.device("meta"):
        return UViT(**kw)


@pytest.mark.parametrize("cfg,num_classes,expected", [
    (S2, -1, 44_255_328),     # CIFAR-10 checkpoint, unconditional
    (S2, 100, 44_307_040),    # CIFAR-100 finetune
    (M4, 1000, 130_940_292),  # ImageNet-64 checkpoint
    (M4, 200, 130_325_892),   # Tiny-ImageNet finetune
])
def test_parameter_counts_match_released_models(cfg, num_classes, expected):
    assert count_parameters(meta_model(**cfg, num_classes=num_classes)) == expected


@pytest.mark.parametrize("option", [dict(conv=False), dict(mlp_time_embed=True), dict(qkv_bias=True),
                                    dict(skip=False)])
def test_other_options_give_other_counts(option):
    # The counts above pin down U-ViT's options: the 3×3 final conv on, no time MLP, no qkv bias.
    cfg = {**S2, **option}
    assert count_parameters(meta_model(**cfg, num_classes=100)) != 44_307_040


def test_pos_embed_and_extras():
    unc = meta_model(**S2, num_classes=-1)
    assert tuple(unc.pos_embed.shape) == (1, 257, 512) and unc.extras == 1
    assert not hasattr(unc, "label_emb")
    cond = meta_model(**M4, num_classes=200)
    assert tuple(cond.pos_embed.shape) == (1, 2 + 16 ** 2, 768) and cond.extras == 2
    assert tuple(cond.label_emb.weight.shape) == (200, 768)


def expected_keys(depth, num_classes, qkv_bias=False, mlp_time_embed=False, conv=True, skip=True):
    """State-dict names as U-ViT's released checkpoints spell them (DESIGN.md)."""
    def block(prefix, with_skip):
        keys = [f"{prefix}.norm1.weight", f"{prefix}.norm1.bias", f"{prefix}.attn.qkv.weight",
                f"{prefix}.attn.proj.weight", f"{prefix}.attn.proj.bias", f"{prefix}.norm2.weight",
                f"{prefix}.norm2.bias", f"{prefix}.mlp.fc1.weight", f"{prefix}.mlp.fc1.bias",
                f"{prefix}.mlp.fc2.weight", f"{prefix}.mlp.fc2.bias"]
        if qkv_bias:
            keys.append(f"{prefix}.attn.qkv.bias")
        if with_skip:
            keys += [f"{prefix}.skip_linear.weight", f"{prefix}.skip_linear.bias"]
        return keys

    keys = ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "decoder_pred.weight", "decoder_pred.bias"]
    if num_classes > 0:
        keys.append("label_emb.weight")
    if mlp_time_embed:
        keys += ["time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias"]
    if conv:
        keys += ["final_layer.weight", "final_layer.bias"]
    for i in range(depth // 2):
        keys += block(f"in_blocks.{i}", False) + block(f"out_blocks.{i}", skip)
    keys += block("mid_block", False)
    return set(keys)


@pytest.mark.parametrize("cfg,num_classes", [(S2, -1), (S2, 100), (M4, 200)])
def test_state_dict_names(cfg, num_classes):
    sd = meta_model(**cfg, num_classes=num_classes).state_dict()
    assert set(sd) == expected_keys(cfg["depth"], num_classes)


@pytest.mark.parametrize("option", [dict(qkv_bias=True), dict(mlp_time_embed=True), dict(conv=False),
                                    dict(skip=False)])
def test_state_dict_names_follow_options(option):
    sd = meta_model(**{**TINY, **option}, num_classes=5).state_dict()
    assert set(sd) == expected_keys(TINY["depth"], 5, **option)


def test_s2_shapes():
    sd = meta_model(**S2, num_classes=100).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["patch_embed.proj.weight"] == (512, 3, 2, 2)
    assert shapes["in_blocks.0.attn.qkv.weight"] == (1536, 512)
    assert shapes["out_blocks.5.skip_linear.weight"] == (512, 1024)
    assert shapes["mid_block.mlp.fc1.weight"] == (2048, 512)
    assert shapes["decoder_pred.weight"] == (2 * 2 * 3, 512)
    assert shapes["final_layer.weight"] == (3, 3, 3, 3)
    assert shapes["label_emb.weight"] == (100, 512)
    assert shapes["pos_embed"] == (1, 258, 512)


def test_timestep_embedding_cos_first():
    t = torch.tensor([0.0, 5.0, 998.5])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    args = t[:, None] * freqs
    assert torch.allclose(emb[:, :4], torch.cos(args), atol=1e-6)
    assert torch.allclose(emb[:, 4:], torch.sin(args), atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))


def test_patchify_layout_matches_einops():
    imgs = torch.randn(2, 3, 8, 8)
    tokens = einops.rearrange(imgs, "B C (h p1) (w p2) -> B (h w) (p1 p2 C)", p1=2, p2=2)
    assert torch.equal(patchify(imgs, 2), tokens)
    assert torch.equal(unpatchify(tokens, 3), imgs)


def reference_forward(model, x, timesteps, y, num_heads):
    """U-ViT's forward written again from its description, with einops for every reshape."""
    sd = model.state_dict()
    D, H, p = model.embed_dim, num_heads, model.patch_size

    def lin(v, name):
        return F.linear(v, sd[name + ".weight"], sd.get(name + ".bias"))

    def block(v, prefix, skip=None):
        if skip is not None:
            v = lin(torch.cat([v, skip], -1), prefix + ".skip_linear")
        h = F.layer_norm(v, (D,), sd[prefix + ".norm1.weight"], sd[prefix + ".norm1.bias"])
        q, k, w = einops.rearrange(lin(h, prefix + ".attn.qkv"), "B L (K H Dh) -> K B H L Dh", K=3, H=H)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), -1)
        v = v + lin(einops.rearrange(att @ w, "B H L Dh -> B L (H Dh)"), prefix + ".attn.proj")
        h = F.layer_norm(v, (D,), sd[prefix + ".norm2.weight"], sd[prefix + ".norm2.bias"])
        return v + lin(F.gelu(lin(h, prefix + ".mlp.fc1")), prefix + ".mlp.fc2")

    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    patches = einops.rearrange(patches, "B D h w -> B (h w) D")
    half = D // 2
    args = timesteps[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / half)
    time_tok = torch.cat([torch.cos(args), torch.sin(args)], -1)[:, None]
    label_tok = sd["label_emb.weight"][y][:, None]
    v = torch.cat([label_tok, time_tok, patches], 1) + sd["pos_embed"]
    skips = []
    for i in range(len(model.in_blocks)):
        v = block(v, f"in_blocks.{i}")
        skips.append(v)
    v = block(v, "mid_block")
    for i in range(len(model.out_blocks)):
        v = block(v, f"out_blocks.{i}", skips.pop())
    v = F.layer_norm(v, (D,), sd["norm.weight"], sd["norm.bias"])
    v = lin(v, "decoder_pred")[:, 2:]
    h = model.img_size // p
    v = einops.rearrange(v, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=h, p1=p, p2=p)
    return F.conv2d(v, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)


def test_forward_matches_reference_and_token_order():
    torch.manual_seed(0)
    model = UViT(**TINY, num_classes=5).eval()
    with torch.no_grad():  # non-zero biases so that every term is exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0.5, 300.0, 999.0]), torch.tensor([0, 4, 2])
    with torch.no_grad():
        out = model(x, t, y)
        ref = reference_forward(model, x, t, y, TINY["num_heads"])
    assert out.shape == (3, 3, 8, 8)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)

    # Token order [label, time, patches]: the first block sees the label at 0 and the time at 1.
    seen = []
    hook = model.in_blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model(x, t, y)
        model(x, t, torch.tensor([1, 4, 2]))     # label of sample 0 changed
        model(x, t + torch.tensor([7.0, 0, 0]), y)  # time of sample 0 changed
    hook.remove()
    base, new_label, new_time = seen
    changed_by_label = (new_label[0] != base[0]).any(-1).nonzero().flatten().tolist()
    changed_by_time = (new_time[0] != base[0]).any(-1).nonzero().flatten().tolist()
    assert changed_by_label == [0] and changed_by_time == [1]
    assert torch.equal(new_label[1:], base[1:])


def test_unconditional_forward():
    model = UViT(**TINY, num_classes=-1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]))
    assert out.shape == (2, 3, 8, 8) and model.pos_embed.shape[1] == 1 + 16


HALF = [torch.bfloat16] + ([torch.float16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mlp_time_embed", [False, True])
def test_half_precision_model_runs(dtype, mlp_time_embed):
    # A model converted with .to(bfloat16) must accept its own dtype (the float32 time embedding is
    # cast to the parameters' dtype); fast sampling runs the network like this.
    device = "cuda" if dtype == torch.float16 else "cpu"
    model = UViT(**{**TINY, "mlp_time_embed": mlp_time_embed}, num_classes=5).to(device, dtype).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 8, dtype=dtype, device=device),
                    torch.tensor([1.0, 900.0], device=device), torch.tensor([0, 1], device=device))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        UViT(img_size=10, patch_size=4)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        UViT(embed_dim=30, num_heads=4)


@pytest.mark.parametrize("option", [dict(), dict(mlp_time_embed=True), dict(conv=False), dict(skip=False),
                                    dict(num_classes=-1)])
def test_benchmark_flop_formula_matches_flop_counter(option):
    # benchmarks/sampling.py reports FLOPs per image from an analytic formula; it must agree with
    # torch's FlopCounterMode (run on the meta device, so free) for every U-ViT option.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"
    spec = importlib.util.spec_from_file_location("bench_sampling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = {**TINY, "num_classes": 5, "conv": True, "skip": True, **option}
    assert bench.analytic_forward_flops(cfg) == bench.counted_forward_flops(cfg)
    s2 = bench.MODELS["s2"][1]
    assert bench.analytic_forward_flops(s2) == bench.counted_forward_flops(s2) == 24_503_420_928


# The reshapes as the model wrote them with reshape/permute before it used einops: the einops
# version must give the very same numbers (torch.equal), so trained weights and samples are unchanged.
def _permute_patchify(imgs, p):
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def _permute_unpatchify(x, channels):
    B, L, patch_dim = x.shape
    p = int(round((patch_dim // channels) ** 0.5))
    h = w = int(round(L ** 0.5))
    x = x.reshape(B, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * p, w * p)


def _permute_attention(attn, x):
    B, L, D = x.shape
    qkv = attn.qkv(x).reshape(B, L, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
    x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return attn.proj(x.transpose(1, 2).reshape(B, L, D))


def _permute_forward(model, x, timesteps, y):
    """UViT.forward with the reshape/permute formulas of the code before einops."""
    def block(blk, v, skip=None):
        if blk.skip_linear is not None:
            v = blk.skip_linear(torch.cat([v, skip], dim=-1))
        v = v + _permute_attention(blk.attn, blk.norm1(v))
        return v + blk.mlp(blk.norm2(v))

    v = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t_emb = timestep_embedding(timesteps, model.embed_dim).to(model.pos_embed.dtype)
    tokens = [model.time_embed(t_emb).unsqueeze(1)]
    if y is not None:
        tokens.insert(0, model.label_emb(y).unsqueeze(1))
    v = torch.cat(tokens + [v], dim=1) + model.pos_embed
    skips = []
    for blk in model.in_blocks:
        v = block(blk, v)
        skips.append(v)
    v = block(model.mid_block, v)
    for blk in model.out_blocks:
        v = block(blk, v, skips.pop())
    v = model.decoder_pred(model.norm(v))
    return model.final_layer(_permute_unpatchify(v[:, model.extras:, :], model.in_chans))


@pytest.mark.parametrize("num_classes", [5, -1])
def test_einops_reshapes_equal_the_permute_formulas(num_classes):
    torch.manual_seed(1)
    imgs = torch.randn(2, 3, 8, 8)
    assert torch.equal(patchify(imgs, 2), _permute_patchify(imgs, 2))
    tokens = torch.randn(2, 16, 12)
    assert torch.equal(unpatchify(tokens, 3), _permute_unpatchify(tokens, 3))
    model = UViT(**TINY, num_classes=num_classes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0.5, 300.0, 999.0])
    y = torch.tensor([0, 4, 2]) if num_classes > 0 else None
    with torch.no_grad():
        h = torch.randn(3, 20, TINY["embed_dim"])
        assert torch.equal(model.in_blocks[0].attn(h), _permute_attention(model.in_blocks[0].attn, h))
        assert torch.equal(model.patch_embed(x), model.patch_embed.proj(x).flatten(2).transpose(1, 2))
        assert torch.equal(model(x, t, y), _permute_forward(model, x, t, y))
