"""SimVTP (simvtp.py): one test per paper component (docs/simvtp.md) that test_simvtp.py does not pin alone, each
failing when that component alone is broken; float32 comparisons within the bound of tests/equivalence.py."""
import torch
import torch.nn.functional as F

import clip
import simvtp
from equivalence import FORWARD, assert_close32

TINY = dict(size=32, patch_size=8, tubelet_size=2, width=32, depth=2, heads=2, text_dropout=0.0)
CAPTIONS = ["a red circle moves left", "a blue square grows", "a green triangle moves up then shrinks"]


def retrieval(**kw):
    torch.manual_seed(0)
    return simvtp.SimVTP(4, **{**TINY, **kw}).eval()


def test_stochastic_depth_drops_whole_samples_and_rescales_the_rest():
    """DropPath (timm): a sample's residual branch is 0 with probability p, else divided by 1 - p."""
    torch.manual_seed(0)
    block = simvtp.Block(8, 2, drop_path=0.25)
    torch.nn.init.zeros_(block.mlp.fc2.weight), torch.nn.init.zeros_(block.mlp.fc2.bias)  # the MLP adds 0
    x = torch.randn(64, 5, 8)
    with torch.no_grad():
        branch = block.eval()(x) - x  # [64, 5, 8], the attention branch
        delta = block.train()(x) - x
    dropped = (delta == 0).flatten(1).all(1)  # [64]
    assert 0 < int(dropped.sum()) < 64, "stochastic depth: no sample dropped or all dropped"
    assert_close32(delta[~dropped], branch[~dropped] / 0.75, FORWARD, "stochastic depth: kept samples x 1/(1-p)")


def test_drop_path_rate_grows_linearly_with_depth():
    rates = [b.drop_path for b in simvtp.make_blocks(8, 5, 2, 0.1)]
    assert torch.allclose(torch.tensor(rates), torch.linspace(0, 0.1, 5)), f"drop-path schedule (timm dpr): {rates}"


def test_retrieval_video_ignores_padded_frames():
    """Deviation 4: a padded tubelet is key-masked and left out of the pooling: its pixels change nothing."""
    m = retrieval()
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    other = video.clone()
    other[0, 2:] = 10 * torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        v = m.encode_video(video, mask)
        assert_close32(m.encode_video(other, mask), v, FORWARD, "retrieval video tower: padded frames ignored")
        assert_close32(m.encode_video(video[1:], mask[1:]), v[1:], FORWARD, "retrieval video: another clip's padding")


def test_retrieval_text_hides_padding_as_keys():
    """The pad key mask: with pool_pads=False a caption's embedding does not depend on how far the batch pads it."""
    m = retrieval(pool_pads=False)
    ids = clip.tokenize(CAPTIONS, context_length=16)
    with torch.no_grad():
        alone, batched = m.encode_text(ids[:1]), m.encode_text(ids)  # padded to the longest caption in the batch
    assert_close32(batched[:1], alone, FORWARD, "retrieval text tower: pads hidden as keys")


def test_text_embeddings_are_berts_block():
    """word + absolute position + token type 0, LayerNorm eps 1e-12 (HF BertEmbeddings)."""
    torch.manual_seed(0)
    e = simvtp.TextEmbeddings(100, 16, 32, dropout=0.0)
    ids = torch.randint(0, 100, (2, 7))
    x = e.word_embeddings.weight[ids] + e.position_embeddings.weight[:7] + e.token_type_embeddings.weight[0]
    ref = F.layer_norm(x, (32,), e.LayerNorm.weight, e.LayerNorm.bias, eps=1e-12)
    assert_close32(e(ids), ref, FORWARD, "BERT text embeddings (token type 0)")


def pretraining_batch():
    torch.manual_seed(0)
    m = simvtp.SimVTPPretraining(4, **TINY, decoder_width=16, decoder_depth=1, decoder_heads=2).eval()
    video = torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, attn = m.text_inputs(clip.tokenize(CAPTIONS, context_length=16))
    return m, video, ids, attn, m.random_tube_mask(3), m.random_text_mask(attn)


def test_mvm_and_mlm_read_the_positive_joint_pass():
    """MVM and MLM decode [clip i's visible video ; caption i]: the VTM negatives (the other B joint rows)
    change neither the pixel predictions nor the word logits."""
    m, video, ids, attn, tube, select = pretraining_batch()
    with torch.no_grad():
        a, b = (m.pretraining_outputs(video, ids, attn, tube, select, torch.tensor(neg)) for neg in ([1, 2, 0], [2, 0, 1]))
    assert_close32(b["pixel_pred"], a["pixel_pred"], FORWARD, "MVM: decodes the positive joint rows")
    assert_close32(b["mlm_logits"], a["mlm_logits"], FORWARD, "MLM: reads the positive joint rows")
    assert (b["vtm_logits"][3:] - a["vtm_logits"][3:]).abs().max() > 1e-6, "VTM: negatives do not reach the head"


def test_vtc_pools_the_visible_video_and_the_masked_caption_alone():
    """VTC: the encoder (with its final LN) on the visible tubelets alone, mean pooled; the same for the masked
    caption, its pads up to the longest caption counted (pool_pads, deviation 1)."""
    m, video, ids, attn, tube, select = pretraining_batch()
    with torch.no_grad():
        out = m.pretraining_outputs(video, ids, attn, tube, select, torch.tensor([1, 2, 0]))
        x = (m.encoder.patch_embed(video) + m.pos_embed)[~tube].view(3, -1, 32)  # visible tokens, positions first
        t = m.text_embeddings(ids.masked_fill(select, m.mask_id))
        bias = (~attn).float() * -10000.0
        for blk in m.encoder.blocks:
            x, t = blk(x), blk(t, bias)
        assert_close32(out["vtc_video"], m.encoder.norm(x).mean(1), FORWARD, "VTC video: mean of the visible tokens")
        longest = int(attn.sum(1).max())  # the release pads to it; its pads count, not the slots past it
        assert_close32(out["vtc_text"], m.encoder.norm(t)[:, :longest].mean(1), FORWARD, "VTC text: mean to the longest")


def test_retrieval_towers_init_truncated_normal_002():
    """modeling_finetune.py's init when nothing is loaded: Linear weights trunc_normal(std 0.02), biases 0. Over
    its 98,304 weights the sample std is within 0.23 % (one sigma) of 0.02; the bound, 10 %, is 40 sigma."""
    m = retrieval(depth=4)
    w = torch.cat([mod.weight.flatten() for mod in m.modules() if isinstance(mod, torch.nn.Linear)])
    assert abs(w.std().item() - 0.02) < 0.002, f"retrieval init: weight std {w.std().item():.4f}, not 0.02"
    biases = [mod.bias for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod.bias is not None]
    assert biases and not any(b.any() for b in biases), "retrieval init: Linear biases are not 0"
