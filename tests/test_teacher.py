import fsspec
import pytest
import torch
from safetensors.torch import save as save_safetensors
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from digpt_xla.checkpoint.reader import CheckpointError
from digpt_xla.teacher import CLIP_MEAN, CLIP_STD, ClipTeacher, PixelTeacher

SMALL = dict(image_size=64, patch_size=16, width=64, layers=2, head_width=32)  # a ViT-B-16 tower, shrunk


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    t = ClipTeacher("ViT-B-16", vision_overrides=SMALL)
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a missing ln_post would show
        t.visual.ln_post.weight.uniform_(0.5, 1.5)
        t.visual.ln_post.bias.normal_()
    return t


def test_clip_teacher_tokens_are_ln_post_then_proj(teacher):
    v = teacher.visual
    images = torch.randn(2, 3, 64, 64)
    out = teacher(images)
    assert out.shape == (2, 1 + 16, teacher.dim) and teacher.grid_size == 4
    # by hand: un-normalise ImageNet, re-normalise CLIP, then the tower's own pieces
    pixels = images * torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_DEFAULT_MEAN).view(
        1, 3, 1, 1
    )
    x = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = v.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(2, 1, -1), x], dim=1) + v.positional_embedding
        x = v.transformer(v.ln_pre(x))
        expected = v.ln_post(x) @ v.proj
        pooled = v(pixels.sub(torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)).div(torch.tensor(CLIP_STD).view(1, 3, 1, 1)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 0], pooled, rtol=1e-5, atol=1e-5)  # CLS token is open_clip's embedding
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training, "the teacher stays in eval mode"


def _full_state(visual_sd):
    full = {f"visual.{k}": v.clone() for k, v in visual_sd.items()}
    full.update(
        {
            "token_embedding.weight": torch.randn(10, 8),
            "text_projection": torch.randn(8, 8),
            "logit_scale": torch.tensor(4.6),
        }
    )
    return full


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("layout", ["full", "visual"])
@pytest.mark.parametrize("fs", ["local", "memory"])
def test_checkpoint_round_trip(teacher, tmp_path, fmt, layout, fs):
    sd = teacher.visual.state_dict()
    state = _full_state(sd) if layout == "full" else {k: v.clone() for k, v in sd.items()}
    payload = save_safetensors({k: v.contiguous() for k, v in state.items()}) if fmt == "safetensors" else None
    url = f"{tmp_path}/ckpt.{fmt}" if fs == "local" else f"memory://teachers/{layout}/ckpt.{fmt}"
    with fsspec.open(url, "wb") as f:
        if payload is not None:
            f.write(payload)
        else:
            torch.save(state, f)
    loaded = ClipTeacher("ViT-B-16", checkpoint=url, vision_overrides=SMALL)
    for k, v in sd.items():
        assert torch.equal(loaded.visual.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), teacher(x))


def test_bad_checkpoints_name_the_key(teacher, tmp_path):
    sd = {k: v.clone() for k, v in teacher.visual.state_dict().items()}
    bad_shape = dict(sd, proj=torch.zeros(3, 3))
    torch.save(bad_shape, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"'proj' has shape \(3, 3\), expected \(64, 512\)"):
        ClipTeacher("ViT-B-16", checkpoint=str(tmp_path / "shape.pt"), vision_overrides=SMALL)
    missing = {k: v for k, v in sd.items() if k != "ln_post.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing key 'ln_post.weight'"):
        ClipTeacher("ViT-B-16", checkpoint=str(tmp_path / "missing.pt"), vision_overrides=SMALL)
    torch.save(dict(sd, extra_head=torch.zeros(2)), tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected key 'extra_head'"):
        ClipTeacher("ViT-B-16", checkpoint=str(tmp_path / "extra.pt"), vision_overrides=SMALL)
    with pytest.raises(CheckpointError, match="not found"):
        ClipTeacher("ViT-B-16", checkpoint=str(tmp_path / "nope.pt"), vision_overrides=SMALL)
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        ClipTeacher("ViT-B-16", checkpoint=str(tmp_path / "weights.npz"), vision_overrides=SMALL)


def test_pixel_teacher_contract():
    t = PixelTeacher(patch_size=4, image_size=32)
    images = torch.randn(2, 3, 32, 32)
    out = t(images)
    assert out.shape == (2, 65, 48) and t.grid_size == 8 and t.dim == 48
    # patch 1 (row 0, column 1) flattened as (row, column, channel), then normalised
    patch = images[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1)
    expected = (patch - patch.mean()) / (patch.var(unbiased=False) + 1e-6).sqrt()
    torch.testing.assert_close(out[0, 2], expected)
    thumb = torch.nn.functional.adaptive_avg_pool2d(images[1:2], 4)[0].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(out[1, 0], (thumb - thumb.mean()) / (thumb.var(unbiased=False) + 1e-6).sqrt())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_teacher_stored_in_its_compute_dtype_gives_the_same_features(teacher, precision):
    # Autocast casts every matmul weight at every use; storing them cast already must not change a single value.
    import copy

    from digpt_xla.precision import autocast_dtype, store_for_autocast, stored_bytes

    dtype = autocast_dtype(precision)
    stored = copy.deepcopy(teacher)
    fp32_bytes = stored_bytes(stored, "fp32")
    assert store_for_autocast(stored, precision) == len(stored.matmul_weights()) > 0
    assert {w.dtype for w in stored.matmul_weights()} == {dtype}
    assert stored.visual.ln_post.weight.dtype == torch.float32  # norms and embeddings stay as they were
    assert stored.visual.positional_embedding.dtype == torch.float32
    assert stored_bytes(stored, "fp32") == stored_bytes(teacher, precision) < 0.6 * fp32_bytes
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=dtype):
        assert torch.equal(stored(x), teacher(x))
    assert store_for_autocast(copy.deepcopy(teacher), "fp32") == 0  # an fp32 teacher is kept exactly
