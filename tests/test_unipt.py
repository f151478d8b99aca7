"""UniPT (unipt.py): the release's behaviour, one property per test, on a tiny CLIP on the CPU, and the release's
outputs (tests/fixtures/official_unipt.pt). Padding, autocast and bad input: test_unipt_inputs.py."""
import os

import pytest
import torch
import torch.nn.functional as F

import clip
import unipt
from conftest import make_tiny_clip
from equivalence import FORWARD, GRADIENT, assert_close32, gradient_floor

SOT, EOT = 49406, 49407


def ids(*lengths, L=10, fill=5):
    """Captions of `lengths` words: SOT, words, EOT, zero padding -> [B, L] long."""
    out = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0], out[i, 1:n + 1], out[i, n + 1] = SOT, torch.arange(fill, fill + n), EOT
    return out


@pytest.fixture
def model():
    torch.manual_seed(1)
    return unipt.UniPT(make_tiny_clip(), num_frames=3)


def video(B=2, T=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, 32, 32, generator=g)


def test_shapes_and_taps(model):
    text, v = ids(3, 6), video()
    assert model.encode_text(text).shape == (2, 32)
    assert model.encode_frames(v).shape == (2, 3, 32)
    assert model.encode_video(v, torch.ones(2, 3, dtype=torch.bool)).shape == (2, 32)
    anchor, taps = unipt.frozen_text_taps(model.clip, text)
    assert anchor.shape == (2, 32) and taps.shape == (3, 2, 10, 64)  # 2 blocks + embedding stage
    anchor, taps = unipt.frozen_image_taps(model.clip, v.flatten(0, 1))
    assert anchor.shape == (6, 32) and taps.shape == (3, 6, 17, 64)  # CLS + 4x4 patches


def test_vitb32_trainable_count():
    with torch.device("meta"):  # counts only: no memory, no init cost
        m = unipt.UniPT(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), num_frames=12)
    count = clip.count_trainable
    assert (count(m), count(m.image_adapter), count(m.text_adapter)) == (9_584_642, 5_644_289, 3_940_353)
    assert all(not p.requires_grad for p in m.clip.parameters())
    assert not m.logit_scale.requires_grad
    groups = m.param_groups(0.2)
    assert sum(p.numel() for g in groups for p in g["params"]) == 9_584_642
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]


def test_anchor_is_clips_embedding_and_no_graph_through_clip(model):
    text, v = ids(3, 6), video()
    frames = v.flatten(0, 1)
    ta, th = unipt.frozen_text_taps(model.clip, text)
    va, vh = unipt.frozen_image_taps(model.clip, frames)
    assert torch.equal(ta, model.clip.encode_text(text)) and torch.equal(va, model.clip.encode_image(frames))
    model.clip.requires_grad_(True)  # even a trainable CLIP builds no graph: the towers run under no_grad
    for t in (*unipt.frozen_text_taps(model.clip, text), *unipt.frozen_image_taps(model.clip, frames)):
        assert not t.requires_grad and t.grad_fn is None and not t.is_inference()
    model.clip.requires_grad_(False)
    loss = model.encode_text(text).sum() + model.encode_video(v, torch.ones(2, 3, dtype=torch.bool)).sum()
    loss.backward()
    assert all(p.grad is None for p in model.clip.parameters())
    # checklist 13: every side parameter learns from step one, except the gate bias (a softmax shift)
    for name, p in model.named_parameters():
        if p.requires_grad and name.endswith("gate_layer.bias"):
            assert p.grad.abs().max() < 1e-5, name
        elif p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, name


def test_gate_softmax_over_layers(model):
    anchor, taps = unipt.frozen_text_taps(model.clip, ids(3, 6))
    mask, eot = model.text_mask(ids(3, 6))
    _, c = model.text_adapter(taps, anchor, mask, eot)
    assert c.shape == (2, 3) and torch.allclose(c.sum(1), torch.ones(2)) and (c > 0).all()


def test_residual_on_frozen_embedding(model):
    text, v = ids(3, 6), video()
    # default init is not the identity: the side output moves the embedding
    assert not torch.allclose(model.encode_text(text), model.clip.encode_text(text), atol=1e-4)
    with torch.no_grad():
        for side in (model.text_adapter, model.image_adapter):
            side.upsample_layer[1].weight.zero_(), side.upsample_layer[1].bias.zero_()
    assert torch.equal(model.encode_text(text), model.clip.encode_text(text))
    assert torch.equal(model.encode_frames(v).flatten(0, 1), model.clip.encode_image(v.flatten(0, 1)))


def test_l1_weights_no_softmax():
    torch.manual_seed(0)
    net = unipt.ParallelSideNetwork(num_taps=2, width=8, embed_dim=4)
    taps, anchor = torch.zeros(2, 1, 3, 8), torch.randn(1, 4)
    taps[:, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0])  # token s carries s + 1 in feature 0
    with torch.no_grad():
        for p in net.downsample_layers:  # X_l,s = (s + 1) * ones(4)
            p[1].weight.zero_(), p[1].weight[:, 0].fill_(1.0), p[1].bias.zero_()
        net.downsample_layer[1].weight.zero_(), net.downsample_layer[1].bias.fill_(1.0)  # q = ones(4)
        net.upsample_layer[1].weight.copy_(torch.eye(4)), net.upsample_layer[1].bias.zero_()
    out, _ = net(taps, anchor)
    # logits 4, 8, 12 -> alpha = 1/6, 2/6, 3/6 by L1 (softmax would put ~1 on the last token):
    # y = (1 + 4 + 9) / 6 + X_0 = 7/3 + 1, identical in both layers, so z = y whatever c is
    torch.testing.assert_close(out, anchor + 10 / 3)
    with torch.no_grad():
        net.downsample_layer[1].bias.fill_(-1.0)  # q = -1: every logit <= 0, alpha = 0 (checklist 6)
    out, _ = net(taps, anchor)
    torch.testing.assert_close(out, anchor + 1.0)  # y_l = X_l,0, the residual (CLS) token alone
    out, _ = net(taps, anchor, torch.ones(1, 3, dtype=torch.bool), torch.tensor([2]))
    torch.testing.assert_close(out, anchor + 3.0)  # text: the residual token sits at the EOT position


REF = os.path.join(os.path.dirname(__file__), "fixtures", "official_unipt.pt")


@pytest.mark.parametrize("case", ["vision", "text", "vision_d2"])
def test_side_network_matches_official(case):
    """tests/fixtures/official_unipt.pt (tests/oracles/make_fixtures.py): the release's
    Our_tuning_for_transformer alone, 4 taps, output and gradients of sum(output * probe)."""
    a = torch.load(REF, weights_only=True)["side"][case]
    c, i = a["config"], a["inputs"]
    net = unipt.ParallelSideNetwork(c["num_layer"], c["hidden_size"], c["embed_size"], c["downsample_D_factor"])
    net.load_state_dict({k: v.float() for k, v in a["state_dict"].items()}, strict=True)  # official names
    out, _ = net(i["hidden"].float(), i["anchor"].float()[:, 0], i["mask"].bool() if "mask" in i else None,
                 i.get("position"))
    assert_close32(out, a["output"], FORWARD, "output")  # |out| <= 2.8
    (out * a["probe"]).sum().backward()
    for n, p in net.named_parameters():
        assert_close32(p.grad, a["grads"][n], GRADIENT, n, gradient_floor(a["grads"].values()))


def test_end_to_end_matches_official():
    """The same file's e2e part: a tiny CLIP with both side networks through the release's CLIP4Clip methods
    (meanP, logit_scale ln 100): embeddings, frame embeddings, pooled video, logits, training loss, gradients."""
    e = torch.load(REF, weights_only=True)["e2e"]
    c, i, out = e["config"], e["inputs"], e["outputs"]
    m = unipt.UniPT(clip.CLIP(**{k: c[k] for k in clip.CONFIGS["tiny"]}), num_frames=c["num_frames"])  # its shapes
    m.load_state_dict({k: v.float() for k, v in e["state_dict"].items()}, strict=True)  # official names
    video, mask = i["video"].float(), i["video_mask"].bool()
    t, frames, v = m.encode_text(i["text"]), m.encode_frames(video), m.encode_video(video, mask)
    logits = m.logit_scale.exp() * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T
    for ours, theirs in [(t, "text_embeds"), (frames, "frame_embeds"), (v, "video_pooled"),
                         (logits, "logits")]:  # |logit| <= 34
        assert_close32(ours, out[theirs], FORWARD, theirs)
    labels = torch.arange(len(t))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert_close32(loss, e["loss"], FORWARD, "loss")  # loss 4.24; chance ln 4 = 1.39
    loss.backward()
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert sorted(trainable) == sorted(e["grads"]) and not e["clip_grads"]
    for n, g in e["grads"].items():
        assert_close32(trainable[n].grad, g, GRADIENT, n, gradient_floor(e["grads"].values()))
