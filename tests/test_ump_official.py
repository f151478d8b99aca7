"""UMP's exact-code mode (official_code=True, spec §4): the release's forward pass, and the oracle."""
import os

import pytest
import torch
import torch.nn.functional as F

import clip
from conftest import make_tiny_clip
from ump import UMP, official_prompts

T, R = 4, 32


def make_official(seed=0):
    model = UMP(make_tiny_clip(seed), T, official_code=True)
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
        big = UMP(clip.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12), 12, official_code=True)
    video_part = sum(p.numel() for n, p in big.named_parameters() if n.split(".")[0] in ("upg_video", "prompts_video"))
    assert video_part == 5_587_712  # spec §5: TEL768 + video seeds; the text part is inert
    assert sum(p.numel() for p in big.parameters() if p.requires_grad) == 5_587_712 + 3_152_384 + 49_152


def test_text_is_frozen_clip_unless_eot_in_the_tail():
    model = make_official()
    short = clip.tokenize(["a red square moves left", "green"], context_length=16)  # EOT < 16 - 8
    long = clip.tokenize(["a red square moves left then right and up and down"], context_length=16)  # EOT >= 8
    with torch.no_grad():
        assert torch.equal(model.encode_text(short), model.clip.encode_text(short))
        assert (model.encode_text(long) - model.clip.encode_text(long)).abs().max() > 1e-3  # the release's bug
    model.train()
    F.normalize(model.encode_text(short), dim=-1).sum().backward()
    assert model.prompts.grad.abs().max() == 0  # EOT never sees the text prompts (spec §2, quirk 2)


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
        P = model._video_prompts(torch.randn(3, 17, 64), block, 0)
        P_other = model._video_prompts(torch.randn(3, 17, 64), block, 0)
        P_tokenwise = torch.stack([model.upg_video(s.view(1, 1, -1))[0, 0] for s in model.prompts_video[0]])
    assert torch.equal(P, P_other) and torch.allclose(P[1], P_tokenwise, atol=1e-6)
    assert torch.allclose(alone[0, 0], frames[0, 0], atol=1e-5)
    assert torch.allclose(pooled, F.normalize(frames, dim=-1).mean(1), atol=1e-6)


@pytest.mark.skipif(not os.environ.get("UMP_REF"), reason="set UMP_REF to ump_oracle.py's output")
def test_matches_official_oracle():
    ref = torch.load(os.environ["UMP_REF"], weights_only=False)
    c, sd = ref["config"], ref["state_dict"]
    keys = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
            "context_length", "vocab_size", "transformer_width", "transformer_heads", "transformer_layers")
    model = UMP(clip.CLIP(**{k: c[k] for k in keys}), c["num_frames"], official_code=True).eval()
    ours = {}
    for k, v in sd.items():  # the release's names -> ours (spec §8 weight map)
        if k.startswith("pool_frames.") or ".encoder_layer." in k or ".learnable_prompt" in k:
            continue
        if ".prompt_encoder.layers.0." in k:
            ours[("upg_video." if k.startswith("clip.visual.") else "upg.") + k.split("layers.0.")[1]] = v
        else:
            ours[k] = v
    Lt, Lv = c["transformer_layers"], c["vision_layers"]
    ours["prompts"] = torch.cat([sd[f"clip.transformer.learnable_prompt.{l}"] for l in range(Lt)])
    ours["prompts_video"] = torch.cat([sd[f"clip.visual.transformer.learnable_prompt_video.{l}"] for l in range(Lv)])
    model.load_state_dict(ours, strict=True)
    inp, out = ref["inputs"], ref["outputs"]
    mask = torch.ones(inp["video"].shape[:2], dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(model.encode_frames(inp["video"], mask), out["frame_embeds"], atol=1e-5)
        assert torch.allclose(model.encode_video(inp["video"], mask), out["mean_pooled"], atol=1e-5)
        assert torch.allclose(model.encode_text(inp["text"]), out["text_embeds"], atol=1e-5)
        assert torch.allclose(model.encode_text(inp["text_long"]), out["text_long_embeds"], atol=1e-5)
        P = torch.stack([official_prompts(model.upg_video, model.prompts_video[l])[0] for l in range(Lv)])
        assert torch.allclose(P, out["video_prompts"], atol=1e-5)
