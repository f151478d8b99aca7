"""clip.py model: outputs equal OpenAI's on fixed weights, SDPA attention against a plain reference with every
mask kind, the blockwise API, text shorter than 77 tokens, bf16 autocast, frame preprocessing.
Loading and downloads: test_clip_load.py.

tests/fixtures/clip_fixed_weights.json holds facts: the outputs of OpenAI's own CLIP class (openai/CLIP@d05afc4
clip/model.py, fp32) for a 2+2-layer config whose weights are set by `fixed_weights` below, computed once.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clip
from conftest import make_tiny_clip


def hashed(n, seed):
    """n deterministic values in [-0.5, 0.5), the same on every machine and torch version (no RNG)."""
    x = torch.sin(torch.arange(n, dtype=torch.float64) * 12.9898 + seed * 78.233) * 43758.5453
    return x - x.floor() - 0.5


def fixed_weights(state_dict):
    """Weights away from any init: LayerNorm gains 1 + 0.4h, biases 0.2h, matrices uniform with var 1/fan_in."""
    sd = {}
    for seed, name in enumerate(sorted(state_dict)):
        t = state_dict[name]
        h = hashed(t.numel(), seed).view(t.shape)
        if name == "logit_scale":
            v = torch.tensor(2.0, dtype=torch.float64)
        elif ".ln_" in name or name.startswith("ln_") or name.startswith("visual.ln_"):
            v = (1 + 0.4 * h) if name.endswith("weight") else 0.2 * h
        elif name.endswith("bias"):
            v = 0.2 * h
        elif t.dim() == 1:
            v = h
        else:
            fan = t.shape[0] if name in ("visual.proj", "text_projection") else t.numel() // t.shape[0]
            v = h * math.sqrt(12 / fan)
        sd[name] = v.float()
    return sd


def test_outputs_equal_openais_on_fixed_weights():
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "clip_fixed_weights.json")) as f:
        fact = json.load(f)
    model = clip.CLIP(**fact["config"]).eval()
    model.load_state_dict(fixed_weights(model.state_dict()), strict=True)
    images = hashed(2 * 3 * 16 * 16, 1000).view(2, 3, 16, 16).float() * 3.0
    ids = clip.tokenize(fact["texts"])
    assert [row[:len(f)] for row, f in zip(ids.tolist(), fact["ids"])] == fact["ids"]
    with torch.no_grad():
        close = lambda a, b: torch.testing.assert_close(a, torch.tensor(b), atol=2e-5, rtol=1e-5)  # noqa: E731
        close(model.encode_image(images), fact["image_features"])
        close(model.encode_text(ids), fact["text_features"])
        close(model.encode_text(ids[:, :16]), fact["text_features"])  # L < 77 slices the positional embedding
        close(model(images, ids)[0], fact["logits_per_image"])


def inputs(model, n=3):
    torch.manual_seed(1)
    res = model.visual.input_resolution
    text = clip.tokenize(["a red circle moves left", "a dog", "two blue squares grow slowly"][:n], model.context_length)
    return torch.randn(n, 3, res, res), text


# ---- attention and masks ----------------------------------------------------------------------------

def reference_attention(attn, x, add_mask):
    """softmax(QK^T / sqrt(d) + mask) V per head, with the block's packed in_proj and out_proj weights."""
    B, N, W = x.shape
    H = attn.heads
    q, k, v = (x @ attn.in_proj_weight.t() + attn.in_proj_bias).split(W, dim=-1)
    q, k, v = (t.reshape(B, N, H, W // H).transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
    scores = q @ k.transpose(-1, -2) / math.sqrt(W // H) + add_mask  # [B, H, N, N]
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, W)  # [B, N, W]
    return attn.out_proj(y)


@pytest.mark.parametrize("kind", ["none", "causal", "bool", "bool_per_sample", "additive_per_sample"])
def test_sdpa_attention_equals_reference(kind):
    torch.manual_seed(0)
    attn = make_tiny_clip(transformer_width=128, transformer_heads=2).transformer.resblocks[1].attn  # 2 heads of 64
    B, N = 3, 7
    x = torch.randn(B, N, 128)
    allowed = torch.rand(B, N, N) > 0.4
    allowed[:, torch.arange(N), torch.arange(N)] = True  # every query sees at least itself
    additive = torch.randn(B, N, N).masked_fill(~allowed, float("-inf"))
    mask, is_causal, ref = {
        "none": (None, False, torch.zeros(N, N)),
        "causal": (None, True, torch.zeros(N, N).masked_fill(~clip.causal_mask(N), float("-inf"))),
        "bool": (allowed[0], False, torch.zeros(N, N).masked_fill(~allowed[0], float("-inf"))),
        "bool_per_sample": (allowed, False, torch.zeros(B, 1, N, N).masked_fill(~allowed[:, None], float("-inf"))),
        "additive_per_sample": (additive, False, additive[:, None]),
    }[kind]
    with torch.no_grad():
        out = attn(x, mask, is_causal)
        torch.testing.assert_close(out, reference_attention(attn, x, ref), atol=1e-5, rtol=1e-4)
        mha = nn.MultiheadAttention(128, 2, batch_first=True).eval()  # torch's own, same parameter names
        mha.load_state_dict(attn.state_dict())
        mha_mask = ref.expand(B, 2, N, N).reshape(B * 2, N, N) if ref.dim() == 4 else ref  # [B*H, N, N]
        torch.testing.assert_close(out, mha(x, x, x, attn_mask=mha_mask, need_weights=False)[0], atol=1e-5, rtol=1e-4)
        if kind == "causal":  # the same through an explicit boolean or additive mask
            torch.testing.assert_close(attn(x, clip.causal_mask(N)), attn(x, is_causal=True), atol=1e-6, rtol=0)
            torch.testing.assert_close(attn(x, ref), attn(x, is_causal=True), atol=1e-6, rtol=0)


def test_blockwise_api_reproduces_the_towers(tiny_clip):
    img, txt = inputs(tiny_clip)
    with torch.no_grad():
        x = tiny_clip.visual.embed(img)
        for b in tiny_clip.visual.transformer.resblocks:  # what a method file does between blocks
            x = x + b.attention(x)
            x = x + b.feed_forward(x)
        torch.testing.assert_close(tiny_clip.visual.head(x[:, 0]), tiny_clip.encode_image(img), rtol=0, atol=0)
        t = tiny_clip.embed_text(txt)
        for b in tiny_clip.transformer.resblocks:
            t = b(t, clip.causal_mask(t.shape[1]))
        feats = tiny_clip.text_head(t[torch.arange(len(txt)), txt.argmax(-1)])
        torch.testing.assert_close(feats, tiny_clip.encode_text(txt), atol=1e-6, rtol=0)


def test_short_text_slices_positions_and_equals_padded_77(tiny_clip):
    _, txt77 = inputs(tiny_clip)
    txt16 = clip.tokenize(["a red circle moves left", "a dog", "two blue squares grow slowly " * 4], 16, truncate=True)
    padded = torch.zeros(3, 77, dtype=txt16.dtype)
    padded[:, :16] = txt16
    with torch.no_grad():
        torch.testing.assert_close(tiny_clip.encode_text(txt16), tiny_clip.encode_text(padded), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tiny_clip.encode_text(txt16[:2]), tiny_clip.encode_text(txt77[:2]),
                                   atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="context length"):
            tiny_clip.encode_text(torch.zeros(1, 78, dtype=torch.long))


def test_bf16_autocast_close_to_fp32(tiny_clip):
    img, txt = inputs(tiny_clip)
    with torch.no_grad():
        ref = tiny_clip.encode_image(img), tiny_clip.encode_text(txt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny_clip.encode_image(img), tiny_clip.encode_text(txt)
    for r, l in zip(ref, low):
        assert l.dtype == torch.bfloat16
        assert F.cosine_similarity(r, l.float(), dim=-1).min() >= 0.999


# ---- preprocessing ----------------------------------------------------------------------------------

def test_resize_crop_shapes_and_centre_offsets():
    col = torch.arange(47, dtype=torch.uint8).view(1, 1, 47, 1).expand(2, 32, 47, 3)  # [N, H, W, 3], value = column
    assert clip.resize_crop(col, 32)[0, 0, 0].tolist() == list(range(8, 40))  # offset round(15 / 2) = 8
    assert clip.resize_crop(col[:, :, :45], 32)[0, 0, 0].tolist() == list(range(6, 38))  # round(13 / 2) = 6
    rows = col.transpose(1, 2).permute(0, 3, 1, 2)  # portrait [N, 3, 47, 32], value = row
    assert clip.resize_crop(rows, 32)[0, 0, :, 0].tolist() == list(range(8, 40))
    frames = torch.full((3, 240, 320, 3), 7, dtype=torch.uint8)
    frames[..., 1] = 200
    out = clip.resize_crop(frames.numpy(), 224)  # numpy [N, H, W, 3] as OpenCV gives, short side 240 -> 224
    assert out.shape == (3, 3, 224, 224) and out.dtype == torch.uint8
    assert out[:, 0].eq(7).all() and out[:, 1].eq(200).all()  # a flat colour survives the bicubic resize
    assert clip.resize_crop(torch.zeros(1, 3, 720, 1280, dtype=torch.uint8), 224).shape == (1, 3, 224, 224)


def test_normalize_uses_clip_mean_std():
    x = torch.randint(0, 256, (2, 4, 3, 5, 5), dtype=torch.uint8)  # [B, T, 3, H, W]
    y = clip.normalize_pixels(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(y[:, :, c], (x[:, :, c].float() / 255 - clip.MEAN[c]) / clip.STD[c])
    assert clip.MEAN == (0.48145466, 0.4578275, 0.40821073) and clip.STD == (0.26862954, 0.26130258, 0.27577711)
