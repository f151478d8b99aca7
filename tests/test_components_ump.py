"""UMP (ump.py): one test per paper component (docs/ump.md), each failing when that component alone is broken.

The towers are written out from Fig. 3 with the plain nn.TransformerEncoderLayer call (no padding mask: each
caption is cut at its EOT) and compared with the model, within the float32 bound of tests/equivalence.py."""
import pytest
import torch
import torch.nn.functional as F

import clip
from conftest import make_tiny_clip
from equivalence import FORWARD, assert_close32
from ump import UMP, prompt_generator

T, R = 3, 32  # frames, TINY resolution (16 patches + CLS)


def make(seed=0, **kw):
    model = UMP(make_tiny_clip(seed), T, **{"K_d": 1, **kw})
    torch.manual_seed(seed + 1)
    for p in model.parameters():  # off the init, so that no path is trivially zero
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(n=2):
    g = torch.Generator().manual_seed(0)
    ids = clip.tokenize(["a red square moves left", "green"][:n], context_length=16)
    return ids, torch.randn(n, T, 3, R, R, generator=g), torch.ones(n, T, dtype=torch.bool)


def learns(p):
    return p.grad is not None and p.grad.abs().max() > 0


def upg(model, tokens, l):
    """UPG, Fig. 3a, as the release's full encoder layer: G([U ; S_l]) and its last Np rows."""
    seeds = model.prompts[l].expand(tokens.shape[0], -1, -1)  # [N, Np, Dt]
    return model.upg(torch.cat([tokens, seeds], dim=1))[:, -seeds.shape[1]:]


def text_written_out(model, ids):
    """Each caption alone, cut at EOT: G reads ln_1 of all its tokens (SOT..EOT), the prompts sit after SOT."""
    out = []
    for row in ids:
        e = int(row.argmax())
        w = model.clip.embed_text(row[None, :e + 1])  # [1, e+1, Dt]
        for l, block in enumerate(model.clip.transformer.resblocks):
            P = upg(model, block.ln_1(w), l)  # [1, Np, Dt]
            x = block(torch.cat([w[:, :1], P, w[:, 1:]], dim=1), is_causal=True)  # SOT, prompts, words
            w = torch.cat([x[:, :1], x[:, 1 + P.shape[1]:]], dim=1)  # prompt outputs dropped
        out.append(model.clip.text_head(w[0, e]))
    return torch.stack(out)


def shift_written_out(z, mask, n):
    """STS (Fig. 3b, deviation 6) frame by frame: z [B, T, n + Np, W] -> the attention input of an STS layer."""
    out, f, half = z.clone(), z.shape[-1] // 8, n + (z.shape[2] - n) // 2
    for b in range(z.shape[0]):
        for t in range(T):
            prev = z[b, t - 1] if t > 0 and mask[b, t - 1] else torch.zeros_like(z[b, t])  # padded frames send 0
            nxt = z[b, t + 1] if t < T - 1 and mask[b, t + 1] else torch.zeros_like(z[b, t])
            out[b, t, 1:n, :f], out[b, t, 1:n, f:2 * f] = prev[1:n, :f], nxt[1:n, f:2 * f]  # patches, 1/8 each way
            out[b, t, n:half], out[b, t, half:] = prev[n:half], nxt[half:]  # prompt halves, all channels; CLS stays
    return out


def frames_written_out(model, video, mask):
    """Video tower: each frame's prompts from its own tokens via Linear 768->512, G, 512->768, appended after the
    patches and dropped after the block; in the last K_d layers the attention reads the shifted tokens."""
    x = model.clip.visual.embed(video.flatten(0, 1))  # [BT, n, Dv]
    n, blocks = x.shape[1], model.clip.visual.transformer.resblocks
    for l, block in enumerate(blocks):
        z = torch.cat([x, model.video_out(upg(model, model.video_in(block.ln_1(x)), l))], dim=1)  # [BT, n+Np, Dv]
        zs = shift_written_out(z.view(len(video), T, *z.shape[1:]), mask, n).flatten(0, 1) \
            if l >= len(blocks) - model.K_d else z
        z = z + block.attention(zs)  # residual: only the attention input is shifted
        x = (z + block.feed_forward(z))[:, :n]
    return model.clip.visual.head(x[:, 0]).view(video.shape[0], T, -1)


def test_upg_generator_is_the_releases_encoder_layer():
    G = prompt_generator(64, 128)
    assert isinstance(G, torch.nn.TransformerEncoderLayer), "UPG generator G: nn.TransformerEncoderLayer"
    assert (G.self_attn.num_heads, G.linear1.out_features, G.norm_first) == (8, 128, False), "UPG generator G"
    assert G.activation is F.relu and G.dropout.p == 0.1 and G.self_attn.batch_first, "UPG generator G"


def test_upg_text_tower_written_out():
    """UPG reads the caption through EOT with the seeds as keys; prompts after SOT; EOT read Np slots later."""
    model, (ids, _, _) = make(), inputs()
    with torch.no_grad():
        assert_close32(model.encode_text(ids), text_written_out(model, ids), FORWARD, "text tower with UPG (Fig. 3)")


@pytest.mark.parametrize("K_d", [0, 1])
def test_upg_and_sts_video_tower_written_out(K_d):
    """UPG per frame (K_d = 0), and STS in the last layer with a padded frame (K_d = 1)."""
    model, (_, video, mask) = make(K_d=K_d), inputs()
    mask[1, 2] = False
    with torch.no_grad():
        assert_close32(model.encode_frames(video, mask), frames_written_out(model, video, mask), FORWARD,
                       f"video tower with UPG{' and STS' if K_d else ''} (Fig. 3, K_d = {K_d})")


def test_shared_upg_one_seed_set_learns_from_both_towers():
    """Deviation 3: one G and one seed set S_l serve both towers, so each tower alone trains both."""
    model, (ids, video, mask) = make(), inputs()
    for name, encode in (("text", lambda: model.encode_text(ids)), ("video", lambda: model.encode_video(video, mask))):
        model.zero_grad(set_to_none=True)
        encode().square().sum().backward()
        assert model.prompts.grad is not None, f"shared UPG: the {name} tower does not train the seeds"
        for l in range(len(model.prompts)):  # every layer's seeds hear this tower
            assert model.prompts.grad[l].abs().max() > 0, f"shared UPG: the {name} tower does not train S_{l}"
        assert all(map(learns, model.upg.parameters())), f"shared UPG: the {name} tower does not train G"


def test_upg_without_condition_still_trains_generator_and_seeds():
    """upg_condition=False (the "w/o V in UPG" ablation): G sees only its seeds, and still learns."""
    model, (ids, video, mask) = make(upg_condition=False), inputs()
    (model.encode_text(ids).square().sum() + model.encode_video(video, mask).square().sum()).backward()
    assert learns(model.prompts), "UPG w/o condition: the seeds get no gradient"
    assert all(map(learns, model.upg.parameters())), "UPG w/o condition: G gets no gradient"


def test_seeds_are_standard_normal():
    """S_l ~ N(0, 1) as the release's randn: over 2 x 8 x 64 draws the sample std is 1 +- 0.022 and the mean
    0 +- 0.031 (one sigma); the bounds are 5 sigma (the mutant's 0.02 x randn is 44 sigma off)."""
    prompts = UMP(make_tiny_clip(), T, K_d=1).prompts
    assert abs(prompts.std().item() - 1) < 0.11 and abs(prompts.mean().item()) < 0.16, "seeds S_l: N(0, 1) init"


def test_sts_runs_in_the_last_k_d_video_layers_only():
    """K_d = 1 of 2 layers: the first block sees what it sees without STS; the last block's attention input differs."""
    _, video, mask = inputs()
    seen = {}
    for K_d in (0, 1):
        model = make(K_d=K_d)
        blocks = model.clip.visual.transformer.resblocks
        hooks = [b.ln_1.register_forward_hook(lambda m, i, o, k=(K_d, j): seen.setdefault(k, []).append(i[0]))
                 for j, b in enumerate(blocks)]
        with torch.no_grad():
            model.encode_frames(video, mask)
        [h.remove() for h in hooks]
    # ln_1 runs on G's input, then on the attention input: the last call of each block is the attention's
    assert torch.equal(seen[0, 0][-1], seen[1, 0][-1]), "STS: the first video layer is shifted with K_d = 1"
    assert not torch.equal(seen[0, 1][-1], seen[1, 1][-1]), "STS: the last video layer is not shifted"


@pytest.mark.parametrize("K_d", [0, 1])
def test_mean_pooling_of_normalised_valid_frames(K_d):
    model, (_, video, mask) = make(K_d=K_d), inputs()
    mask[1, 1:] = False
    with torch.no_grad():
        v, frames = model.encode_video(video, mask), F.normalize(model.encode_frames(video, mask), dim=-1)
    ref = torch.stack([frames[0].mean(0), frames[1, 0]])
    assert_close32(v, ref, FORWARD, "mean pooling over the valid frames")
