"""meanp.py: `full` trains what CLIP4Clip's --freeze_layer_num trains (a tiny and a ViT-B/32-shaped CLIP), and the
masked mean over frames ignores padded frames."""
import pytest
import torch

import clip
import meanp
import train
from conftest import make_tiny_clip

# What CLIP4Clip's rule (main_task_retrieval.py at 508ffa3, --freeze_layer_num k >= 0) freezes, spelled out: the
# tensors outside the output ends and the residual blocks, and the blocks numbered below k in either tower
STEM = {"token_embedding.weight", "positional_embedding", "visual.class_embedding", "visual.positional_embedding",
        "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias"}
BLOCK = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
         "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
         "ln_2.bias")


def expected_frozen(k):
    if k == -1:
        return set()
    return STEM | {f"{tower}resblocks.{i}.{p}" for tower in ("visual.transformer.", "transformer.")
                   for i in range(k) for p in BLOCK}


def frozen_names(method):
    return {n[len("clip."):] for n, p in method.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("k", [-1, 0, 1, 2])
def test_tiny_clip_trainable_set_follows_clip4clip(k):
    method = meanp.MeanP(make_tiny_clip(), 4, freeze_layer_num=k)
    assert frozen_names(method) == expected_frozen(k)
    groups = train.param_groups(method, 1e-4, 1e-7, 0.2)  # every trainable tensor once, at clip_lr
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in method.parameters())
    assert all(g["lr"] == 1e-7 for g in groups)


@pytest.mark.parametrize("k, trainable", [(-1, 151_277_313), (0, 123_540_993), (6, 62_099_457), (12, 657_921)])
def test_vit_b32_trainable_set_and_count(k, trainable):
    with torch.device("meta"):
        method = meanp.MeanP(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), 12, freeze_layer_num=k)  # shapes, no memory
    assert frozen_names(method) == expected_frozen(k)
    assert clip.count_trainable(method) == trainable


def test_default_is_clip4clip_zero_and_the_flag_reaches_the_constructor():
    assert meanp.RECIPE["freeze_layer_num"] == 0
    args, cls, _ = train.parse_args(["--method", "full", "--freeze_layer_num", "-1"])
    assert cls is meanp.MeanP and args.kwargs == dict(freeze_layer_num=-1)
    assert not any(p.requires_grad for p in meanp.ZeroShot(make_tiny_clip(), 4, freeze_layer_num=0).parameters())
    for bad in (-2, 3):  # the tiny CLIP has 2 blocks per tower
        with pytest.raises(ValueError, match="freeze_layer_num"):
            meanp.MeanP(make_tiny_clip(), 4, freeze_layer_num=bad)


def test_masked_mean_ignores_padded_frames():
    method = meanp.MeanP(make_tiny_clip(), 4)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 4, 3, 32, 32, generator=g)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    garbage = video.clone()
    garbage[1, 2:] = 50 * torch.randn(2, 3, 32, 32, generator=g)  # anything at all in the padded frames
    with torch.no_grad():
        full, short = method.encode_video(garbage, mask), method.encode_video(video[1:, :2], mask[1:, :2])
        frames = torch.nn.functional.normalize(method.clip.encode_image(video[1, :2]), dim=-1)
    torch.testing.assert_close(full[1], short[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(full[1], frames.mean(0), atol=1e-6, rtol=0)  # the mean of the valid frames
