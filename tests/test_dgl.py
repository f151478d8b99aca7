"""DGL (dgl.py): the release's behaviour, one property per test, on a tiny CLIP on the CPU."""
import math

import pytest
import torch

import clip
import dgl
from conftest import make_tiny_clip

SOT, EOT, T = 49406, 49407, 3  # T frames
LATENTS = ["linear", "transformer"]


def ids(*lengths, L=10):
    """Captions of `lengths` words: SOT, words, EOT, zero padding -> [B, L] long."""
    out = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0], out[i, 1:n + 1], out[i, n + 1] = SOT, torch.arange(5 + i, 5 + i + n), EOT
    return out


def video(B=2, seed=2):
    return torch.randn(B, T, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def make(latent, **kw):
    torch.manual_seed(1)
    return dgl.DGL(make_tiny_clip(), num_frames=T, latent=latent, **kw)


def capture(module, inputs=True):
    """Record a module's first positional input (or its output) on every call."""
    seen = []
    hook = (lambda m, args: seen.append(args[0].detach().clone())) if inputs else \
        (lambda m, args, out: seen.append(out.detach().clone()))
    (module.register_forward_pre_hook if inputs else module.register_forward_hook)(hook)
    return seen


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


@pytest.mark.parametrize("latent", LATENTS)
def test_text_layout_and_eot(latent):
    model = make(latent)
    text = ids(2, 7)  # EOT at 3 and 8
    blocks = model.clip.transformer.resblocks
    ins0, ins1, out_last = capture(blocks[0]), capture(blocks[1]), capture(blocks[-1], inputs=False)
    t = model.encode_text(text)
    P_t = model.latent_space()[0].detach()  # [layers, 8, Wt]
    emb = model.clip.embed_text(text).detach()  # [B, 10, Wt]
    x0, x1 = ins0[0], ins1[0]
    assert x0.shape == (2, 10 + 8, 64)  # SOT, 4 prefix, 9 word slots, 4 postfix
    assert torch.equal(x0[:, 0], emb[:, 0])
    assert torch.equal(x0[:, 1:5], P_t[0, :4].expand(2, -1, -1))  # prompts carry no position embedding
    assert torch.equal(x0[:, 5:14], emb[:, 1:])
    assert torch.equal(x0[:, 14:], P_t[0, 4:].expand(2, -1, -1))
    assert torch.equal(x1[:, 1:5], P_t[1, :4].expand(2, -1, -1))  # replaced before layer 1
    assert torch.equal(x1[:, 14:], P_t[1, 4:].expand(2, -1, -1))
    assert not torch.equal(x1[:, 5:14], x0[:, 5:14])  # words carried from block 0
    eot = torch.tensor([3, 8]) + 4
    assert torch.allclose(t, model.clip.text_head(out_last[0][torch.arange(2), eot]), atol=1e-6)


@pytest.mark.parametrize("latent", LATENTS)
def test_postfix_prompts_get_exactly_zero_gradient(latent):
    model, leaf = make(latent), {}

    def detach_text_prompts(module, args, out):
        leaf["P_t"] = out[0].detach().requires_grad_(True)
        return leaf["P_t"], out[1]

    model.latent_space.register_forward_hook(detach_text_prompts)
    model.encode_text(ids(2, 7, 8)).pow(2).sum().backward()
    g = leaf["P_t"].grad  # [layers, 8, Wt]
    assert torch.equal(g[:, 4:], torch.zeros_like(g[:, 4:]))  # postfix: after every EOT, causal mask
    assert (g[:, :4].abs().sum(-1) > 0).all()  # every prefix prompt of every layer is used
    if latent == "linear":
        model = make(latent)
        model.encode_text(ids(2, 7, 8)).pow(2).sum().backward()
        assert torch.equal(model.latent_space.postfix_proj.weight.grad, torch.zeros(64, 64))


@pytest.mark.parametrize("latent", LATENTS)
def test_video_layout_global_once_local_every_layer(latent):
    model = make(latent)
    blocks = model.clip.visual.transformer.resblocks
    # the vision tower calls block.attention / feed_forward: tap ln_1's input and the last residual sum
    ins0, ins1 = capture(blocks[0].ln_1), capture(blocks[1].ln_1)
    mid_last, mlp_last = capture(blocks[-1].ln_2), capture(blocks[-1].mlp, inputs=False)
    v = video()
    out = model.encode_video(v, torch.ones(2, T, dtype=torch.bool))
    P_f = model.latent_space()[1].detach().expand(-1, T, -1, -1)  # [layers, T, 4, 64]
    embed = model.clip.visual.embed(v.flatten(0, 1)).detach().view(2, T, 17, 64)
    S = 1 + 4 + 16  # CLS, 4 local prompts, 4x4 patches
    x0 = ins0[0].view(2, 4 + T * S, 64)
    f0, f1 = x0[:, 4:].view(2, T, S, 64), ins1[0][:, 4:].view(2, T, S, 64)
    assert torch.equal(x0[:, :4], model.global_prompts.detach().expand(2, -1, -1))
    assert torch.equal(f0[:, :, 0], embed[:, :, 0]) and torch.equal(f0[:, :, 5:], embed[:, :, 1:])
    assert torch.equal(f0[:, :, 1:5], P_f[0].expand(2, -1, -1, -1))  # after ln_pre, no position embedding
    assert torch.equal(f1[:, :, 1:5], P_f[1].expand(2, -1, -1, -1))  # local prompts replaced
    assert not torch.equal(ins1[0][:, :4], x0[:, :4])  # global prompts carried, not re-inserted
    if latent == "transformer":
        assert not torch.equal(P_f[0, 0], P_f[0, 1])  # frame t has its own rows of U
    last = mid_last[0] + mlp_last[0]  # [B, 4 + T*S, 64] after the last block
    assert torch.allclose(out, model.clip.visual.head(last[:, 0]), atol=1e-6)  # global prompt 0


@pytest.mark.parametrize("latent", LATENTS)
def test_video_mask(latent):
    model, v, full = make(latent), video(), torch.ones(2, T, dtype=torch.bool)
    with torch.no_grad():
        base = model.encode_video(v, full)
        assert torch.equal(model.encode_video(v, None), base)  # all valid: the release's unmasked attention
        part = torch.tensor([[True, True, True], [True, True, False]])
        masked = model.encode_video(v, part)
        assert torch.equal(masked[0], base[0]) and not torch.allclose(masked[1], base[1])
        v2 = v.clone()
        v2[1, 2] = torch.randn(3, 32, 32)  # a padded frame's pixels have no effect
        assert torch.allclose(model.encode_video(v2, part), masked, atol=1e-6)


@pytest.mark.parametrize("latent", LATENTS)
def test_towers_independent_of_the_batch(latent):
    model, text, v, full = make(latent), ids(2, 7, 4), video(3), torch.ones(3, T, dtype=torch.bool)
    with torch.no_grad():
        t3, t1 = model.encode_text(text), model.encode_text(text[1:2])
        assert torch.allclose(t3[1], t1[0], atol=1e-6)
        v3 = model.encode_video(v, full)
        v_other = v.clone()
        v_other[1:] = torch.randn_like(v_other[1:])
        assert torch.allclose(model.encode_video(v_other, full)[0], v3[0], atol=1e-6)
        assert torch.allclose(model.encode_video(v[:1], full[:1])[0], v3[0], atol=1e-6)


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
    with pytest.raises(ValueError, match="latent must be"):
        make("lstm")
    with pytest.raises(ValueError, match="n_t must be 2"):
        make("linear", n_t=6)
    with pytest.raises(ValueError, match="num_frames=3"):
        make("transformer").encode_video(torch.randn(1, 4, 3, 32, 32), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token ids"):
        make("linear").encode_text(torch.randn(2, 10))
    with pytest.raises(ValueError, match="video_mask"):
        make("linear").encode_video(video(), torch.ones(2, 2, dtype=torch.bool))
    assert make("linear").encode_video(torch.randn(1, 5, 3, 32, 32), None).shape == (1, 32)  # any T
