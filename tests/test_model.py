"""The D-iGPT model against an independent reference written here from the paper's formulas with plain tensor ops."""

import pytest
import torch
import torch.nn.functional as F

from digpt_xla.models import create_digpt, random_segment_order, set_attention
from digpt_xla.models.layers import select_rows

SPS = 2  # segments per side


def _segment_tokens(grid: int, side: int, s: int) -> list[int]:
    r0, c0 = (s // SPS) * side, (s % SPS) * side
    return [(r0 + i) * grid + c0 + j for i in range(side) for j in range(side)]


def _ln(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps)


def _lin(x, sd, key):
    return F.linear(x, sd[f"{key}.weight"], sd[f"{key}.bias"])


def _attend(q, k, v, heads, mask):
    B, N, C = q.shape
    q, k, v = (t.reshape(B, -1, heads, C // heads).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / (C // heads) ** 0.5 + mask, dim=-1)
    return (w @ v).transpose(1, 2).reshape(B, N, C)


def _mlp(x, sd, key):
    return _lin(F.gelu(_lin(x, sd, f"{key}.fc1")), sd, f"{key}.fc2")


def reference_losses(sd, cfg, images, teacher, order):
    B = images.shape[0]
    grid, tgrid = cfg.img_size // cfg.patch_size, cfg.teacher_grid
    side, tside = grid // SPS, tgrid // SPS
    S = SPS * SPS
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    pos, dpos = sd["pos_embed"][0], sd["decoder_pos_embed"][0]

    seqs, ar_q, kd_q, ar_t, kd_t = [], [], [], [], []
    for b in range(B):
        segs = [_segment_tokens(grid, side, int(s)) for s in order[b]]
        tsegs = [_segment_tokens(tgrid, tside, int(s)) for s in order[b]]
        vis = [i for seg in segs[:-1] for i in seg]
        nxt = [i for seg in segs[1:] for i in seg]
        seqs.append(torch.cat([x[b, vis] + pos[[1 + i for i in vis]], (sd["cls_token"][0] + pos[0:1])]))
        ar_q.append(torch.cat([sd["ar_token"][0] + dpos[[1 + i for i in nxt]], sd["ar_token"][0] + dpos[0:1]]))
        kd_q.append(torch.cat([sd["kd_token"][0] + dpos[[1 + i for i in vis]], sd["kd_token"][0] + dpos[0:1]]))
        t = teacher[b]
        ar_t.append(torch.cat([t[[1 + i for seg in tsegs[1:] for i in seg]], t[0:1]]))
        kd_t.append(torch.cat([t[[1 + i for seg in tsegs[:-1] for i in seg]], t[0:1]]))
    h = torch.stack(seqs)
    L = h.shape[1]
    seg_id = [i // (side * side) for i in range(L - 1)] + [S - 2]
    mask = torch.tensor([[0.0 if seg_id[k] <= seg_id[q] else float("-inf") for k in range(L)] for q in range(L)])

    taps = []
    for i in range(cfg.depth):
        key = f"blocks.{i}"
        y = _ln(h, sd, f"{key}.norm1", 1e-6)
        q, k, v = _lin(y, sd, f"{key}.attn.qkv").chunk(3, dim=-1)
        h = h + _lin(_attend(q, k, v, cfg.num_heads, mask), sd, f"{key}.attn.proj")
        h = h + _mlp(_ln(h, sd, f"{key}.norm2", 1e-6), sd, f"{key}.mlp")
        if i + 1 in cfg.feature_taps:
            taps.append(h)

    def latent(branch):
        cat = torch.cat([_ln(f, sd, f"{branch}_enc_norm.{j}", 1e-5) for j, f in enumerate(taps)], dim=-1)
        z = _lin(cat, sd, f"{branch}_enc2dec")  # channel c*depth + d goes to decoder block d
        return [z[..., d :: cfg.decoder_depth] for d in range(cfg.decoder_depth)]

    def decode(branch, queries, latents):
        y = queries
        for d in range(cfg.decoder_depth):
            key = f"{branch}_blocks.{d}"
            n = _ln(y, sd, f"{key}.norm1", 1e-6)
            q, k, v = _lin(n, sd, f"{key}.attn1.qkv").chunk(3, dim=-1)
            y = y + _lin(_attend(q, k, v, cfg.decoder_heads, mask), sd, f"{key}.attn1.proj")
            qq = _lin(_ln(y, sd, f"{key}.norm2_1", 1e-6), sd, f"{key}.attn2.q")
            kk, vv = _lin(_ln(latents[d], sd, f"{key}.norm2_2", 1e-6), sd, f"{key}.attn2.kv").chunk(2, dim=-1)
            y = y + _lin(_attend(qq, kk, vv, cfg.decoder_heads, mask), sd, f"{key}.attn2.proj")
            y = y + _mlp(_ln(y, sd, f"{key}.norm2", 1e-6), sd, f"{key}.mlp")
        return _lin(_ln(y, sd, f"{branch}_norm", 1e-6), sd, f"{branch}_pred")

    def loss(pred, target):
        n = S - 1
        seg = pred[:, :-1].reshape(B * n, side, side, -1).permute(0, 3, 1, 2)
        seg = F.interpolate(seg, size=(tside, tside), mode="bilinear", align_corners=False)
        seg = seg.permute(0, 2, 3, 1).reshape(B, n * tside * tside, -1)
        p = torch.cat([seg, pred[:, -1:]], dim=1)
        cos = (p / p.norm(dim=-1, keepdim=True) * (target / target.norm(dim=-1, keepdim=True))).sum(-1)
        return (2 - 2 * cos).mean()

    # the release feeds the KD branch's latent to the AR decoder and vice versa
    ar_pred = decode("ar", torch.stack(ar_q), latent("kd"))
    kd_pred = decode("kd", torch.stack(kd_q), latent("ar"))
    return loss(ar_pred, torch.stack(ar_t)), loss(kd_pred, torch.stack(kd_t))


@pytest.fixture(scope="module")
def tiny_with_resize():
    torch.manual_seed(0)
    # teacher grid 10 -> 5x5 teacher segments vs 4x4 student segments: exercises the bilinear resize
    model = create_digpt("digpt_tiny", teacher_grid=10, teacher_dim=40)
    with torch.no_grad():  # non-trivial values everywhere (release init has zero biases)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def test_loss_equals_independent_reference(tiny_with_resize):
    model = tiny_with_resize
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    teacher = torch.randn(3, 101, 40)
    order = torch.stack([torch.randperm(4) for _ in range(3)])
    out = model(images, teacher, order)
    with torch.no_grad():
        ref_ar, ref_kd = reference_losses(model.state_dict(), model.cfg, images, teacher, order)
    assert abs(out.ar_loss.item() - ref_ar.item()) <= 1e-5 * abs(ref_ar.item())
    assert abs(out.kd_loss.item() - ref_kd.item()) <= 1e-5 * abs(ref_kd.item())
    # the crossing and the order matter: another order gives another loss
    other = model(images, teacher, order.flip(1))
    assert abs(other.ar_loss.item() - out.ar_loss.item()) > 1e-4


@pytest.mark.parametrize("src,dst", [(7, 8), (4, 8), (16, 14)])
def test_segment_resize_is_the_bilinear_interpolation(src, dst):
    """The loss resizes segment predictions with a matmul (XLA lowers it everywhere) equal to the release's
    F.interpolate(bilinear, align_corners=False), upsampling (ViT-B/16 vs a /14 teacher) and downsampling."""
    from digpt_xla.models.digpt import bilinear_resize_matrix

    grid = torch.randn(5, 6, src, src, dtype=torch.float64)
    expected = F.interpolate(grid, size=(dst, dst), mode="bilinear", align_corners=False)
    resized = bilinear_resize_matrix(src, dst).double() @ grid.flatten(2).transpose(1, 2)
    torch.testing.assert_close(resized.transpose(1, 2).reshape(5, 6, dst, dst), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["digpt_tiny", "digpt_vit_huge_patch14_224"])
def test_visible_patches_are_embedded_as_the_convolution_embeds_them(name):
    # The encoder embeds only the visible patches, from their gathered pixels (no gather of embeddings, so no
    # scatter in the backward pass): the convolution's numbers to fp32 rounding, and its weight's gradient.
    model = create_digpt(name, depth=1) if name != "digpt_tiny" else create_digpt(name)
    torch.manual_seed(0)
    images = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size)
    index = torch.stack([torch.randperm(model.cfg.grid_size**2)[:24] for _ in range(2)])
    weights = torch.randn(2, 24, model.cfg.embed_dim)
    embedded = model.embed_patches(images, index)
    (embedded * weights).sum().backward()
    ours = model.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    full = model.patch_embed(images)
    gathered = torch.gather(full, 1, index[..., None].expand(-1, -1, full.shape[-1]))
    (gathered * weights).sum().backward()
    assert torch.allclose(embedded, gathered, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours, model.patch_embed.proj.weight.grad, atol=1e-4, rtol=1e-5)


def test_select_rows_is_the_gather_of_those_rows():
    # The one-hot matmul that picks the visible patches' pixels: the gathered numbers exactly, and under autocast
    # the gathered numbers in autocast's dtype (what the patch embedding's matmul would round them to anyway).
    torch.manual_seed(0)
    x = torch.randn(3, 10, 7)
    index = torch.stack([torch.randperm(10)[:4] for _ in range(3)])
    gathered = torch.gather(x, 1, index[..., None].expand(-1, -1, 7))
    assert torch.equal(select_rows(x, index), gathered)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        picked = select_rows(x, index)
    assert picked.dtype == torch.bfloat16 and torch.equal(picked, gathered.bfloat16())


def test_order_none_draws_valid_permutations():
    model = create_digpt("digpt_tiny")
    torch.manual_seed(5)
    a = random_segment_order(64, 4, "cpu")
    torch.manual_seed(5)
    b = random_segment_order(64, 4, "cpu")
    assert torch.equal(a, b), "reproducible under a seed"
    assert torch.all(a.sort(dim=1).values == torch.arange(4)), "each row is a permutation"
    assert len({tuple(r) for r in a.tolist()}) > 10, "samples get different orders"
    images, teacher = torch.randn(2, 3, 32, 32), torch.randn(2, 65, 48)
    torch.manual_seed(3)
    out1 = model(images, teacher)
    torch.manual_seed(3)
    out2 = model(images, teacher)
    assert out1.ar_loss.item() == out2.ar_loss.item()


def test_every_trainable_param_gets_a_gradient():
    model = create_digpt("digpt_tiny")
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2, 65, 48))
    (out.ar_loss + out.kd_loss).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def _loss_and_grads(model, mode, *args):
    set_attention(model, mode)
    model.zero_grad(set_to_none=True)
    out = model(*args)
    (out.ar_loss + out.kd_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    set_attention(model, "sdpa")
    return out, grads


@pytest.mark.parametrize("mode", ["explicit", "flex"])
def test_attention_modes_give_the_same_loss_and_gradients(tiny_with_resize, mode):
    model = tiny_with_resize
    args = (torch.randn(2, 3, 32, 32), torch.randn(2, 101, 40), torch.tensor([[0, 1, 2, 3], [3, 1, 0, 2]]))
    ref, ref_grads = _loss_and_grads(model, "sdpa", *args)
    out, grads = _loss_and_grads(model, mode, *args)
    torch.testing.assert_close(out.ar_loss, ref.ar_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.kd_loss, ref.kd_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert ((grads[name] - g).norm() / g.norm().clamp_min(1e-30)).item() <= 1e-5, name
    features = model.forward_features(args[0])
    set_attention(model, mode)
    torch.testing.assert_close(model.forward_features(args[0]), features, rtol=1e-5, atol=1e-6)
    set_attention(model, "sdpa")
    assert set(model.state_dict()) == set(create_digpt("digpt_tiny").state_dict()), "no new state in any mode"


@pytest.mark.slow
def test_flex_attention_matches_sdpa_on_the_vit_base_geometry():
    model = create_digpt("digpt_vit_base_patch16_224", depth=2, decoder_depth=1)
    args = (torch.randn(1, 3, 224, 224), torch.randn(1, 257, 1024), torch.tensor([[2, 0, 3, 1]]))
    ref, ref_grads = _loss_and_grads(model, "sdpa", *args)
    out, grads = _loss_and_grads(model, "flex", *args)
    torch.testing.assert_close(out.ar_loss, ref.ar_loss, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():
        assert ((grads[name] - g).norm() / g.norm().clamp_min(1e-30)).item() <= 1e-5, name


def release_key_set(depth=12, decoder_depth=2):
    keys = {"cls_token", "pos_embed", "decoder_pos_embed", "mask", "ar_token", "kd_token"}
    keys |= {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    wb = ("weight", "bias")
    for i in range(depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{m}.{s}" for s in wb}
    for br in ("ar", "kd"):
        keys |= {f"{br}_enc2dec.{s}" for s in wb} | {f"{br}_norm.{s}" for s in wb} | {f"{br}_pred.{s}" for s in wb}
        keys |= {f"{br}_enc_norm.{j}.{s}" for j in range(4) for s in wb}
        for i in range(decoder_depth):
            for m in (
                "norm1",
                "attn1.qkv",
                "attn1.proj",
                "norm2_1",
                "norm2_2",
                "attn2.q",
                "attn2.kv",
                "attn2.proj",
                "norm2",
                "mlp.fc1",
                "mlp.fc2",
            ):
                keys |= {f"{br}_blocks.{i}.{m}.{s}" for s in wb}
    return keys


def test_vit_base_is_the_release():
    model = create_digpt("digpt_vit_base_patch16_224")
    assert model.num_trainable_params() == 167_536_128  # the release: 167.5 M
    sd = model.state_dict()
    assert set(sd) == release_key_set()
    # one shared LayerNorm per branch, as in the release
    assert sd["ar_enc_norm.0.weight"].data_ptr() == sd["ar_enc_norm.3.weight"].data_ptr()
    assert sd["ar_enc2dec.weight"].shape == (2 * 1024, 4 * 768)
    assert sd["mask"].shape == (148, 148)
    assert _encoder_shapes(model) == _timm_encoder_shapes("vit_base_patch16_224")


def test_release_initialisation():
    model = create_digpt("digpt_tiny")
    assert torch.all(model.cls_token == 0)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and torch.all(model.blocks[0].norm1.weight == 1)
    w = model.ar_enc2dec.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0.01 < model.ar_token.std() < 0.03


@pytest.mark.parametrize(
    "name,timm_name",
    [
        ("digpt_vit_small_patch16_224", "vit_small_patch16_224"),
        ("digpt_vit_large_patch16_224", "vit_large_patch16_224"),
        ("digpt_vit_huge_patch14_224", "vit_huge_patch14_224"),
    ],
)
def test_other_sizes_are_the_published_encoders_with_release_keys(name, timm_name):
    from digpt_xla.models import digpt_config

    cfg = digpt_config(name)
    with torch.device("meta"):  # shapes only: ViT-H/14's 720 M parameters are never allocated
        model = create_digpt(name)
    assert set(model.state_dict()) == release_key_set(depth=cfg.depth, decoder_depth=cfg.decoder_depth)
    assert _encoder_shapes(model) == _timm_encoder_shapes(timm_name)


def _encoder_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    parts = ("patch_embed", "blocks", "cls_token", "pos_embed")
    return {n: tuple(p.shape) for n, p in model.named_parameters() if n.split(".")[0] in parts}


def _timm_encoder_shapes(timm_name: str) -> dict[str, tuple[int, ...]]:
    """timm's ViT of the same size, parameter for parameter, as the release's encoder is (timm's final norm aside:
    D-iGPT norms each tapped layer instead)."""
    import timm

    with torch.device("meta"):
        reference = timm.create_model(timm_name, num_classes=0)
    return {n: tuple(p.shape) for n, p in reference.named_parameters() if not n.startswith("norm.")}


def test_bad_model_settings_are_clear():
    from digpt_xla.models import digpt_config

    with pytest.raises(KeyError, match="closest.*depth"):
        digpt_config("digpt_tiny", dept=3)
    with pytest.raises(KeyError, match="unknown model"):
        digpt_config("digpt_vit_gigantic")
    with pytest.raises(ValueError, match="teacher_tokens has shape"):
        create_digpt("digpt_tiny")(torch.randn(1, 3, 32, 32), torch.randn(1, 10, 48))
