"""UMP's behaviour, one property per test, on a tiny CLIP: default design."""
import pytest
import torch
import torch.nn.functional as F

import clip
import flags
from conftest import make_tiny_clip
from ump import RECIPE, UMP, UMPRelease, encoder_layer_last_rows, prompt_generator, spatial_temporal_shift

T, R = 4, 32  # frames, TINY resolution (16 patches + CLS = 17 tokens)


def make_ump(seed=0, **kw):
    model = UMP(make_tiny_clip(seed), T, **{"K_d": 2, **kw})  # TINY has 2 video layers: STS in both
    torch.manual_seed(seed + 1)
    for p in model.parameters():  # move every trainable tensor off its init so no path is trivially zero
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(n, T, 3, R, R, generator=g)
    mask = torch.ones(n, T, dtype=torch.bool)
    ids = clip.tokenize(["a red square moves left", "a small blue circle grows", "green"][:n], context_length=16)
    return ids, video, mask


def test_clip_frozen_and_trainable_set():
    model = make_ump()
    assert all(not p.requires_grad for p in model.clip.parameters())
    assert not model.logit_scale.requires_grad
    names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"upg", "prompts", "video_in", "video_out"}
    assert model.prompts.shape == (2, 8, 64)  # S_l [Np, Dt] per layer, shared by both towers


@pytest.mark.parametrize("kw, count", [({}, 3_989_248), ({"shared_upg": False}, 8_789_248)])
def test_vitb32_trainable_count(kw, count):
    with torch.device("meta"):  # ViT-B/32 shapes without weights
        assert clip.count_trainable(UMP(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), 12, **kw)) == count


def test_towers_independent_sample_alone_equals_batch():
    model = make_ump()
    ids, video, mask = inputs()
    mask[1, 2:] = False
    with torch.no_grad():
        t_all, v_all = model.encode_text(ids), model.encode_video(video, mask)
        for i in range(3):
            assert torch.allclose(model.encode_text(ids[i:i + 1]), t_all[i:i + 1], atol=1e-5)
            assert torch.allclose(model.encode_video(video[i:i + 1], mask[i:i + 1]), v_all[i:i + 1], atol=1e-5)


def test_text_prompts_after_sot_and_eot_shift():
    model = make_ump()
    ids = inputs()[0]
    seen = []
    h = model.clip.transformer.resblocks[0].ln_1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        t16 = model.encode_text(ids)
        h.remove()
        t24 = model.encode_text(F.pad(ids, (0, 8)))  # longer padding
        junk = ids.clone()
        junk[ids == 0] = 1234  # tokens after EOT are hidden from G (key padding) and from EOT (causal)
        t_junk = model.encode_text(junk)
        model.prompts.data[0, :, 0] += 1.0
        t_moved = model.encode_text(ids)
    assert seen == [(3, 16, 64), (3, 16 + 8, 64)]  # G reads ln_1(words) [N, L, Dt]; the block [N, L+Np, Dt]
    assert torch.allclose(t16, t24, atol=1e-5) and torch.allclose(t16, t_junk, atol=1e-5)
    assert (t_moved - t16).abs().max() > 1e-3  # the seeds reach EOT (they did not in the release)


def test_video_block_sees_prompts_after_patches():
    model = make_ump()
    _, video, mask = inputs()
    seen = []
    h = model.clip.visual.transformer.resblocks[0].ln_2.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        frames = model.encode_frames(video, mask)
    h.remove()
    assert seen[0].shape == (3 * T, 17 + 8, 64) and frames.shape == (3, T, 32)


def test_prompts_follow_own_tokens_only_when_conditioned():
    for cond in (True, False):
        model = make_ump(upg_condition=cond)
        block = model.clip.visual.transformer.resblocks[0]
        x = torch.randn(2, 17, 64)
        with torch.no_grad():
            p = model.video_prompts(x, block, 0)  # [2, Np, Dv]
            p_other = model.video_prompts(x.flip(0), block, 0)
        assert p.shape == (2, 8, 64)
        assert ((p - p_other.flip(0)).abs().max() < 1e-5)  # a sample's prompts depend on its own tokens only
        assert ((p[0] - p[1]).abs().max() > 1e-3) == cond  # ... and change with them when conditioned


def test_generator_seed_rows_equal_the_full_encoder_layer():
    """encoder_layer_last_rows computes only the seed rows; outputs and gradients equal nn.TransformerEncoderLayer's."""
    torch.manual_seed(0)
    G = prompt_generator(64, 128).eval()  # eval: the same dropout (none) in both paths
    x = torch.randn(3, 13, 64)
    pad = torch.zeros(3, 13, dtype=torch.bool)
    pad[1, 6:9] = True  # padded keys of the middle sample are hidden from its seeds
    for mask in (pad, None):
        ref = G(x, src_key_padding_mask=mask)[:, -4:]
        grad_ref = torch.autograd.grad(ref.square().sum(), list(G.parameters()))
        out = encoder_layer_last_rows(G, x, mask, 4)
        grad = torch.autograd.grad(out.square().sum(), list(G.parameters()))
        assert out.shape == (3, 4, 64) and (out - ref).abs().max() < 1e-5
        assert all((a - b).abs().max() < 1e-4 for a, b in zip(grad, grad_ref))
    x2 = x.clone()
    x2[1, 6:9] = 100.0  # changing padded tokens changes nothing
    assert (encoder_layer_last_rows(G, x2, pad, 4) - encoder_layer_last_rows(G, x, pad, 4)).abs().max() < 1e-6


def test_sts_hand_built():
    B, n, Np, W = 1, 3, 4, 16  # CLS + 2 patches, 4 prompts, fold W/8 = 2 channels
    z = torch.arange(1, T + 1, dtype=torch.float).view(1, T, 1, 1).expand(B, T, n + Np, W).clone()  # value = t+1
    mask = torch.tensor([[True, True, True, False]])
    out = spatial_temporal_shift(z, mask, n)
    f = [1.0, 2.0, 3.0, 4.0]  # frame values; frame 3 is padding and sends zeros
    prev, nxt = [0.0, f[0], f[1], f[2]], [f[1], f[2], 0.0, 0.0]  # zero ends, zero from the padded frame
    for t in range(T):
        assert (out[0, t, 0] == f[t]).all()  # CLS untouched
        assert (out[0, t, 1:n, :2] == prev[t]).all() and (out[0, t, 1:n, 2:4] == nxt[t]).all()
        assert (out[0, t, 1:n, 4:] == f[t]).all()  # other channels kept
        assert (out[0, t, n:n + 2] == prev[t]).all() and (out[0, t, n + 2:] == nxt[t]).all()  # prompt halves


def test_sts_layers_k_d_zero_and_single_frame():
    ids, video, mask = inputs()
    m0, m1, m2 = make_ump(K_d=0), make_ump(K_d=1), make_ump(K_d=2)
    with torch.no_grad():
        v0, v1, v2 = (m.encode_video(video, mask) for m in (m0, m1, m2))
        assert (v0 - v1).abs().max() > 1e-4 and (v1 - v2).abs().max() > 1e-4  # STS acts, per layer
        one = [m.encode_video(video[:, :1], mask[:, :1]) for m in (m0, m2)]  # T = 1: nothing to shift
        assert torch.allclose(one[0], one[1], atol=1e-6)
        assert torch.allclose(m0.encode_text(ids), m2.encode_text(ids))  # STS is video only
    with pytest.raises(ValueError, match="K_d"):
        UMP(make_tiny_clip(), T, K_d=3)


def test_sts_shifts_only_the_attention_input():
    _, video, mask = inputs()
    seen = []
    for K_d in (0, 1):
        model = make_ump(K_d=K_d)
        block = model.clip.visual.transformer.resblocks[-1]
        torch.nn.init.zeros_(block.attn.out_proj.weight)  # attention adds 0: the residual stream is z itself
        torch.nn.init.zeros_(block.attn.out_proj.bias)
        h = block.ln_2.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        with torch.no_grad():
            model.encode_frames(video, mask)
        h.remove()
    assert torch.equal(seen[0], seen[1])  # the shifted copy fed attention only; z was not overwritten


def test_padding_frames_change_nothing_and_mean_pooling():
    model = make_ump()
    _, video, mask = inputs()
    mask[0, 2:] = False
    other = video.clone()
    other[0, 2:] = torch.randn_like(other[0, 2:])
    with torch.no_grad():
        v, v_other = model.encode_video(video, mask), model.encode_video(other, mask)
        short = model.encode_video(video[:1, :2], mask[:1, :2])  # the same clip without its padding
        frames = F.normalize(model.encode_frames(video, mask), dim=-1)
    assert torch.allclose(v, v_other, atol=1e-6) and torch.allclose(v[:1], short, atol=1e-5)
    assert torch.allclose(v[0], frames[0, :2].mean(0), atol=1e-6)  # mean of normalised valid frames
    assert torch.allclose(v[1], frames[1].mean(0), atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"shared_upg": False}])
def test_gradients_reach_every_trainable_tensor(kw):
    model = make_ump(**kw).train()
    ids, video, mask = inputs()
    t = F.normalize(model.encode_text(ids), dim=-1)
    v = F.normalize(model.encode_video(video, mask), dim=-1)
    logits = model.logit_scale.exp() * t @ v.T
    labels = torch.arange(3)
    (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).backward()
    for name, p in model.named_parameters():
        assert not p.requires_grad or (p.grad is not None and p.grad.abs().max() > 0), name
    assert all(p.grad is None for p in model.clip.parameters())


def test_recipe_keys_are_constructor_kwargs_and_bad_input():
    extra = {k: v for k, v in RECIPE.items() if k not in flags.LOOP_DEFAULTS}  # the loop's keys go to the loop
    assert {"K_d", "n_prompts", "upg_condition", "shared_upg", "d_ff"} <= set(extra)
    for cls in (UMP, UMPRelease):  # the release's class takes the same flags
        cls(make_tiny_clip(), T, **{**extra, "K_d": 1})
    model = make_ump()
    with pytest.raises(ValueError, match="video_mask"):
        model.encode_video(torch.randn(2, T, 3, R, R), torch.ones(2, T + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="token ids"):
        model.encode_text(torch.zeros(16, dtype=torch.long))
