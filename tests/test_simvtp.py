"""SimVTP (simvtp.py): the release's behaviour, one property per test, on a tiny config, CPU."""
import math
import pytest
import torch
import torch.nn.functional as F

import clip
import simvtp

TINY = dict(size=32, patch_size=8, tubelet_size=2, width=32, depth=2, heads=2, text_dropout=0.0)
DECODER = dict(decoder_width=16, decoder_depth=1, decoder_heads=2)
CAPTIONS = ["a red circle moves left", "a blue square grows", "a green triangle moves up then shrinks"]


def tiny(seed=0, pretraining=True, **kw):  # a SimVTPPretraining, or the retrieval SimVTP
    torch.manual_seed(seed)
    if pretraining:
        return simvtp.SimVTPPretraining(4, **{**TINY, **DECODER, **kw})  # 2 time slices x 16 cells = 32 tokens
    return simvtp.SimVTP(4, **{**TINY, **kw})


def first_input(seen, key, i=0):  # forward hook recording the first call's i-th input (returns None)
    return lambda mod, args, out: None if key in seen else seen.update({key: args[i]})


def batch(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 3, 32, 32, generator=g), clip.tokenize(CAPTIONS[:B], context_length=16)


def test_official_vit_b_counts():  # official counts, with our vocabulary: BPE 49408 + mask id, 77 positions
    with torch.device("meta"):
        m = simvtp.SimVTPPretraining(16)
        c = simvtp.param_counts(m, simvtp.SimVTP(16))
    assert m.num_tokens == 1568 and c["encoder"] == 86_227_200 and c["pixel decoder"] == 7_688_448
    assert c["encoder_to_decoder + mask_token"] == 294_912 + 384 and c["VTM head"] == 1538
    assert c["text_embeddings"] == (49409 + 77 + 2) * 768 + 1536 and c["MLM head"] == 49409 * 769
    assert c["pretrain total"] == 141_521_084 - 23_837_184 - 23_471_418 + c["text_embeddings"] + c["MLM head"]
    assert c["video tower"] == 86_227_200 and c["text tower"] == 85_045_248 + 1536 + c["text_embeddings"]
    assert c["finetune total"] == c["video tower"] + c["text tower"]  # no dead weights (deviation 5)


def test_token_layout_and_positions():
    m = tiny()
    with torch.no_grad():
        m.encoder.patch_embed.proj.weight.zero_(), m.encoder.patch_embed.proj.bias.zero_()
        m.encoder.patch_embed.proj.weight[0, 0] = 1  # channel 0 of the token = sum of the red tubelet
    video = torch.zeros(1, 4, 3, 32, 32)
    video[0, 3, 0, 17, 30] = 1  # frame 3 -> slice 1; row 17 -> h 2; col 30 -> w 3
    x = m.encoder.patch_embed(video)[0, :, 0]
    assert x.nonzero().flatten().tolist() == [1 * 16 + 2 * 4 + 3]  # index = t*g*g + h*g + w
    pos = torch.tensor([[p / 10000 ** (2 * (j // 2) / 32) for j in range(32)] for p in range(32)])
    pos[:, 0::2], pos[:, 1::2] = pos[:, 0::2].sin(), pos[:, 1::2].cos()
    assert torch.allclose(m.pos_embed[0], pos, atol=1e-6) and "pos_embed" not in m.state_dict()  # fixed


def test_tube_mask_exact_count_identical_slices():
    with torch.device("meta"):
        m = simvtp.SimVTPPretraining(16)
    mask = m.random_tube_mask(5, device="cpu").view(5, 8, 196)
    assert (mask.sum(-1) == 176).all() and (mask == mask[:, :1]).all()  # int(0.9 * 196) in every slice
    assert not (mask[0] == mask[1]).all()  # drawn per clip


def test_text_mask_selects_only_real_tokens():
    m = tiny(text_mask_ratio=1.0)
    ids, attn = m.text_inputs(clip.tokenize(CAPTIONS, context_length=16))
    assert ids.shape[1] == 16 and int(attn.sum(1).max()) == 10  # every slot kept (static shapes, deviation 1)
    sel, eot = m.random_text_mask(attn), ids.argmax(-1)
    for b in range(3):  # p = 1: every word, never SOT, EOT or padding (CLIP pads with id 0 = "!")
        assert sel[b].nonzero().flatten().tolist() == list(range(1, int(eot[b])))
    sel = tiny(text_mask_ratio=0.75).random_text_mask(attn.repeat(200, 1))
    assert not (sel & ~m.random_text_mask(attn).repeat(200, 1)).any()
    assert abs(sel.sum() / m.random_text_mask(attn).repeat(200, 1).sum() - 0.75) < 0.05


def test_joint_input_masked_ids_and_key_mask():
    m, (video, text) = tiny(), batch()
    seen, (ids, attn) = {}, m.text_inputs(text)
    m.text_embeddings.register_forward_hook(first_input(seen, "ids"))
    m.encoder.blocks[0].attn.register_forward_hook(first_input(seen, "bias", 1))
    sel = m.random_text_mask(attn)
    m.pretraining_loss(video, None, text, text_select=sel)
    assert torch.equal(seen["ids"], ids.masked_fill(sel, 49408))  # every selected token -> the mask id
    n_vis = 2 * 2  # 16 - int(0.9 * 16) = 2 visible cells x 2 slices
    expect = torch.cat([torch.zeros(3, n_vis), (~attn).float() * -10000], 1).repeat(2, 1)  # 2B joint rows
    assert torch.equal(seen["bias"], expect)  # visible video first, then text; -10000 at pads only


def test_attention_q_v_bias_no_k_bias():
    attn = simvtp.Attention(8, 2)
    torch.nn.init.normal_(attn.q_bias), torch.nn.init.normal_(attn.v_bias)
    x = torch.randn(2, 5, 8)
    q, k, v = (x @ attn.qkv.weight.T + torch.cat([attn.q_bias, torch.zeros(8), attn.v_bias])).split(8, -1)
    heads = lambda t: t.view(2, 5, 2, 4).transpose(1, 2)  # noqa: E731
    a = (heads(q) * 4 ** -0.5 @ heads(k).transpose(-1, -2)).softmax(-1)
    ref = attn.proj((a @ heads(v)).transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(attn(x), ref, atol=1e-6)


def test_pixel_targets_per_tubelet():
    m, (video, _) = tiny(), batch()
    mask = m.random_tube_mask(3)
    tg = m.pixel_targets(video, mask)
    b, n = 1, int(mask[1].nonzero()[5])  # the 6th masked token of clip 1
    s, h, w = n // 16, n % 16 // 4, n % 4
    raw = video[b] * m.std + m.mean  # [T, 3, H, W] in [0, 1]
    cube = raw[2 * s:2 * s + 2, :, 8 * h:8 * h + 8, 8 * w:8 * w + 8].permute(0, 2, 3, 1)  # [t, p, p, c]
    cube = (cube - cube.mean((0, 1, 2))) / (cube.reshape(-1, 3).std(0, unbiased=True) + 1e-6)
    assert tg.shape == (3, 28, 2 * 8 * 8 * 3) and torch.allclose(tg[b, 5], cube.flatten(), atol=1e-5)  # c fastest


def test_decoder_order_visible_then_mask_tokens():
    m, (video, text) = tiny(), batch()
    mask, seen = m.random_tube_mask(3), {}
    m.decoder.blocks[0].register_forward_hook(first_input(seen, "x"))
    out = m.pretraining_loss(video, None, text, tube_mask=mask)
    pos, x = m.decoder_pos_embed.expand(3, -1, -1), seen["x"]
    assert x.shape == (3, 32, 16) and out["mvm"] > 0
    assert torch.allclose(x[:, 4:], m.mask_token + pos[mask].view(3, 28, 16))  # mask tokens last, own slots
    assert not torch.allclose(x[:, :4], pos[~mask].view(3, 4, 16))  # visible: encoder output + position


def test_four_losses_as_stated():
    m, (video, text) = tiny(), batch()
    ids, attn = m.text_inputs(text)
    mask, sel, neg = m.random_tube_mask(3), m.random_text_mask(attn), torch.tensor([2, 0, 1])
    torch.manual_seed(1)
    got = m.pretraining_loss(video, None, text, tube_mask=mask, text_select=sel, negatives=neg)
    seen = {}
    m.encoder.norm.register_forward_hook(lambda mod, args, out: None if "joint" in seen else seen.update(joint=out))
    o = m.pretraining_outputs(video, ids, attn, mask, sel, neg)
    mvm = ((o["pixel_pred"] - m.pixel_targets(video, mask)) ** 2).mean()
    assert torch.allclose(o["mlm_logits"], m.text_cls(seen["joint"][:3, 4:]))  # one Linear, joint text rows
    mlm = -o["mlm_logits"][sel].log_softmax(-1)[torch.arange(int(sel.sum())), ids[sel]].mean()  # masked words only
    s = F.normalize(o["vtc_text"], dim=-1) @ F.normalize(o["vtc_video"], dim=-1).T / 0.05
    vtc = -s.log_softmax(1).diag().mean() - s.T.log_softmax(1).diag().mean()  # both directions, summed
    vtm = F.cross_entropy(o["vtm_logits"], torch.tensor([1, 1, 1, 0, 0, 0]))
    for k, ref in dict(mvm=mvm, mlm=mlm, vtc=vtc, vtm=vtm, loss=mvm + mlm + vtc + vtm).items():
        assert torch.allclose(got[k], ref, atol=1e-5), k
    assert math.isclose(m.logit_scale.exp().item(), 20.0, rel_tol=1e-6)
    # VTC text pooling counts pads (release); pool_pads=False averages the real tokens only
    assert not torch.allclose(o["vtc_text"], tiny(pool_pads=False).pretraining_outputs(
        video, ids, attn, mask, sel, neg)["vtc_text"])


def test_vtm_negatives_swap_the_video():
    m, (video, text) = tiny(), batch()
    ids, attn = m.text_inputs(text)
    mask, sel, neg = m.random_tube_mask(3), m.random_text_mask(attn), torch.tensor([2, 0, 1])
    a = m.pretraining_outputs(video, ids, attn, mask, sel, neg)["vtm_logits"]
    shift = (torch.arange(3) == 2).float().view(3, 1, 1, 1, 1)  # only clip 2 changes: positive row 2 and
    b = m.pretraining_outputs(video + shift, ids, attn, mask, sel, neg)["vtm_logits"]  # caption 0's negative
    assert (a - b).abs().amax(1).gt(1e-6).tolist() == [False, False, True, True, False, False]


def test_finetune_towers_independent_and_loaded_from_pretraining():
    pre, m, (video, text) = tiny(seed=1), tiny(seed=2, pretraining=False), batch()
    fresh_fc = m.video_encoder.fc_norm.weight.clone()
    plain = m.load_state_dict(pre.state_dict(), strict=False)  # load_state_dict itself renames nothing
    assert set(plain.unexpected_keys) == set(pre.state_dict())
    missing, unexpected = m.load_state_dict(m.towers_from_pretraining(pre.state_dict()), strict=False)
    assert missing == [] and {k.split(".")[0] for k in unexpected} == {
        "encoder", "decoder", "encoder_to_decoder", "mask_token", "text_cls", "vtm_head"}  # the release's "not used"
    assert [k for k in unexpected if k.startswith("encoder.")] == ["encoder.norm.weight", "encoder.norm.bias"]
    for tower in (m.video_encoder, m.text_encoder):
        assert torch.equal(tower.blocks[1].mlp.fc2.weight, pre.encoder.blocks[1].mlp.fc2.weight)
    assert m.text_encoder.text_embeddings.word_embeddings.weight.equal(pre.text_embeddings.word_embeddings.weight)
    assert torch.equal(m.video_encoder.fc_norm.weight, fresh_fc)  # fresh LN; the encoder's final norm is dropped
    full = torch.ones(3, 4, dtype=torch.bool)
    for tower, encode in [("text_encoder.", lambda: m.encode_text(text)),
                          ("video_encoder.", lambda: m.encode_video(video, full))]:
        m.zero_grad(set_to_none=True)
        encode().sum().backward()  # separate copies: each embedding reaches its own tower only
        assert all((p.grad is None) != n.startswith(tower) for n, p in m.named_parameters())
    v = m.encode_video(video, full)
    x = m.video_encoder.patch_embed(video) + m.pos_embed
    for blk in m.video_encoder.blocks:
        x = blk(x)
    assert torch.allclose(v, m.video_encoder.fc_norm(x.mean(1)), atol=1e-6)  # no final norm, all tokens
    v2 = m.encode_video(video, full.index_put((torch.tensor([0, 0]), torch.tensor([2, 3])), torch.tensor(False)))
    assert torch.allclose(v2[1:], v[1:], atol=1e-6) and not torch.allclose(v2[0], v[0])  # padded frames of clip 0


def test_convert_official_and_errors(tmp_path):
    m = tiny()
    sd = {"module." + k: v for k, v in tiny(seed=3, vocab_size=30522, context_length=512).state_dict().items()}
    sd["module.text_embeddings.position_ids"] = torch.arange(512)[None]
    out = simvtp.convert_official(sd, m)
    assert "text_embeddings.word_embeddings.weight" not in out and "text_cls.weight" not in out  # WordPiece rows
    assert out["text_embeddings.position_embeddings.weight"].shape == (77, 32)
    assert not hasattr(m, "encode_video") and not hasattr(tiny(pretraining=False), "pretraining_loss")  # two models
    with pytest.raises(ValueError, match=r"video must be \[B, 4, 3, 32, 32\]"):
        tiny(pretraining=False).encode_video(torch.zeros(2, 8, 3, 32, 32), torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="need >= 2 clips"):
        m.pretraining_loss(batch()[0][:1], None, batch()[1][:1])
    assert simvtp.normalize_pixels(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))[0, :, 0, 0].allclose(
        (1 - torch.tensor(simvtp.IMAGENET_MEAN)) / torch.tensor(simvtp.IMAGENET_STD))
    fig = simvtp.visualize(m, *batch(), str(tmp_path / "vis.png"))
    assert (tmp_path / "vis.png").stat().st_size > 0 and fig.shape[1] == 4 * 32 * 4
