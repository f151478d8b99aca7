"""DGL (dgl.py) inside CLIP's towers, on a tiny CLIP on the CPU: where the prompts sit in each tower's sequence,
which prompts get a gradient, the video mask, and each sample's embedding independent of the batch."""
import pytest
import torch

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
