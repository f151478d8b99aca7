"""DGL (dgl.py) against the official modules (spec §6 item 13): run ../shared/oracles/dgl_oracle.py (its
docstring says how), then DGL_REF=/path/to/dgl_ref.pt pytest tests/test_dgl_oracle.py. Skipped otherwise."""
import os

import pytest
import torch
import torch.nn.functional as F

import clip
import dgl

REF = os.environ.get("DGL_REF")
pytestmark = pytest.mark.skipif(not REF, reason="set DGL_REF to dgl_oracle.py's output file")


def official_name(name):
    for official, ours in dgl.OFFICIAL_NAMES.items():
        if name.startswith(ours):
            return official + name[len(ours):]
    return name


@pytest.mark.parametrize("latent", ["linear", "transformer"])
def test_matches_official_modules(latent):
    r = torch.load(REF, weights_only=False)
    c, ref = r["config"], r[latent]
    text, video = r["inputs"]["text"], r["inputs"]["video"]
    model = dgl.DGL(clip.CLIP(c["embed_dim"], c["image_resolution"], c["layers"], c["vision_width"], c["patch"],
                              c["context_length"], c["vocab_size"], c["text_width"], c["text_heads"], c["layers"]),
                    num_frames=c["frames"], latent=latent).eval()
    assert model.load_official_state_dict(ref["state_dict"]) == []  # every tensor loaded
    assert sorted(official_name(n) for n, p in model.named_parameters() if p.requires_grad) == sorted(ref["trainable"])
    P_t, P_f = model.latent_space()
    assert torch.allclose(P_t, ref["text_prompts"][:, 0], atol=1e-6)  # the B copies are identical
    assert torch.allclose(P_f.flatten(1, 2), ref["visual_prompts"][:, 0], atol=1e-6)
    t = model.encode_text(text)
    v = model.encode_video(video, torch.ones(video.shape[:2], dtype=torch.bool))
    logits = model.logit_scale.exp() * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).t()
    labels = torch.arange(len(t))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2  # CrossEn both ways
    loss.backward()
    for ours, theirs in [(t, ref["text_embeds"]), (v, ref["video_embeds"]), (logits, ref["logits"]),
                         (loss, ref["loss"])]:
        assert (ours.detach() - theirs).abs().max() <= 1e-5
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = ref["grads"][official_name(n)]
            assert (p.grad - g).abs().max() <= 1e-4 * g.abs().max().clamp(min=1e-8), n
            if "postfix" in n:
                assert not p.grad.any() and not g.any()  # dead in both
