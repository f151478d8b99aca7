"""Cross-Modal Adapter: the release's behaviour, one property per test, on a tiny CLIP (CPU, seconds)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip

import clip
from adapter import RECIPE, DATASET_RECIPES, BertAdam, CrossModalAdapter, CrossModalAdapterRelease

IDS = clip.tokenize(["a red square moves left", "a blue circle grows", "green"], context_length=12)


def make(seed=0, d_s=8, cls=CrossModalAdapter, **kw):
    torch.manual_seed(seed)
    return cls(make_tiny_clip(seed, **kw.pop("clip", {})), 4, r=4, d_s=d_s, **kw).eval()


def frames():  # 3 videos of 4 frames, the last two padded
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    return torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), mask


def infonce(s):  # the release's loss: mean of the text->video and video->text cross-entropies
    return (F.cross_entropy(s, torch.arange(len(s))) + F.cross_entropy(s.t(), torch.arange(len(s)))) / 2


@pytest.mark.parametrize("data,count", [("msrvtt", 519_168), ("didemo", 520_896), ("msvd", 1_008_000),
                                        ("vatex", 988_416), ("activitynet", 805_632)])
def test_vitb32_trainable_counts_and_frozen_clip(data, count):
    rec = {**RECIPE, **DATASET_RECIPES.get(data, {})}
    with torch.device("meta"):  # shapes only, nothing allocated
        m = CrossModalAdapter(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), rec["frames"], r=rec["r"], d_s=rec["d_s"])
    trainable = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == count and all(n.split("_")[1] == "adapter" for n in trainable)
    assert not any(p.requires_grad for p in m.clip.parameters())  # LNs, proj, embeddings, logit_scale too
    assert m.logit_scale is m.clip.logit_scale and not m.logit_scale.requires_grad


def test_init_layout_and_param_groups():
    m = make(d_s=8)
    assert m.vt_adapter_up_share_weight.shape == (4, 8, 4) and m.text_adapter_up_unique_weight.shape == (4, 56, 4)
    w = torch.cat([p.flatten() for n, p in m.named_parameters() if p.requires_grad and n.endswith("weight")])
    assert abs(w.std().item() - 0.01) < 0.001 and abs(w.mean().item()) < 0.001
    assert all((p == 0).all() for n, p in m.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert m.visual_adapter_up_unique_weight.abs().min() > 0  # up-projections are not zero-initialised
    decay, no_decay = m.param_groups(0.2)  # release: decay on adapter weights only
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0 and len(decay["params"]) == 5
    assert all(p.dim() == 3 for p in decay["params"]) and all(p.dim() == 2 for p in no_decay["params"])
    assert {id(p) for g in (decay, no_decay) for p in g["params"]} == {id(p) for p in m.parameters() if p.requires_grad}


def test_zero_up_projections_give_frozen_clip_and_every_slot_acts():
    m, (video, mask) = make(d_s=8), frames()
    with torch.no_grad():
        [p.zero_() for n, p in m.named_parameters() if "up_" in n]
        assert torch.equal(m.encode_text(IDS), m.clip.encode_text(IDS))  # x + (h + 0) is the CLIP block
        assert torch.equal(m.encode_video(video, mask), m.clip.encode_image(video.flatten(0, 1)).view(3, 4, -1))
        t, f = m.encode_text(IDS), m.encode_video(video, mask)
        for j in range(4):  # both sublayers of both blocks of each tower carry an adapter
            for tower in ("visual", "text"):
                getattr(m, f"{tower}_adapter_up_unique_bias")[j].fill_(0.5)
                t2, f2 = m.encode_text(IDS), m.encode_video(video, mask)
                assert (t2 - t).abs().max() > 1e-4 if tower == "text" else torch.equal(t2, t)
                assert (f2 - f).abs().max() > 1e-4 if tower == "visual" else torch.equal(f2, f)
                getattr(m, f"{tower}_adapter_up_unique_bias")[j].zero_()


def test_adapter_reads_the_sublayer_output_and_adds_before_the_residual():
    m = make(d_s=8)
    x = m.clip.embed_text(IDS)

    def u(h, j):  # Eq. 3-6 written out: QuickGELU bottleneck, unique channels then the shared ones
        z = h @ m.text_adapter_down_weight[j].t() + m.text_adapter_down_bias[j]
        z = z * torch.sigmoid(1.702 * z)
        return torch.cat([z @ m.text_adapter_up_unique_weight[j].t() + m.text_adapter_up_unique_bias[j],
                          z @ m.vt_adapter_up_share_weight[j].t() + m.vt_adapter_up_share_bias[j]], -1)
    with torch.no_grad():
        [p.mul_(30).add_(0.05) for p in m.parameters() if p.requires_grad]  # large enough to matter
        for i, b in enumerate(m.clip.transformer.resblocks):  # x + h + u(h), h = sublayer(LN(x))
            h = b.attn(b.ln_1(x), is_causal=True)
            x = x + h + u(h, 2 * i)
            h = b.mlp(b.ln_2(x))
            x = x + h + u(h, 2 * i + 1)
        torch.testing.assert_close(m.encode_text(IDS), m.clip.text_head(x[torch.arange(3), IDS.argmax(-1)]))


def test_shared_tensor_moves_both_towers_and_sums_their_gradients():
    m, (video, mask) = make(d_s=8), frames()
    with torch.no_grad():
        t, f = m.encode_text(IDS), m.encode_video(video, mask)
        m.vt_adapter_up_share_weight.add_(0.1 * torch.randn_like(m.vt_adapter_up_share_weight))
        assert (m.encode_text(IDS) - t).abs().max() > 1e-5
        assert (m.encode_video(video, mask) - f).abs().max() > 1e-5
    W = m.vt_adapter_up_share_weight
    t, f = m.encode_text(IDS), m.encode_video(video, mask)
    g_all, = torch.autograd.grad(infonce(m.similarity(t, f, mask)), W, retain_graph=True)
    g_txt, = torch.autograd.grad(infonce(m.similarity(t, f.detach(), mask)), W, retain_graph=True)
    g_vid, = torch.autograd.grad(infonce(m.similarity(t.detach(), f, mask)), W)
    assert g_txt.abs().min() > 0 and g_vid.abs().min() > 0  # every shared entry hears both towers
    torch.testing.assert_close(g_all, g_txt + g_vid, rtol=1e-5, atol=1e-9)


def test_no_share_is_independent_and_full_share_has_no_text_unique():
    m, (video, mask) = make(d_s=0), frames()
    assert m.vt_adapter_up_share_weight is None
    with torch.no_grad():
        f = m.encode_video(video, mask)
        [p.add_(0.3) for n, p in m.named_parameters() if n.startswith("text_adapter")]
        assert torch.equal(m.encode_video(video, mask), f)  # nothing of the text side reaches the frames
    full = make(d_s=64, clip=dict(vision_width=128))  # d_s = text width < vision width
    assert full.text_adapter_up_unique_weight is None and full.visual_adapter_up_unique_weight.shape == (4, 64, 4)


def test_qscore_formula_and_padded_frames_excluded():
    m, g = make(), torch.Generator().manual_seed(3)
    t, f, mask = torch.randn(5, 32, generator=g) * 3, torch.randn(3, 4, 32, generator=g) * 3, frames()[1]
    s, scale = m.similarity(t, f, mask), m.logit_scale.exp()  # random CLIP: 1/0.07 (OpenAI's weights: 100)
    for n in range(5):  # Eq. 7-8 by hand for every pair
        for v in range(3):
            fv = f[v, mask[v]]  # valid frames only
            w = torch.softmax(fv @ t[n] / 5.0, dim=0)
            ref = scale * F.cosine_similarity(t[n], (w[:, None] * fv).sum(0), dim=0)
            torch.testing.assert_close(s[n, v], ref, rtol=1e-5, atol=1e-4)
    f2 = f.clone()
    f2[~mask] = 1e3 * torch.randn(int((~mask).sum()), 32)  # padded frames: anything at all
    torch.testing.assert_close(m.similarity(t, f2, mask), s, rtol=0, atol=0)
    mean = make(pool="mean").similarity(t, f2, mask)  # ablation: masked mean of raw frames, then cosine
    ref = torch.stack([F.normalize(f[v, mask[v]].mean(0), dim=0) for v in range(3)])
    torch.testing.assert_close(mean, scale * F.normalize(t, dim=-1) @ ref.t(), rtol=1e-5, atol=1e-4)


def test_encoders_independent_of_the_batch_and_padding():
    m, (video, mask) = make(), frames()
    with torch.no_grad():
        t, f = m.encode_text(IDS), m.encode_video(video, mask)
        torch.testing.assert_close(m.encode_text(IDS[1:2]), t[1:2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.encode_video(video[2:], mask[2:]), f[2:], rtol=1e-5, atol=1e-6)
        video2 = video.clone()
        video2[~mask] = 5.0  # padded pixels change only the padded frames' own embeddings
        f2 = m.encode_video(video2, mask)
    torch.testing.assert_close(f2[mask], f[mask], rtol=1e-5, atol=1e-6)


def test_bertadam_has_no_bias_correction_and_decays_into_the_update():
    p = torch.nn.Parameter(torch.full((3,), 0.5))
    opt = BertAdam([dict(params=[p], weight_decay=0.2)], lr=0.0, betas=(0.9, 0.98), eps=1e-6)
    p.grad = torch.full((3,), 1e-2)
    opt.step()  # warmup_cosine's first step has lr 0: nothing moves, but m and v are updated
    assert torch.equal(p, torch.full((3,), 0.5))
    opt.param_groups[0]["lr"] = 1e-2
    opt.step()
    m, v = 0.1 * 1e-2 * (1 + 0.9), 0.02 * 1e-4 * (1 + 0.98)  # no division by 1 - beta^k
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.5 - 1e-2 * (m / (v ** 0.5 + 1e-6) + 0.2 * 0.5)))


def test_release_fp16_casts_like_the_release_and_ignores_autocast():
    m, ref, (video, mask) = make(cls=CrossModalAdapterRelease), make(), frames()
    assert m.text_adapter_down_weight.dtype == m.clip.visual.proj.dtype == torch.float16
    assert m.clip.ln_final.weight.dtype == m.clip.logit_scale.dtype == torch.float32  # as convert_weights
    with torch.no_grad():
        t, f = m.encode_text(IDS), m.encode_video(video, mask)
        assert t.dtype == f.dtype == torch.float32  # the release returns .float() features
        torch.testing.assert_close((t, f), (ref.encode_text(IDS), ref.encode_video(video, mask)), rtol=2e-2, atol=2e-2)
        s = m.similarity(t, f, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # neither the fp16 towers nor the scores are recast
            assert torch.equal(m.encode_text(IDS), t) and torch.equal(m.similarity(t, f, mask), s)


def test_clear_errors():
    with pytest.raises(ValueError, match="same depth"):
        CrossModalAdapter(make_tiny_clip(vision_layers=3), 4)
    with pytest.raises(ValueError, match="d_s"):
        CrossModalAdapter(make_tiny_clip(), 4, d_s=65)
    with pytest.raises(ValueError, match="valid frame"):
        make().similarity(torch.randn(2, 32), torch.randn(2, 4, 32), torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]).bool())
    with pytest.raises(ValueError, match="video"):
        make().encode_video(torch.randn(2, 3, 32, 32), torch.ones(2, 3, dtype=torch.bool))
