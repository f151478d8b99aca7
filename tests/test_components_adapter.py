"""Cross-Modal Adapter (adapter.py): one test per paper component (docs/adapter.md), each failing when that
component alone is broken. Outputs are compared with the component written out, within the float32 bound of
tests/equivalence.py."""
import torch
import torch.nn.functional as F

import clip
from adapter import CrossModalAdapter, adapter
from conftest import make_tiny_clip
from equivalence import FORWARD, assert_close32


def make(d_s=8, **kw):
    torch.manual_seed(0)
    model = CrossModalAdapter(make_tiny_clip(), 4, r=4, d_s=d_s, **kw)
    with torch.no_grad():  # large enough to matter, biases off zero
        [p.mul_(30).add_(0.05) for p in model.parameters() if p.requires_grad]
    return model.eval()


def frames():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 3, 32, 32, generator=g), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)


def test_adapter_bottleneck_unique_then_shared_channels():
    """Eq. 3-6: u = [QuickGELU(h Wd + bd) Wu + bu ; QuickGELU(h Wd + bd) Ws + bs], the shared d_s channels last."""
    g = torch.Generator().manual_seed(0)
    h, Wd, bd, Wu, bu, Ws, bs = (torch.randn(*s, generator=g) for s in [(5, 16), (4, 16), (4,), (12, 4), (12,), (4, 4), (4,)])
    z = h @ Wd.t() + bd
    z = z * torch.sigmoid(1.702 * z)
    ref = torch.cat([z @ Wu.t() + bu, z @ Ws.t() + bs], dim=-1)
    assert_close32(adapter(h, Wd, bd, Wu, bu, Ws, bs), ref, FORWARD, "adapter (Eq. 3-6)")
    assert_close32(adapter(h, Wd, bd, None, None, Ws, bs), ref[:, 12:], FORWARD, "adapter, d_s = width")
    assert_close32(adapter(h, Wd, bd, Wu, bu, None, None), ref[:, :12], FORWARD, "adapter, d_s = 0 (w/o Share)")


def test_adapters_in_every_vision_block_written_out():
    """Fig. 2 in the vision tower: x + (h + u_{2i}(h)) after the attention, x + (h + u_{2i+1}(h)) after the MLP,
    the unique up-projection then the slice of the tensor shared with the text tower; embedding ln_post(CLS) @ proj."""
    m, (video, mask) = make(), frames()

    def u(h, j):
        z = h @ m.visual_adapter_down_weight[j].t() + m.visual_adapter_down_bias[j]
        z = z * torch.sigmoid(1.702 * z)
        return torch.cat([z @ m.visual_adapter_up_unique_weight[j].t() + m.visual_adapter_up_unique_bias[j],
                          z @ m.vt_adapter_up_share_weight[j].t() + m.vt_adapter_up_share_bias[j]], -1)
    with torch.no_grad():
        x = m.clip.visual.embed(video.flatten(0, 1))
        for i, b in enumerate(m.clip.visual.transformer.resblocks):
            h = b.attn(b.ln_1(x))
            x = x + h + u(h, 2 * i)
            h = b.mlp(b.ln_2(x))
            x = x + h + u(h, 2 * i + 1)
        ref = m.clip.visual.head(x[:, 0]).view(2, 4, -1)
        assert_close32(m.encode_video(video, mask), ref, FORWARD, "adapters in the vision blocks (Fig. 2)")


def test_dropout_after_the_activation_acts_in_training_only():
    """Deviation 3: dropout (the release: 0) after QuickGELU in training; evaluation is deterministic and equal."""
    ids = clip.tokenize(["a red square moves left", "a blue circle"], context_length=12)
    plain, dropped = make(), make(dropout=0.5)
    with torch.no_grad():
        assert torch.equal(dropped.encode_text(ids), plain.encode_text(ids)), "adapter dropout acts in eval mode"
        torch.manual_seed(0)
        train = dropped.train().encode_text(ids)
    assert (train - plain.encode_text(ids)).abs().max() > 1e-3, "adapter dropout does nothing in training"


def test_qscore_uses_the_models_temperature():
    """Eq. 7-8 at the model's tau (release --q_score_temp): w = softmax_k(<t, f_k> / tau) over valid frames."""
    g = torch.Generator().manual_seed(3)
    t, f, mask = torch.randn(3, 32, generator=g) * 3, torch.randn(2, 4, 32, generator=g) * 3, frames()[1]
    for tau in (1.0, 5.0):
        m = make(tau=tau)
        w = (torch.einsum("nd,mtd->nmt", t, f) / tau).masked_fill(~mask, float("-inf")).softmax(-1)
        v = torch.einsum("nmt,mtd->nmd", w, f)
        ref = m.logit_scale.exp() * F.cosine_similarity(t[:, None], v, dim=-1)
        assert_close32(m.similarity(t, f, mask), ref, FORWARD, f"q-score (Eq. 7-8) at tau {tau}")


def test_shared_slice_is_one_tensor_for_both_towers():
    """The shared up-projection: moving its bias moves the LAST d_s channels of every adapter output in both towers."""
    m = make()
    h = torch.randn(3, 64)
    with torch.no_grad():
        base = {tower: m.adapt(h, tower, 1) for tower in ("visual", "text")}
        m.vt_adapter_up_share_bias[1].add_(1.0)
        for tower in ("visual", "text"):
            d = m.adapt(h, tower, 1) - base[tower]
            assert_close32(d[:, -8:], torch.ones(3, 8), FORWARD, f"shared slice ({tower}): last d_s channels")
            assert not d[:, :-8].any(), f"shared slice ({tower}) moved the unique channels"
