"""DGL (dgl.py): one test per paper component (docs/dgl.md), each failing when that component alone is broken.

Outputs are compared with the component written out, within the float32 bound of tests/equivalence.py."""
import pytest
import torch

import clip
import dgl
from conftest import make_tiny_clip
from equivalence import FORWARD, assert_close32

T, LATENTS = 3, ["linear", "transformer"]


def make(latent):
    torch.manual_seed(1)
    model = dgl.DGL(make_tiny_clip(), num_frames=T, latent=latent)
    with torch.no_grad():  # off the init, so that no path is trivially zero (biases start at 0)
        [p.add_(0.05 * torch.randn_like(p)) for p in model.parameters() if p.requires_grad]
    return model


def inputs():
    ids = clip.tokenize(["a red circle moves left", "a dog"], context_length=10)
    video = torch.randn(2, T, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return ids, video, torch.tensor([[True, True, True], [True, False, False]])


def test_shared_latent_block_generates_text_and_frame_prompts_together():
    """Transformer latent: the text rows and the frame rows of U pass through ONE block, attending to each other,
    so moving a frame row of U moves the text prompts, and the block's MLP moves both."""
    model = make("transformer")
    space, ids = model.latent_space, inputs()[0]
    with torch.no_grad():
        P_t, P_f = space()
        t = model.encode_text(ids)
        shift = torch.randn(space.U.weight.shape[1], generator=torch.Generator().manual_seed(3))
        space.U.weight[-1].add_(shift)  # the last frame prompt of frame T-1, every layer (not a constant: ln_1)
        P_t2, _ = space()
        assert (P_t2 - P_t).abs().max() > 1e-4, "shared latent space: the text prompts skip the shared block"
        assert (model.encode_text(ids) - t).abs().max() > 1e-4, "shared latent space: text ignores frame rows"
        space.U.weight[-1].sub_(shift)
        space.block.mlp.c_proj.bias.add_(0.5)
        P_t3, P_f3 = space()
    assert (P_t3 - P_t).abs().max() > 1e-4, "shared latent space: the text prompts skip the block's MLP"
    assert (P_f3 - P_f).abs().max() > 1e-4, "shared latent space: the frame prompts skip the block's MLP"


def test_shared_latent_block_written_out():
    model = make("transformer")
    space = model.latent_space
    L, W, n_t = space.layers, space.width, space.n_t
    with torch.no_grad():
        P_t, P_f = space()
        for l in range(L):  # layer l's tokens: the l-th W-slice of every row of U, one residual block
            Z = space.block(space.U.weight[:, l * W:(l + 1) * W][None])[0]  # [n_t + T n_f, W]
            mlp = space.text_mlp  # c_fc (W -> 2W), QuickGELU, c_proj (2W -> Wt)
            ref = mlp.c_proj(clip.QuickGELU()(mlp.c_fc(Z[:n_t])))
            assert_close32(P_t[l], ref, FORWARD, f"shared latent block + text MLP: text prompts, layer {l}")
            assert_close32(P_f[l], Z[n_t:].view(T, space.n_f, W), FORWARD, f"shared latent block: frame prompts {l}")


def test_linear_latent_layer_slices_and_projections():
    """Linear latent: layer l's n_f prompts are V[0, :, lW:(l+1)W], shared by every frame; text = [W_pre V ; W_post V]."""
    model = make("linear")
    space = model.latent_space
    W = space.width
    with torch.no_grad():
        P_t, P_f = space()
        for l in range(space.layers):
            V = space.V[0, :, l * W:(l + 1) * W]  # [n_f, W]
            assert torch.equal(P_f[l, 0], V), f"linear latent: layer {l}'s frame prompts are not V's slice {l}"
            ref = torch.cat([space.prefix_proj(V), space.postfix_proj(V)])
            assert_close32(P_t[l], ref, FORWARD, f"linear latent: text prompts of layer {l}")


@pytest.mark.parametrize("latent", LATENTS)
def test_text_tower_causal_words_after_eot_change_nothing(latent):
    """Text prompts under CLIP's causal mask over all L + n_t tokens: what follows EOT cannot reach it."""
    model, ids = make(latent), inputs()[0]
    junk = ids.clone()
    junk[ids == 0] = 1234
    with torch.no_grad():
        assert torch.equal(model.encode_text(junk), model.encode_text(ids)), "text tower: not causal"


@pytest.mark.parametrize("latent", LATENTS)
def test_local_prompts_of_every_layer_learn_from_the_video(latent):
    model, (_, video, mask) = make(latent), inputs()
    leaf = {}

    def leaf_frame_prompts(module, args, out):
        leaf["P_f"] = out[1].detach().requires_grad_(True)
        return out[0], leaf["P_f"]

    model.latent_space.register_forward_hook(leaf_frame_prompts)
    model.encode_video(video, mask).square().sum().backward()
    g = leaf["P_f"].grad  # [layers, 1 or T, n_f, W]
    for l in range(len(g)):
        assert (g[l].abs().sum(-1) > 0).all(), f"local prompts: layer {l} does not reach the video embedding"


@pytest.mark.parametrize("latent", LATENTS)
def test_global_local_video_tower_written_out(latent):
    """[G ; per frame CLS, local prompts, patches], local prompts replaced before every layer, each block under
    global_local_mask (padded frames hidden from the global prompts), embedding = ln_post(G_0) @ proj."""
    model, (_, video, mask) = make(latent), inputs()
    n_g, n_f, B = model.n_g, model.n_f, len(video)
    with torch.no_grad():
        _, P_f = model.latent_space()
        P_f = P_f.expand(-1, T, -1, -1)  # [layers, T, n_f, W]
        x = model.clip.visual.embed(video.flatten(0, 1)).view(B, T, 17, -1)  # [B, T, 1+16, W]
        W, S = x.shape[-1], 1 + n_f + 16
        frames = torch.cat([x[:, :, :1], P_f[0].expand(B, -1, -1, -1), x[:, :, 1:]], dim=2)  # [B, T, S, W]
        x = torch.cat([model.global_prompts.expand(B, -1, -1), frames.flatten(1, 2)], dim=1)
        gl = dgl.global_local_mask(n_g, T, S, mask)  # [B, N, N]
        for l, block in enumerate(model.clip.visual.transformer.resblocks):
            f = x[:, n_g:].view(B, T, S, W).clone()
            f[:, :, 1:1 + n_f] = P_f[l]
            x = torch.cat([x[:, :n_g], f.flatten(1, 2)], dim=1)
            x = x + block.attention(x, gl)
            x = x + block.feed_forward(x)
        ref = model.clip.visual.head(x[:, 0])
        assert_close32(model.encode_video(video, mask), ref, FORWARD, "global-local video tower")
