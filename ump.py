"""ump.py: UMP, unified modality-aware prompts with a spatial-temporal shift, on a frozen CLIP.

UMP: Unified Modality-aware Prompt Tuning for Text-Video Retrieval (Zhang, Zeng, Gao, Song, Shen;
IEEE TCSVT 2024, IEEE Xplore document 10599510). There is no arXiv version: the README's arXiv link
(2310.08446) points to an unrelated paper. The paper's text was not available to us, so this file follows
its figures (README and assets of the release: Fig. 3 framework, 3a UPG, 3b STS) and the release;
docs/ump.md maps them to the lines below.
Official code: zchoi/UMP_TVR @ 9ec554a (model/clip_model.py `Transformer._prompt` and `forward`,
model/clip_baseline.py, config/all_config.py, run_msrvtt.sh); zchoi/UMP @ 2d65091 holds the same
clip_model.py. The release implements neither component as the figures draw it: its generator
ignores its input, its text prompts sit after EOT under the causal mask, and there is no shift at all.

Faithful to (Fig. 3): CLIP frozen, logit_scale included; a prompt generator (UPG) that turns learnable
seeds into 8 prompts before every layer of both towers; one generator shared by the two towers; a
parameter-free shift (STS) of patch-token channels and prompt groups between neighbouring frames in the
upper K_d video layers, CLS bypassing it; mean pooling of frame CLS embeddings, EOT for text. From the code:
8 prompts, seeds N(0, 1), one nn.TransformerEncoderLayer(nhead=8, FFN 2048, ReLU, dropout 0.1, post-norm)
as generator shared by all layers, video prompts appended after the 50 tokens and dropped after each block.

Deliberate deviations and our decisions:
  1. UPG reads only its own tower's tokens. Fig. 3a feeds the caption AND the video into one generator,
     which makes every embedding depend on the pair (Nt x Nv joint passes at test time); the release never
     mixes modalities either. Text and video therefore encode independently (docs/design.md).
  2. UPG attends over one sample's tokens, so prompts depend on the input (the release's "transformer"
     branch). The release hard-codes its "linear" branch, which feeds a seq-first layer batch-first: the
     attention runs across samples and the prompts are the layer applied to each seed alone, i.e. static.
  3. One generator G and one seed set S_l (8 x 512 per layer) serve both towers, at the text width, with
     Linear 768->512 in and 512->768 out for the video tower (ours: a shared G needs one width; 512 is the
     width of the release's dormant `shared_encoder_layer`). `shared_upg=False` gives one per tower.
  4. G reads the tokens after the frozen `ln_1` of the block about to run (ours): text and video residual
     streams differ in scale by orders of magnitude; the release feeds the raw stream.
  5. Text prompts go in slots 1..8 right after SOT, without positional embedding; words keep positions
     0..L-1 and EOT is read at argmax + 8. The release replaces the last 8 of 77 slots, after EOT, where the
     causal mask hides them: its text embedding equals frozen CLIP's and its text prompts get no gradient.
  6. STS (ours where the figure is silent): residual, only the attention input of the last K_d = 6 video
     layers is shifted (six in-place shifts would compound); patch tokens take channels [0, W/8) from frame
     t-1 and [W/8, W/4) from t+1 (TSM's 1/8); prompts 0..3 come from t-1 and 4..7 from t+1, all channels;
     CLS and every other channel stay; zeros at the clip ends and from padded frames (video_mask=False).
  7. Video = mean over valid frames of the L2-normalised ln_post(CLS) @ proj (the release's
     `clip_baseline` + avg, as the figure); not the release's default X-Pool head (1.32M, query-dependent).
  8. Trainable parameters, ViT-B/32: 3,989,248 (2.64% of CLIP). The paper reports 1.2M; no released
     configuration of an input-conditioned generator reaches that (the release's linear-generator reading
     has 0.98M but static prompts; its exact forward pass, UMPRelease, trains 5.59M).
  9. Recipe: words=32 (release: 77); train.py reports the last epoch, the release picks the best 5-eval
     window on the test split.
`UMPRelease` (after "Reproducing the release" below) is the release's forward pass instead: separate G_t
(width 512) and G_v (768), each applied to its seeds alone and broadcast; video prompts appended at 50..57
and dropped after each block; text zero-padded to CLIP's 77 slots as the release tokenises, the prompts
replacing the last 8 (EOT sees them only when it sits there, where the caption's end is lost); no STS; mean
pooling. One difference stays: in training the release's dropout draws a different mask per sample, ours
one per layer (eval: identical).

Usage:
    model = UMP(clip.load("ViT-B/32"), num_frames=12)     # K_d=0: w/o STS; UMPRelease(...): the release
    t, v = model.encode_text(ids), model.encode_video(frames, frame_mask)      # [B, 512], [B, 512]
    logits = model.logit_scale.exp() * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T
"""
import torch
import torch.nn.functional as F
from torch import nn

import clip

RECIPE = dict(
    lr=3e-5,              # run_msrvtt.sh --noclip_lr=3e-5, one AdamW group (clip_lr unused in the release)
    clip_lr=None,         # no CLIP weight trains
    epochs=5,             # config/all_config.py num_epochs 5
    batch_size=32,        # run_msrvtt.sh --batch_size=32
    frames=12,            # all_config.py num_frames 12 (hard-coded in the release's Transformer too)
    words=32,             # ours (the release tokenises to 77)
    sampling="uniform",   # all_config.py video_sample_type 'uniform', training and test (video_capture.py)
    augment="crop_flip",  # model_transforms.py: RandomResizedCrop(scale 0.5-1) + flip, one draw per clip
    weight_decay=0.2,     # all_config.py weight_decay 0.2 on every trainable tensor (HF AdamW)
    warmup=0.1,           # all_config.py warmup 0.1 of the steps, then per-step cosine (train.py's schedule)
    grad_clip=1.0,        # trainer: clip_grad_norm_(1.0)
    betas=(0.9, 0.999),   # transformers.AdamW defaults
    eps=1e-6,             # transformers.AdamW default
    K_d=6,                # video layers with STS at the top (Fig. 3); 6 of 12 is ours; 0 = "w/o STS"
    n_prompts=8,          # clip_model.py num_prompt = 8, per layer and tower
    upg_condition=True,   # False: G sees its seeds only (the paper's "w/o V in UPG" ablation, ump_vis.pdf)
    d_ff=2048,            # G's FFN width: nn.TransformerEncoderLayer's default, which the release keeps
    shared_upg=True,      # Fig. 3 "unified" prompts: one G and one seed set for both towers (ours: width 512)
)

DATASET_RECIPES = dict()  # the release scripts MSR-VTT only; the synthetic set's recipe: synthetic.RECIPES


# ----------------------------------------------------------------------------------------------------
# Unified Prompt Generation (Fig. 3a): prompts = G([U ; S_l])[:, -Np:]


def prompt_generator(width, d_ff=2048):
    """G: the release's nn.TransformerEncoderLayer(width, nhead=8) (FFN d_ff, ReLU, dropout 0.1, post-norm)."""
    if width % 8:
        raise ValueError(f"the UPG generator has 8 heads; width {width} is not divisible by 8")
    return nn.TransformerEncoderLayer(width, nhead=8, dim_feedforward=d_ff, dropout=0.1, batch_first=True)


def generate_prompts(G, seeds, tokens=None, pad=None):
    """UPG (Fig. 3a): seeds S [Np, D], own-tower tokens U [N, n, D] (or None: seeds only), pad [N, n] bool
    (True = padding, hidden from G) -> prompts [N, Np, D] (or [1, Np, D] without tokens)."""
    Np = seeds.shape[0]
    if tokens is None:
        return G(seeds.unsqueeze(0))  # [1, Np, D]
    N = tokens.shape[0]
    x = torch.cat([tokens, seeds.to(tokens.dtype).expand(N, -1, -1)], dim=1)  # [N, n+Np, D]
    if pad is not None:
        pad = torch.cat([pad, pad.new_zeros(N, Np)], dim=1)  # [N, n+Np], the seeds are never padding
    # Plain form: G(x, src_key_padding_mask=pad)[:, -Np:]. The fast form below computes the seed rows only;
    # tests/test_ump.py::test_generator_seed_rows_equal_the_full_encoder_layer pins the two equal.
    return encoder_layer_last_rows(G, x, pad, Np)  # [N, Np, D]


def encoder_layer_last_rows(G, x, pad, k):
    """G(x, src_key_padding_mask=pad)[:, -k:] for a post-norm nn.TransformerEncoderLayer, computed for the
    last k rows only (ours, same function): every row is a key and a value, but only the k seed rows need a
    query, the output projection, the FFN and the norms. The token rows' outputs would be discarded: at
    ViT-B/32 computing them nearly tripled what the generator and its bridge cost (189 vs 67 GFLOP per clip
    and training step, counted)."""
    if G.norm_first:
        raise ValueError("encoder_layer_last_rows follows the post-norm layer (norm_first=False) of the release")
    attn, (N, n, D), h = G.self_attn, x.shape, G.self_attn.num_heads
    w_q, w_kv = attn.in_proj_weight.split([D, 2 * D])
    b_q, b_kv = attn.in_proj_bias.split([D, 2 * D])
    heads = lambda t: t.unflatten(-1, (h, D // h)).transpose(1, 2)  # [N, m, D] -> [N, h, m, D/h]
    q = heads(F.linear(x[:, -k:], w_q, b_q))  # [N, h, k, D/h]
    key, value = map(heads, F.linear(x, w_kv, b_kv).chunk(2, dim=-1))  # [N, h, n, D/h] each
    mask = None if pad is None else ~pad[:, None, None, :]  # [N, 1, 1, n], True = attend
    a = clip.sdpa(q, key, value, attn_mask=mask, dropout_p=attn.dropout if G.training else 0.0)
    y = G.norm1(x[:, -k:] + G.dropout1(attn.out_proj(a.transpose(1, 2).flatten(2))))  # [N, k, D]
    return G.norm2(y + G.dropout2(G.linear2(G.dropout(G.activation(G.linear1(y))))))  # [N, k, D]


# ----------------------------------------------------------------------------------------------------
# Spatial-Temporal Shift (Fig. 3b), parameter-free


def spatial_temporal_shift(z, video_mask, n_tokens):
    """z [B, T, n_tokens + Np, W] (CLS, patches, prompts), video_mask [B, T] bool -> same shape.

    Patch tokens take channels [0, W/8) from frame t-1 and [W/8, W/4) from frame t+1; the first Np//2
    prompts come from frame t-1 and the others from t+1 (all channels); CLS and the other channels stay.
    The clip ends and padded frames contribute zeros.
    """
    fold, half = z.shape[-1] // 8, n_tokens + (z.shape[2] - n_tokens) // 2
    src = z * video_mask[:, :, None, None].to(z.dtype)  # padded frames send zeros
    zero = torch.zeros_like(src[:, :1])  # [B, 1, N, W]
    prev = torch.cat([zero, src[:, :-1]], dim=1)  # [B, T, N, W]: frame t-1 at t, zeros at t = 0
    nxt = torch.cat([src[:, 1:], zero], dim=1)  # [B, T, N, W]: frame t+1 at t, zeros at t = T-1
    out = z.clone()
    out[:, :, 1:n_tokens, :fold] = prev[:, :, 1:n_tokens, :fold]
    out[:, :, 1:n_tokens, fold:2 * fold] = nxt[:, :, 1:n_tokens, fold:2 * fold]
    out[:, :, n_tokens:half] = prev[:, :, n_tokens:half]
    out[:, :, half:] = nxt[:, :, half:]
    return out


# ----------------------------------------------------------------------------------------------------
# UMP (Fig. 3): frozen CLIP, UPG before every layer of both towers, STS in the last K_d video layers


class UMP(nn.Module):
    # train.py's method contract (docs/design.md)
    uses_clip = True  # built as UMP(clip_model, num_frames, **kwargs)
    normalize_pixels = staticmethod(clip.normalize_pixels)  # uint8 frames -> CLIP's input statistics
    similarity = None  # the loop's cosine of the pooled embeddings x logit_scale

    def __init__(self, clip_model, num_frames, *, K_d=6, n_prompts=8, upg_condition=True, shared_upg=True,
                 d_ff=2048):
        super().__init__()
        self.clip, self.num_frames = clip_model, num_frames
        for p in self.clip.parameters():
            p.requires_grad_(False)  # frozen backbone (Fig. 3); logit_scale too (release: 100, never trained)
        Lv, Lt = len(self.clip.visual.transformer.resblocks), len(self.clip.transformer.resblocks)
        Dv, Dt = self.clip.visual.transformer.width, self.clip.transformer.width
        if not 0 <= K_d <= Lv:
            raise ValueError(f"K_d={K_d}: STS runs in the last K_d of the {Lv} video layers, so 0 <= K_d <= {Lv}")
        if n_prompts < 1:
            raise ValueError(f"n_prompts={n_prompts}: UMP needs at least one prompt per layer")
        self.K_d, self.n_prompts, self.upg_condition, self.shared_upg = K_d, n_prompts, upg_condition, shared_upg
        if shared_upg:  # deviation 3: G, S_l [Np, Dt] for both towers; the video tower goes through 512
            self.upg = prompt_generator(Dt, d_ff)
            self.prompts = nn.Parameter(torch.randn(max(Lt, Lv), n_prompts, Dt))  # [L, Np, Dt], N(0, 1) as randn
            # video tokens into G's width, only where G reads them (an unused tensor would stall DDP's reduction)
            self.video_in = nn.Linear(Dv, Dt) if upg_condition else None
            self.video_out = nn.Linear(Dt, Dv)
        else:  # one generator and seed set per tower, at its own width (the release's layout)
            self.upg = prompt_generator(Dt, d_ff)
            self.prompts = nn.Parameter(torch.randn(Lt, n_prompts, Dt))  # release: learnable_prompt
            self.upg_video = prompt_generator(Dv, d_ff)
            self.prompts_video = nn.Parameter(torch.randn(Lv, n_prompts, Dv))  # release: learnable_prompt_video

    @property
    def logit_scale(self):  # CLIP's temperature, frozen (a property, so state_dict holds it once)
        return self.clip.logit_scale

    def param_groups(self, weight_decay):
        """One AdamW group with decay on every trainable tensor, biases and seeds included (release, HF AdamW)."""
        return [dict(params=[p for p in self.parameters() if p.requires_grad], weight_decay=weight_decay)]

    # ------------------------------------------------------------------------------------------------
    # Text tower (Fig. 3, top)

    def text_prompts(self, w, block, l, pad):
        """UPG for the text tower: words w [N, L, Dt], pad [N, L] -> layer l's prompts [N, Np, Dt]."""
        U = block.ln_1(w) if self.upg_condition else None  # deviation 4: G reads the normalised stream
        return generate_prompts(self.upg, self.prompts[l], U, pad).expand(w.shape[0], -1, -1)

    def text_layer(self, block, w, P):
        """One text block with the prompts P [N, Np, Dt] after SOT (deviation 5): w [N, L, Dt] -> [N, L, Dt]."""
        x = torch.cat([w[:, :1], P, w[:, 1:]], dim=1)  # [N, L+Np, Dt]: SOT, prompts, words
        x = block(x, is_causal=True)
        return torch.cat([x[:, :1], x[:, 1 + P.shape[1]:]], dim=1)  # [N, L, Dt]: this layer's prompts discarded

    def encode_text(self, text):
        """Token ids [N, L] (SOT first, EOT = largest id) -> [N, E] at EOT."""
        if text.dim() != 2:
            raise ValueError(f"encode_text expects token ids [N, L], got shape {tuple(text.shape)}")
        N, L = text.shape
        eot = text.argmax(dim=-1)  # EOT has the largest id; argmax returns the first one
        pad = torch.arange(L, device=text.device)[None] > eot[:, None]  # [N, L], True after EOT
        w = self.clip.embed_text(text)  # [N, L, Dt]: words with positions 0..L-1
        blocks = self.clip.transformer.resblocks
        layer = lambda w, block, l: self.text_layer(block, w, self.text_prompts(w, block, l, pad))
        for l, block in enumerate(blocks):  # each block and its prompts checkpointed under --grad_checkpointing
            w = clip.checkpointed(blocks, layer, w, block, l)
        return self.clip.text_head(w[torch.arange(N, device=text.device), eot])  # = ln_final(x)[eot + Np] @ proj

    # ------------------------------------------------------------------------------------------------
    # Video tower (Fig. 3, bottom): UPG before every layer, UPG + STS in the last K_d layers

    def video_prompts(self, x, block, l):
        """UPG for the video tower: frame tokens x [BT, n, Dv] -> layer l's prompts [BT, Np, Dv], each frame's
        from its own tokens."""
        U = block.ln_1(x) if self.upg_condition else None  # [BT, n, Dv]
        if not self.shared_upg:
            return generate_prompts(self.upg_video, self.prompts_video[l], U).expand(x.shape[0], -1, -1)
        U = None if U is None else self.video_in(U)  # [BT, n, Dt]: into G's width
        return self.video_out(generate_prompts(self.upg, self.prompts[l], U)).expand(x.shape[0], -1, -1)

    def encode_frames(self, video, video_mask):
        """Frames [B, T, 3, H, W], video_mask [B, T] -> per-frame ln_post(CLS) @ proj [B, T, E]."""
        B, T = video.shape[:2]
        x = self.clip.visual.embed(video.flatten(0, 1))  # [BT, n, Dv], n = 1 + g*g (CLS first)
        n = x.shape[1]
        blocks = self.clip.visual.transformer.resblocks

        def layer(x, block, l):  # one block and its prompts: what --grad_checkpointing reruns in backward
            z = torch.cat([x, self.video_prompts(x, block, l)], dim=1)  # [BT, n+Np, Dv], prompts at n..n+Np-1
            if l >= len(blocks) - self.K_d and T > 1:  # deviation 6: residual STS, the attention reads shifted tokens
                zs = spatial_temporal_shift(z.view(B, T, n + self.n_prompts, -1), video_mask, n)
                z = z + block.attention(zs.flatten(0, 1))  # [BT, n+Np, Dv]
            else:
                z = z + block.attention(z)
            z = z + block.feed_forward(z)
            return z[:, :n]  # [BT, n, Dv]: the prompt outputs are dropped (release)

        for l, block in enumerate(blocks):
            x = clip.checkpointed(blocks, layer, x, block, l)
        return self.clip.visual.head(x[:, 0]).view(B, T, -1)  # [B, T, E]

    def encode_video(self, video, video_mask):
        """Frames [B, T, 3, H, W] (CLIP-normalised), video_mask [B, T] bool -> [B, E]: mean over valid frames
        of the L2-normalised frame embeddings (deviation 7)."""
        if video.dim() != 5 or video_mask.shape != video.shape[:2]:
            raise ValueError(f"encode_video expects video [B, T, 3, H, W] and video_mask [B, T], got "
                             f"{tuple(video.shape)} and {tuple(video_mask.shape)}")
        frames = F.normalize(self.encode_frames(video, video_mask), dim=-1)  # [B, T, E]
        m = video_mask.to(frames.dtype).unsqueeze(-1)  # [B, T, 1]
        return (frames * m).sum(1) / m.sum(1).clamp(min=1)


# ---- Reproducing the release ------------------------------------------------------------------------
# zchoi/UMP_TVR's forward pass, for comparison with the official code (docstring, last paragraph)


def official_prompts(G, seeds):
    """The release's "linear" branch: a seq-first layer fed batch-first attends across samples that all hold
    the same seed, which equals G applied to each seed token alone. [Np, D] -> [1, Np, D]."""
    return G(seeds.unsqueeze(1)).transpose(0, 1)  # [Np, 1, D]: Np sequences of length 1 -> [1, Np, D]


class UMPRelease(UMP):
    """The release: one G and seed set per tower, static prompts, text prompts in the last Np of CLIP's
    context slots, no STS (K_d = 0). K_d, upg_condition and shared_upg are accepted, so that RECIPE fits,
    and ignored: the release has none of them."""

    def __init__(self, clip_model, num_frames, *, n_prompts=8, d_ff=2048, K_d=None, upg_condition=None,
                 shared_upg=None):
        if clip_model.context_length <= n_prompts:
            raise ValueError(f"UMPRelease: a context of {clip_model.context_length} text slots leaves no room "
                             f"for {n_prompts} tail prompts")
        super().__init__(clip_model, num_frames, K_d=0, n_prompts=n_prompts, upg_condition=False,
                         shared_upg=False, d_ff=d_ff)

    def text_prompts(self, w, block, l, pad):
        return official_prompts(self.upg, self.prompts[l]).expand(w.shape[0], -1, -1)  # [N, Np, Dt], static

    def text_layer(self, block, w, P):
        """The prompts replace the last Np slots (after EOT, behind the causal mask) and stay there."""
        return block(torch.cat([w[:, :-P.shape[1]], P], dim=1), is_causal=True)  # [N, L, Dt]

    def video_prompts(self, x, block, l):
        return official_prompts(self.upg_video, self.prompts_video[l]).expand(x.shape[0], -1, -1)  # static

    def encode_text(self, text):
        """The release tokenises to CLIP's context length (77) and its prompts replace the last 8 of those
        slots: shorter ids are zero-padded to it, which makes the output equal the release's for any L."""
        if text.dim() == 2 and text.shape[1] < self.clip.context_length:
            text = F.pad(text, (0, self.clip.context_length - text.shape[1]))  # [N, 77]: zeros, as the release
        return super().encode_text(text)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = UMP(clip.CLIP(**clip.CONFIGS["tiny"]), 4, K_d=1).eval()
    ids = clip.tokenize(["a red square moves left", "a blue circle grows"], context_length=16)
    video, mask = torch.randn(2, 4, 3, 32, 32), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        print("tiny: text", tuple(model.encode_text(ids).shape), "video", tuple(model.encode_video(video, mask).shape))
    with torch.device("meta"):  # ViT-B/32 shapes without weights
        vitb32 = clip.CLIP(**clip.CONFIGS["ViT-B/32"])
        frozen = sum(p.numel() for p in vitb32.parameters())
        for name, m in [("UMP (default)", UMP(vitb32, 12)), ("UMPRelease", UMPRelease(vitb32, 12)),
                        ("UMP(shared_upg=False)", UMP(vitb32, 12, shared_upg=False))]:
            n = clip.count_trainable(m)
            print(f"ViT-B/32 {name}: trainable {n:,} ({100 * n / frozen:.2f}% of CLIP {frozen:,})")
            if isinstance(m, UMPRelease):
                video = sum(p.numel() for p in [*m.upg_video.parameters(), m.prompts_video])
                print(f"  {video:,} of them are video (G_v + seeds); the text part gets no gradient")
