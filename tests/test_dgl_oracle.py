"""DGL (dgl.py) against the official modules, with both shared latent spaces.

tests/fixtures/official_dgl.pt (made by tests/oracles/make_fixtures.py) holds knightyxp/DGL's modules/clip.py
CLIP run in eval mode on a tiny config (vision width 64, 2 layers per tower, 3 frames, 8 words, 3 pairs,
logit_scale ln 100): the shared frozen CLIP, each latent space's prompt tensors, the generated prompts, the
embeddings, the logits, the symmetric CrossEn loss and the gradient of every trainable tensor.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import clip
import dgl
from equivalence import FORWARD, GRADIENT, assert_close32, gradient_floor

REF = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "official_dgl.pt"), weights_only=True)


def official_name(name):
    for official, ours in dgl.OFFICIAL_NAMES.items():
        if name.startswith(ours):
            return official + name[len(ours):]
    return name


@pytest.mark.parametrize("latent", ["linear", "transformer"])
def test_matches_official_modules(latent):
    c, ref = REF["config"], REF[latent]
    text, video, out = REF["inputs"]["text"], REF["inputs"]["video"].float(), ref["outputs"]
    model = dgl.DGL(clip.CLIP(**{k: c[k] for k in clip.CONFIGS["tiny"]}), num_frames=c["num_frames"], latent=latent).eval()
    sd = {k: v.float() if v.is_floating_point() else v for k, v in {**REF["state_dict"], **ref["state_dict"]}.items()}
    assert dgl.load_official_state_dict(model, sd) == []  # every tensor loaded
    assert sorted(official_name(n) for n, p in model.named_parameters() if p.requires_grad) == sorted(ref["trainable"])
    assert abs(model.logit_scale.exp().item() - 100) < 1e-3  # ln 100: the loss is far from chance (ln 3)
    P_t, P_f = model.latent_space()
    t = model.encode_text(text)
    v = model.encode_video(video, torch.ones(video.shape[:2], dtype=torch.bool))
    logits = model.logit_scale.exp() * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).t()
    labels = torch.arange(len(t))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2  # CrossEn both ways
    loss.backward()
    for ours, theirs in [(P_t, "text_prompts"), (P_f.flatten(1, 2), "visual_prompts"), (t, "text_embeds"),
                         (v, "video_embeds"), (logits, "logits")]:  # |x| <= 2.6, |logit| <= 27
        assert_close32(ours, out[theirs], FORWARD, theirs)
    assert_close32(loss, ref["loss"], FORWARD, "loss")  # loss 5.6 and 13.2; chance ln 3
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = ref["grads"][official_name(n)]
            assert_close32(p.grad, g, GRADIENT, n, gradient_floor(ref["grads"].values()))
            if "postfix" in n:
                assert not p.grad.any() and not g.any()  # dead in both: the postfix slots follow every EOT
