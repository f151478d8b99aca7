"""UMPRelease: the release's forward pass (ump.py, "Reproducing the release"), and the oracle."""
import os

import pytest
import torch
import torch.nn.functional as F

import clip
from conftest import make_tiny_clip
from equivalence import FORWARD, GRADIENT, assert_close32, gradient_floor
from ump import UMPRelease, official_prompts

T, R = 4, 32


def make_official(seed=0, **clip_overrides):
    model = UMPRelease(make_tiny_clip(seed, **clip_overrides), T)
    torch.manual_seed(seed + 1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_layout_and_vitb32_count():
    model = make_official()
    names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"upg", "prompts", "upg_video", "prompts_video"}  # one G and seed set per tower
    assert model.prompts.shape == (2, 8, 64) and model.prompts_video.shape == (2, 8, 64)
    with torch.device("meta"):
        big = UMPRelease(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), 12)
    video_part = sum(p.numel() for n, p in big.named_parameters() if n.split(".")[0] in ("upg_video", "prompts_video"))
    assert video_part == 5_587_712  # the release's count: TEL768 + video seeds; the text part is inert
    assert clip.count_trainable(big) == 5_587_712 + 3_152_384 + 49_152


def test_text_is_frozen_clip_unless_eot_in_the_tail():
    model = make_official(context_length=16)  # a 16-slot CLIP: the prompts take slots 8..15
    short = clip.tokenize(["a red square moves left", "green"], context_length=16)  # EOT < 16 - 8
    long = clip.tokenize(["a red square moves left then right and up and down"], context_length=16)  # EOT >= 8
    with torch.no_grad():
        assert torch.equal(model.encode_text(short), model.clip.encode_text(short))
        assert (model.encode_text(long) - model.clip.encode_text(long)).abs().max() > 1e-3  # the release's bug
        wide = make_official()  # CLIP's 77 slots: 16-token ids are zero-padded to 77, as the release tokenises
        assert torch.equal(wide.encode_text(long), wide.encode_text(F.pad(long, (0, 77 - 16))))
        assert torch.equal(wide.encode_text(long), wide.clip.encode_text(long))  # EOT 12 < 77 - 8
    with pytest.raises(ValueError, match="no room for 8 tail prompts"):
        make_official(context_length=8)
    model.train()
    F.normalize(model.encode_text(short), dim=-1).sum().backward()
    assert model.prompts.grad.abs().max() == 0  # EOT never sees the text prompts (the release's tail slots)


def test_video_prompts_static_and_shapes():
    model = make_official()
    video, mask = torch.randn(2, T, 3, R, R), torch.ones(2, T, dtype=torch.bool)
    seen = []
    block = model.clip.visual.transformer.resblocks[0]
    h = block.ln_2.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        frames = model.encode_frames(video, mask)
        alone = model.encode_frames(video[:1, :1], mask[:1, :1])  # one frame: no STS, no input-dependence
        pooled = model.encode_video(video, mask)
    h.remove()
    assert seen[0].shape == (2 * T, 17 + 8, 64) and frames.shape == (2, T, 32)
    with torch.no_grad():  # the release's prompts ignore the frames: G applied to each seed token alone
        P = model.video_prompts(torch.randn(3, 17, 64), block, 0)
        P_other = model.video_prompts(torch.randn(3, 17, 64), block, 0)
        P_tokenwise = torch.stack([model.upg_video(s.view(1, 1, -1))[0, 0] for s in model.prompts_video[0]])
    assert torch.equal(P, P_other) and torch.allclose(P[1], P_tokenwise, atol=1e-6)
    assert torch.allclose(alone[0, 0], frames[0, 0], atol=1e-5)
    assert torch.allclose(pooled, F.normalize(frames, dim=-1).mean(1), atol=1e-6)


def from_official(sd, Lt, Lv):
    """The release's names -> ours: G_t/G_v are each tower's prompt_encoder.layers.0, the
    seeds the per-layer learnable_prompt(_video) [1, 8, W] stacked."""
    ours = {}
    for k, v in sd.items():
        if ".prompt_encoder.layers.0." in k:
            ours[("upg_video." if k.startswith("visual.") else "upg.") + k.split("layers.0.")[1]] = v.float()
        elif ".learnable_prompt" not in k:
            ours["clip." + k] = v.float()
    ours["prompts"] = torch.cat([sd[f"transformer.learnable_prompt.{l}"] for l in range(Lt)]).float()
    ours["prompts_video"] = torch.cat([sd[f"visual.transformer.learnable_prompt_video.{l}"] for l in range(Lv)]).float()
    return ours


def to_official(name):
    if name.startswith("upg"):
        tower = "visual.transformer" if name.startswith("upg_video.") else "transformer"
        return f"{tower}.prompt_encoder.layers.0.{name.split('.', 1)[1]}"
    return name


def test_matches_official_release():
    """tests/fixtures/official_ump.pt (tests/oracles/make_fixtures.py): zchoi/UMP_TVR's CLIP with prompts inside
    its CLIPBaseline (mean pooling), eval mode, generators at FFN 128, logit_scale ln 100; the third caption's EOT
    sits in the last 8 slots, so the text prompts reach the loss too."""
    ref = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "official_ump.pt"), weights_only=True)
    c = ref["config"]
    Lt, Lv = c["transformer_layers"], c["vision_layers"]
    model = UMPRelease(clip.CLIP(**{k: c[k] for k in clip.CONFIGS["tiny"]}), c["num_frames"], d_ff=c["d_ff"]).eval()
    model.load_state_dict(from_official(ref["state_dict"], Lt, Lv), strict=True)
    text, video, out = ref["inputs"]["text"], ref["inputs"]["video"].float(), ref["outputs"]
    mask = torch.ones(video.shape[:2], dtype=torch.bool)
    t, frames, v = model.encode_text(text), model.encode_frames(video, mask), model.encode_video(video, mask)
    logits = model.logit_scale.exp() * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).t()
    with torch.no_grad():
        P_t = torch.stack([official_prompts(model.upg, model.prompts[l])[0] for l in range(Lt)])
        P_v = torch.stack([official_prompts(model.upg_video, model.prompts_video[l])[0] for l in range(Lv)])
    for ours, theirs in [(t, "text_embeds"), (frames, "frame_embeds"), (P_t, "text_prompts"),
                         (P_v, "video_prompts"), (F.normalize(t, dim=-1), "text_pooled"), (v, "video_pooled"),
                         (logits, "logits")]:  # |x| <= 2.8, |logit| <= 27
        assert_close32(ours, out[theirs], FORWARD, theirs)
    labels = torch.arange(len(logits))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2  # the release's CLIPLoss
    assert_close32(loss, ref["loss"], FORWARD, "loss")  # loss 10.8, chance ln 3 = 1.1
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            if n in ("prompts", "prompts_video"):
                tower = "visual.transformer.learnable_prompt_video" if n == "prompts_video" else "transformer.learnable_prompt"
                g = torch.cat([ref["grads"][f"{tower}.{l}"] for l in range(p.shape[0])])
            else:
                g = ref["grads"][to_official(n)]
            assert_close32(p.grad, g, GRADIENT, n, gradient_floor(ref["grads"].values()))
    assert ref["grads"]["transformer.learnable_prompt.1"].abs().max() > 1e-3  # the text prompts do get a gradient
