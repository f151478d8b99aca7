"""SimVTP (simvtp.py) against the official code: tests/fixtures/official_simvtp.pt, written by
tests/oracles/make_fixtures.py from wufeim/SimVTP (its provenance entry has the commit).

Pretraining: the release's PretrainVisionTransformer run by its own training step (engine_for_pretraining.py
train_one_epoch: tokenizer, MLM masking, pixel targets, the four losses, backward) on a tiny config: 16 frames of
16 px, 4 px patches, width 32, 2 layers, a 16-wide 2-layer decoder, a 40-word vocabulary laid out as nanoTVR's
ids (pad 0, SOT 37, EOT 38, mask 39), 4 clips. The fixture keeps the draws the official code made (tube mask,
masked words, VTM negatives); SimVTPPretraining.pretraining_loss is given the same ones.
Fine-tuning: the release's DualVideoTextEncoder loaded from those weights as its fine-tuning script does (both
towers from the encoder, a fresh fc_norm), its train_class_batch with NormSoftmaxLoss, backward.
Dropout and drop path are 0 on both sides. Measured differences: torch 2.14.1, CPU."""
import os

import pytest
import torch
import torch.nn.functional as F

import simvtp
from equivalence import FORWARD, GRADIENT, assert_close32, gradient_floor

REF = os.path.join(os.path.dirname(__file__), "fixtures", "official_simvtp.pt")


@pytest.fixture(scope="module")
def ref():
    return torch.load(REF, weights_only=True)


def sizes(c):
    return dict(size=c["size"], patch_size=c["patch"], tubelet_size=c["tubelet"], width=c["width"], depth=c["depth"],
                heads=c["heads"], drop_path=0.0, text_dropout=0.0, vocab_size=c["vocab"], context_length=c["context"])


def assert_grads(params, theirs):
    """Every gradient the official run has, per tensor within the float32 bound (tests/equivalence.py). Row 0 of a word
    embedding is left out: HF's padding_idx=0 gives BERT's [PAD] row no gradient, while nanoTVR's id 0 is a
    word of CLIP's vocabulary ("!"), the pad id too, and gets one (simvtp.py deviation 1)."""
    assert sorted(params) == sorted(theirs)
    for name, g in theirs.items():
        ours = params[name].grad
        if name.endswith("word_embeddings.weight"):
            assert not g[0].any()
            ours, g = ours[1:], g[1:]
        assert_close32(ours, g, GRADIENT, name, gradient_floor(theirs.values()))


def test_pretraining_matches_official(ref):
    c, p = ref["config"], ref["pretrain"]
    x = p["inputs"]
    m = simvtp.SimVTPPretraining(c["frames"], decoder_width=c["decoder_width"], decoder_depth=c["decoder_depth"],
                                 decoder_heads=c["decoder_heads"], video_mask_ratio=c["video_mask_ratio"],
                                 text_mask_ratio=c["text_mask_ratio"], **sizes(c)).train()
    m.load_state_dict({k: v.float() for k, v in p["state_dict"].items()}, strict=True)  # official names
    video = x["video"].float().transpose(1, 2)  # the release's [B, 3, T, H, W] -> [B, T, 3, H, W]
    ids, attn = m.text_inputs(x["text"])
    assert torch.equal(ids, x["text"]) and torch.equal(attn, x["text_mask"].bool())  # same trim, same pads
    tube, select, negatives = x["tube_mask"], x["text_select"], x["negatives"]
    # the official draws follow the rules our own draws use: the same hidden cells in every time slice, as many
    # as ours hide; masked words only among the real words (not SOT, EOT or padding); a negative is another clip
    B, slices = len(tube), m.num_tokens // m.grid ** 2
    ours = m.random_tube_mask(B)
    for mask in (tube, ours):
        assert torch.equal(mask.view(B, slices, -1), mask.view(B, slices, -1)[:, :1].expand(-1, slices, -1))
        assert (mask.view(B, slices, -1).sum(-1) == m.num_masked).all()
    pos = torch.arange(ids.shape[1])
    assert not (select & ~(attn & (pos > 0) & (pos < attn.sum(1, keepdim=True) - 1))).any()
    assert (negatives != torch.arange(B)).all()

    with torch.no_grad():
        o = m.pretraining_outputs(video, ids, attn, tube, select, negatives)
    for k, theirs in p["outputs"].items():  # measured <= 7.2e-7 (|output| <= 3.1)
        if k != "vtm_labels":  # our MLM head scores every text row, theirs the masked words
            assert_close32(o[k][select] if k == "mlm_logits" else o[k], theirs, FORWARD, k)
    losses = m.pretraining_loss(video, None, x["text"], tube_mask=tube, text_select=select, negatives=negatives)
    for ours, theirs in [("loss", "loss"), ("mvm", "loss_v"), ("mlm", "loss_t"), ("vtc", "loss_vtc"),
                         ("vtm", "loss_vtm")]:  # measured 0, 2.4e-7, 4.8e-7, 0, 1.2e-7 (loss 9.30)
        assert_close32(losses[ours], p["losses"][theirs], FORWARD, ours)
    losses["loss"].backward()
    assert_grads(dict(m.named_parameters()), p["grads"])  # |grad| <= 18


def test_finetuning_towers_match_official(ref):
    c, p, f = ref["config"], ref["pretrain"], ref["finetune"]
    m = simvtp.SimVTP(c["frames"], **sizes(c)).train()
    pretrained = {k: v.float() for k, v in p["state_dict"].items()}
    loaded = m.load_state_dict(m.towers_from_pretraining(pretrained), strict=False)
    assert not loaded.missing_keys  # both towers filled from encoder.* and text_embeddings.*, as the release
    m.load_state_dict({k: v.float() for k, v in f["fc_norm"].items()}, strict=False)  # the official run's fc_norm
    video = p["inputs"]["video"].float().transpose(1, 2)
    v = m.encode_video(video, torch.ones(video.shape[:2], dtype=torch.bool))
    t = m.encode_text(f["inputs"]["text"])
    out = f["outputs"]
    assert_close32(v, out["video_emb"], FORWARD, "video_emb")  # |emb| <= 2.9
    assert_close32(t, out["text_emb"], FORWARD, "text_emb")
    cosine = F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T  # the release's sim_matrix(text, video)
    assert_close32(cosine, out["sim"], FORWARD, "sim")
    loss = m.contrastive_loss(t, v)
    assert_close32(loss, f["loss"], FORWARD, "loss")  # loss 3.28; chance 2 ln 4 = 2.77
    loss.backward()
    assert_grads(dict(m.named_parameters()), f["grads"])  # |grad| <= 8.0
