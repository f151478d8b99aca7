"""Cross-Modal Adapter against the release: tests/fixtures/official_adapter.pt, made by tests/oracles/make_fixtures.py
from LeapLabTHU/Cross-Modal-Adapter (docs/equivalence.md), within the float32 bound of tests/equivalence.py."""
import os

import pytest
import torch

import clip
from adapter import BertAdam, CrossModalAdapter, adapted_blocks
from equivalence import FORWARD, GRADIENT, assert_close32, gradient_floor
from test_adapter import infonce


@pytest.mark.parametrize("variant", ["share", "noshare"])
def test_matches_official_release(variant):
    """tests/fixtures/official_adapter.pt (tests/oracles/make_fixtures.py): the release's CLIP4Clip with the
    adapter CLIP on a tiny config (widths 64, 2 layers, r=8, d_s 16 or 0, 4 frames, logit_scale ln 100), fp32:
    every adapter call, the embeddings, the q-score and mean-pooling logits, the training loss, the adapter
    gradients and three BertAdam steps (train.py's groups, warmup_cosine, clip_grad_norm_ 1.0)."""
    ref = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "official_adapter.pt"), weights_only=True)
    c, o = ref["config"], ref[variant]
    cfg = {k: c[k] for k in clip.CONFIGS["tiny"]}  # CLIP's constructor arguments
    i = ref["inputs"]
    ids, video, mask = i["text_ids"], i["video"].float(), i["video_mask"].bool()
    sd = {"clip." + k: v.float() for k, v in ref["state_dict"].items()} | {k: v.float() for k, v in o["state_dict"].items()}
    m = CrossModalAdapter(clip.CLIP(**cfg), c["num_frames"], r=c["r"], d_s=c["variants"][variant], tau=c["tau"]).eval()
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not missing and all("attn_mask" in k for k in unexpected), (missing, unexpected)
    calls = {"visual": [], "text": []}

    def traced(tower, x, blocks, is_causal=False):  # the adapted tower, each adapter call's input and output kept
        def adapt(h, j):  # the release's adapter returns h + u, seq-first
            u = m.adapt(h, tower, j)
            calls[tower].append((h.detach(), (h + u).detach()))
            return u
        return adapted_blocks(x, blocks, adapt, is_causal)
    with torch.no_grad():
        t, f = m.encode_text(ids), m.encode_video(video, mask)
        x = traced("text", m.clip.embed_text(ids), m.clip.transformer.resblocks, is_causal=True)
        assert torch.equal(m.clip.text_head(x[torch.arange(len(ids)), ids.argmax(-1)]), t)  # encode_text's path
        x = traced("visual", m.clip.visual.embed(video.flatten(0, 1)), m.clip.visual.transformer.resblocks)
        assert torch.equal(m.clip.visual.head(x[:, 0]).view(f.shape), f)  # encode_video's path
        logits = m.similarity(t, f, mask)
        m.pool = "mean"
        logits_mean = m.similarity(t, f, mask)
        m.pool = "qscore"
    out = o["outputs"]
    if "visual_in" in out:
        for tower in ("visual", "text"):
            for k, (h, y) in enumerate(calls[tower]):
                assert_close32(h, out[f"{tower}_in"][k].transpose(0, 1), FORWARD, f"{tower} in {k}")
                assert_close32(y, out[f"{tower}_out"][k].transpose(0, 1), FORWARD, f"{tower} out {k}")
        assert len(calls["visual"]) == len(out["visual_in"]) and len(calls["text"]) == len(out["text_in"])
    for ours, theirs in [(t, "text_embeds"), (f, "frame_embeds"), (logits, "logits"),
                         (logits_mean, "logits_meanP")]:  # |x| <= 3, |logit| <= 20
        assert_close32(ours, out[theirs], FORWARD, theirs)
    m.train()  # no dropout at p = 0: the training forward is the eval one
    loss = infonce(m.similarity(m.encode_text(ids), m.encode_video(video, mask), mask))
    assert_close32(loss, o["loss"], FORWARD, "loss")  # loss 4.8 and 6.2; chance ln 3
    loss.backward()
    trainable = dict((n, p) for n, p in m.named_parameters() if p.requires_grad)
    assert sorted(trainable) == sorted(o["grads"])
    for n, g in o["grads"].items():
        assert_close32(trainable[n].grad, g, GRADIENT, n, gradient_floor(o["grads"].values()))
    # three steps of the release's optimizer: lr from its warmup_cosine schedule, clip_grad_norm_(1.0) first
    decay, no_decay = m.param_groups(c["weight_decay"])
    opt = BertAdam([decay, no_decay], lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"])
    for k in range(3):
        opt.zero_grad()
        loss = infonce(m.similarity(m.encode_text(ids), m.encode_video(video, mask), mask))
        loss.backward()
        assert_close32(loss, o["optim"]["loss"][k], FORWARD, f"loss {k}")
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), c["max_grad_norm"])
        for group in opt.param_groups:
            group["lr"] = o["optim"]["lr"][k]
        opt.step()
        for n, p in trainable.items():
            assert_close32(p, o["optim"]["params"][k][n], GRADIENT, f"step {k} {n}")  # Adam carries the gradients' error
    assert o["optim"]["lr"][0] == 0 and o["optim"]["loss"][2] < o["optim"]["loss"][0]
