"""clip.py and meanp.py: one test per component that the other test files do not pin alone, each failing when that
component alone is broken; float32 comparisons within the bound of tests/equivalence.py."""
import torch
import torch.nn.functional as F

import clip
import meanp
from conftest import make_tiny_clip
from equivalence import FORWARD, assert_close32


def test_layernorm_computes_in_fp32_and_rounds_once():
    """LayerNorm in fp32 and cast back, as OpenAI: fp16 input gives fp32 LayerNorm rounded once to fp16."""
    torch.manual_seed(0)
    ln = clip.LayerNorm(64)
    torch.nn.init.normal_(ln.weight), torch.nn.init.normal_(ln.bias)
    x = (torch.randn(32, 64) * 3 + 50).half()
    with torch.no_grad():
        out = ln(x)
        ref = F.layer_norm(x.float(), (64,), ln.weight, ln.bias, ln.eps).half()
    assert out.dtype == torch.float16 and torch.equal(out, ref), "LayerNorm: not computed in fp32"


def test_text_tower_init_is_openais():
    """initialize_parameters: token N(0, 0.02), positions N(0, 0.01), attention in_proj std w^-1/2, out_proj and
    c_proj w^-1/2 (2 layers)^-1/2, c_fc (2w)^-1/2, text_projection w^-1/2. The smallest tensor has 4,096 draws: its
    sample std is within 1.1 % (one sigma) of the true one; the bound, 10 %, is 9 sigma (the mutant's 0.02: 77 %)."""
    m = make_tiny_clip(transformer_width=128, transformer_layers=4, transformer_heads=2)
    w, layers = 128, 4
    proj = w ** -0.5 * (2 * layers) ** -0.5
    expect = {"token_embedding": (m.token_embedding.weight, 0.02), "positional_embedding": (m.positional_embedding, 0.01),
              "text_projection": (m.text_projection, w ** -0.5)}
    for i, b in enumerate(m.transformer.resblocks):
        expect |= {f"{i}.in_proj": (b.attn.in_proj_weight, w ** -0.5), f"{i}.out_proj": (b.attn.out_proj.weight, proj),
                   f"{i}.c_fc": (b.mlp.c_fc.weight, (2 * w) ** -0.5), f"{i}.c_proj": (b.mlp.c_proj.weight, proj)}
    for name, (p, std) in expect.items():
        assert abs(p.std().item() / std - 1) < 0.1, f"CLIP init: {name} std {p.std().item():.4f}, expected {std:.4f}"


def test_image_embedding_cls_and_positions_then_ln_pre():
    """visual.embed: [CLS ; conv patches] + positions (CLS has row 0), then ln_pre."""
    m, images = make_tiny_clip(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    v = m.visual
    with torch.no_grad():
        patches = F.conv2d(images, v.conv1.weight, stride=8).flatten(2).transpose(1, 2)  # [2, 16, 64]
        x = torch.cat([v.class_embedding.expand(2, 1, -1), patches], dim=1) + v.positional_embedding
        ref = F.layer_norm(x, (64,), v.ln_pre.weight, v.ln_pre.bias, v.ln_pre.eps)
        assert_close32(v.embed(images), ref, FORWARD, "image embedding (CLS, positions, ln_pre)")


def test_meanp_decays_matrices_but_not_embeddings():
    """MeanP.param_groups: weight decay on >= 2-D tensors except the embeddings; biases, LayerNorms, embeddings
    and logit_scale without."""
    model = meanp.MeanP(make_tiny_clip(), 4, freeze_layer_num=-1)
    decay, rest = model.param_groups(0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and rest["weight_decay"] == 0.0
    for n in ("clip.token_embedding.weight", "clip.positional_embedding", "clip.visual.positional_embedding",
              "clip.visual.class_embedding", "clip.logit_scale", "clip.ln_final.weight"):
        assert n not in decayed, f"MeanP weight decay on {n}"
    for n in ("clip.visual.conv1.weight", "clip.text_projection", "clip.visual.proj",
              "clip.transformer.resblocks.0.attn.in_proj_weight", "clip.visual.transformer.resblocks.1.mlp.c_fc.weight"):
        assert n in decayed, f"MeanP: no weight decay on the matrix {n}"
