"""SimVTP (simvtp.py) against the official modules (tests/oracles/make_fixtures.py makes
the reference), then SIMVTP_REF=/path/to/out.pt pytest tests/test_simvtp_oracle.py. Skipped otherwise.
The oracle uses a toy WordPiece-style vocabulary (30522, [MASK] = 103), so the model is built with that
vocabulary and fed the oracle's token ids, attention mask, masks and VTM negatives directly."""
import os

import pytest
import torch
import torch.nn.functional as F

import simvtp

REF = os.environ.get("SIMVTP_REF")
pytestmark = pytest.mark.skipif(not REF, reason="set SIMVTP_REF to simvtp_oracle.py's output file")


def test_matches_official_modules():
    r = torch.load(REF, weights_only=False)
    c, x = r["config"], r["inputs"]
    cfg = dict(size=c["img"], patch_size=c["patch"], tubelet_size=c["tubelet"], width=c["enc_dim"],
               depth=c["enc_depth"], heads=c["enc_heads"], decoder_width=c["dec_dim"], decoder_depth=c["dec_depth"],
               decoder_heads=c["dec_heads"], text_dropout=c["bert_dropout"], vocab_size=c["vocab"], context_length=512)
    m = simvtp.SimVTPPretraining(c["frames"], **cfg).train()
    m.mask_id = 103  # BERT's [MASK] in the oracle's vocabulary
    sd = {k: v for k, v in r["state_dict"].items() if not k.endswith("position_ids")}
    m.load_state_dict(sd, strict=True)  # official names
    video = x["videos"].transpose(1, 2)  # [B, 3, T, H, W] -> [B, T, 3, H, W]
    ids, attn, labels = x["input_ids_no_mlm"], x["attention_mask"].bool(), x["mlm_labels"]
    sel, tube, neg = labels != -100, x["bool_masked_pos"], x["vtm_neg_idx"]
    assert torch.equal(ids.masked_fill(sel, 103), x["input_ids"])
    o = m.pretraining_outputs(video, ids, attn, tube, sel, neg)
    ref = dict(r["outputs"], mlm_logits=r["outputs"]["mlm_logits"][sel])
    for ours, theirs in [("pixel_pred", "pixel_pred"), ("mlm_logits", "mlm_logits"), ("vtm_logits", "vtm_logits"),
                         ("vtc_text", "vtc_text_feat"), ("vtc_video", "vtc_video_feat")]:
        assert (o[ours] - ref[theirs]).abs().max() <= 1e-5, ours
    assert torch.allclose(m.pixel_targets(video, tube), r["pixel_targets"], atol=1e-6)
    losses = dict(loss_v=F.mse_loss(o["pixel_pred"], m.pixel_targets(video, tube)),
                  loss_t=F.cross_entropy(o["mlm_logits"], ids[sel]),
                  loss_vtc=m.contrastive_loss(o["vtc_text"], o["vtc_video"]),
                  loss_vtm=F.cross_entropy(o["vtm_logits"], r["outputs"]["vtm_labels"]))
    losses["loss"] = sum(losses.values())
    for k, v in losses.items():
        assert abs(v.item() - r["losses"][k]) <= 1e-5 * abs(r["losses"][k]), k
    losses["loss"].backward()
    params = dict(m.named_parameters())
    for k, g in r["grads"].items():
        assert (params[k].grad - g).abs().max() <= 1e-4 * g.abs().max().clamp(min=1e-8), k
    for k, g in r["grad_rows"].items():
        keep = g["rows"] != 0  # HF's padding_idx=0 gives row 0 no gradient; CLIP's id 0 ("!") is a word
        assert (params[k].grad[g["rows"][keep]] - g["values"][keep]).abs().max() <= 1e-4 * g["values"].abs().max(), k
    # fine-tuning towers built from the pretraining weights, with the oracle's fresh fc_norm
    ft = r["finetune"]
    m = simvtp.SimVTP(c["frames"], **{k: v for k, v in cfg.items() if not k.startswith("decoder_")}).eval()
    m.load_state_dict(sd, strict=False)  # the pre-hook fills both towers, as run_simvtp_finetuning.py
    m.load_state_dict(ft["fc_norm"], strict=False)
    with torch.no_grad():
        v = m.encode_video(ft["videos"].transpose(1, 2), torch.ones(video.shape[:2], dtype=torch.bool))
        att = ft["attention_mask"].bool()
        t = m.text_encoder.text_embeddings(ft["input_ids"])
        for blk in m.text_encoder.blocks:  # encode_text finds padding from CLIP's EOT; here BERT ids
            t = blk(t, (~att).float() * -10000.0)
        t = m.text_encoder.fc_norm(t.mean(1))
    assert (v - ft["video_emb"]).abs().max() <= 1e-5 and (t - ft["text_emb"]).abs().max() <= 1e-5
    assert abs(m.contrastive_loss(t, v).item() - ft["loss"]) <= 1e-5 * ft["loss"]
