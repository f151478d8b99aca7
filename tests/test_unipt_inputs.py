"""UniPT (unipt.py) on its inputs, on a tiny CLIP on the CPU: text padding found from EOT (not from id 0), padded
frames without effect, the backbone under bf16 autocast, bad input."""
import pytest
import torch
import torch.nn.functional as F

import unipt
from messages import assert_tells
from test_unipt import ids, model, video  # noqa: F401 (model: the fixture)


def test_text_padding_from_eot_not_id_zero(model):
    text = ids(3, 6)
    text[0, 2] = 0  # id 0 is "!" in CLIP's BPE: a word, not padding
    mask, eot = model.text_mask(text)
    assert eot.tolist() == [4, 7]
    assert mask.tolist()[0] == [True] * 5 + [False] * 5 and mask[0, 2]
    # the release's `ids != 0` mask drops the "!"; ours must give a different (unmasked) result
    anchor, taps = unipt.frozen_text_taps(model.clip, text)
    ours = model.text_adapter(taps, anchor, mask, eot)[0]
    release = model.text_adapter(taps, anchor, text != 0, eot)[0]
    assert torch.equal(model.encode_text(text), ours) and not torch.allclose(ours, release)
    # more zero padding after EOT changes nothing (causal tower + EOT mask)
    longer = torch.cat([text, torch.zeros(2, 6, dtype=torch.long)], 1)
    torch.testing.assert_close(model.encode_text(longer), ours, atol=1e-6, rtol=1e-5)


def test_padded_frames_do_not_change_the_video(model):
    v, mask = video(), torch.tensor([[True, True, True], [True, False, False]])
    out = model.encode_video(v, mask)
    v2 = v.clone()
    v2[1, 1:] = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.encode_video(v2, mask), out)
    # meanP: masked mean of per-frame-normalised side outputs; a 1-frame video is that frame
    frames = F.normalize(model.encode_frames(v), dim=-1)
    torch.testing.assert_close(out[1], frames[1, 0])
    torch.testing.assert_close(out[0], frames[0].mean(0))
    torch.testing.assert_close(model.encode_video(v[1:, :1], mask[1:, :1])[0], out[1], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_backbone_and_bad_input(model):
    text = ids(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.encode_text(text)
    assert out.dtype == torch.float32  # side network stays fp32
    assert F.cosine_similarity(out, model.encode_text(text)).min() > 0.99
    out.sum().backward()
    assert all(p.grad is None for p in model.clip.parameters())
    with pytest.raises(ValueError, match="token ids"):
        model.encode_text(text.float())
    with pytest.raises(ValueError, match="video_mask"):
        model.encode_video(video(), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError) as e:
        unipt.ParallelSideNetwork(3, 8, 32, D=3)
    assert_tells(str(e.value), "D=3", "32")  # the factor, the width it must divide
