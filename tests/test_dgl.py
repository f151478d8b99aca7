"""DGL (dgl.py) on a tiny CLIP on the CPU: what trains, the global-local mask and its two attention forms (one
masked call, the release's two calls), init, bad input. Inside the towers: test_dgl_towers.py."""
import math

import pytest
import torch

import clip
import dgl
from conftest import make_tiny_clip
from messages import assert_tells

T = 3  # frames
LATENTS = ["linear", "transformer"]


def make(latent, **kw):
    torch.manual_seed(1)
    return dgl.DGL(make_tiny_clip(), num_frames=T, latent=latent, **kw)


def test_vitb32_counts_and_frozen_clip():
    expect = dict(linear=827_392, transformer=9_575_168)  # the release's modules instantiated at ViT-B/32
    for latent in LATENTS:
        with torch.device("meta"):
            m = dgl.DGL(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), num_frames=12, latent=latent)
        assert clip.count_trainable(m) == expect[latent]
        assert all(not p.requires_grad for p in m.clip.parameters())  # logit_scale, LNs, projections too
        groups = m.param_groups(0.2)
        assert sum(p.numel() for g in groups for p in g["params"]) == expect[latent]
        assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    assert m.latent_space.U.weight.shape == (8 + 4 * 12, 12 * 768)  # grows with T (11,492,096 at T=64)


def test_mask_structure():
    n_g, S = 2, 3
    m = dgl.global_local_mask(n_g, T, S)  # [N, N], N = 2 + 3*3
    assert m.shape == (11, 11) and m[:n_g].all()  # global prompts see everything
    for t in range(T):  # a frame's tokens see the global prompts and their own frame only
        f = slice(n_g + t * S, n_g + (t + 1) * S)
        assert m[f, :n_g].all() and m[f, f].all() and m[f].sum() == (n_g + S) * S
    vm = torch.tensor([[True, True, True], [True, False, False]])
    mb = dgl.global_local_mask(n_g, T, S, vm)
    assert mb.shape == (2, 11, 11) and torch.equal(mb[0], m)
    assert mb[1, :n_g, :n_g + S].all() and not mb[1, :n_g, n_g + S:].any()  # padded frames hidden from G
    assert torch.equal(mb[1, n_g:], m[n_g:])  # frame rows unchanged
    assert torch.equal(dgl.global_local_mask(n_g, T, S, torch.ones(2, T, dtype=torch.bool)), m)


def test_one_masked_call_equals_the_releases_two_attention_calls():
    block = make_tiny_clip().visual.transformer.resblocks[0]
    n_g, S = 4, 5
    x = torch.randn(2, n_g + T * S, 64)
    ours = block.attention(x, dgl.global_local_mask(n_g, T, S))
    g_rows = block.attention(x)[:, :n_g]  # global queries vs [G; all frames]
    assert torch.allclose(ours[:, :n_g], g_rows, atol=1e-6)
    for t in range(T):  # frame-t queries vs [G; frame t]
        f = slice(n_g + t * S, n_g + (t + 1) * S)
        alone = block.attention(torch.cat([x[:, :n_g], x[:, f]], dim=1))[:, n_g:]
        assert torch.allclose(ours[:, f], alone, atol=1e-6)


def test_two_call_attention_equals_one_call_under_the_mask():
    block = make_tiny_clip().visual.transformer.resblocks[0]
    n_g, S = 4, 5
    h = torch.randn(2, n_g + T * S, 64, requires_grad=True)
    part = torch.tensor([[True] * T, [True] + [False] * (T - 1)])  # sample 1: only its first frame is real
    for vm in (None, part):
        ours = dgl.global_local_attention(block.attn, h, n_g, T, dgl.global_key_mask(vm, n_g, S))
        ref = block.attn(h, dgl.global_local_mask(n_g, T, S, vm))
        assert ours.shape == ref.shape and (ours - ref).abs().max() < 1e-5
        g1, g2 = torch.autograd.grad(ours.square().sum(), h)[0], torch.autograd.grad(ref.square().sum(), h)[0]
        assert (g1 - g2).abs().max() < 1e-4


def test_init_and_logit_scale():
    m = make("linear")
    a = math.sqrt(6 / (3 * 8 * 8 + 64))  # patch 8, width 64 (0.0395 for ViT-B/32)
    for p in (m.global_prompts, m.latent_space.V):
        assert p.abs().max() <= a and p.abs().max() > 0.8 * a
    u = make("transformer").latent_space.U.weight
    assert 0.9 < u.std() < 1.1  # nn.Embedding's N(0, 1)
    m.clip.logit_scale.data.fill_(5.0)
    assert math.isclose(m.logit_scale.exp().item(), 100.0, rel_tol=1e-5)  # clamped at ln 100 as main.py


def test_bad_input_errors():
    with pytest.raises(ValueError) as e:
        make("lstm")
    assert_tells(str(e.value), "latent", "'lstm'", "'linear'", "'transformer'")  # the argument, its value, choices
    with pytest.raises(ValueError) as e:
        make("linear", n_t=6)
    assert_tells(str(e.value), "n_t", "6", "2 * n_f = 8")  # the argument, its value, what it must be
    with pytest.raises(ValueError, match="num_frames=3"):
        make("transformer").encode_video(torch.randn(1, 4, 3, 32, 32), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token ids"):
        make("linear").encode_text(torch.randn(2, 10))
    with pytest.raises(ValueError, match="video_mask"):
        make("linear").encode_video(torch.randn(2, T, 3, 32, 32), torch.ones(2, 2, dtype=torch.bool))
    assert make("linear").encode_video(torch.randn(1, 5, 3, 32, 32), None).shape == (1, 32)  # any T
