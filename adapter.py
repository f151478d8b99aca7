"""adapter.py: Cross-Modal Adapter, bottleneck adapters with an up-projection shared by both CLIP towers.

Cross-Modal Adapter for Text-Video Retrieval (Jiang, Zhang, Huang, Ge, Ni, Lu, Zhou, Song, Huang;
arXiv:2211.09623 v1, Pattern Recognition 2025). Official code: LeapLabTHU/Cross-Modal-Adapter @ 07b2203
(modules/module_clip_jointvt_upshare_adapter.py, adapter_controller.py, modeling_jointvt_upshare_adapter.py,
optimization.py, train.py); docs/adapter.md maps them to the lines below.

Faithful to (v1 §3, release): CLIP entirely frozen, logit_scale included (exp = 100 for OpenAI's weights).
Every block of both towers gets two adapters, on the attention and on the MLP sublayer's output, added before
the block's residual: x + (h + u). Adapter: Linear(d -> r) -> QuickGELU -> Linear(r -> d - d_s) for the tower
alone, concatenated with Linear(r -> d_s) from ONE tensor shared by the vision and text adapter at the same
depth and sublayer (the shared channels are the LAST d_s in both towers). Down-projections are never shared;
sharing is the only coupling, so text and video still encode independently. Weights ~ N(0, 0.01^2)
truncated at +-2, biases 0 (so the up-projections are not zero). Frame embedding = ln_post(CLS) @ proj per
frame; the video-text score is the text-conditioned softmax over valid frames (Eq. 7-8, temperature 5) on
unnormalised embeddings, then cosine x exp(logit_scale). Tensor names and layouts follow the release
([2*layers, out, in], slot j = 2*block + (sublayer == mlp)), so its adapter tensors load unchanged.
ViT-B/32, MSR-VTT (r=8, d_s=16): 519,168 trainable parameters.

Deliberate deviations and our decisions:
  1. Precision. The release casts CLIP AND the adapters to fp16 and trains them so, optimizer state included
     (BertAdam's v = 0.02 g^2 underflows for |g| < ~1e-3 and those entries take steps ~ lr*m/eps). Default:
     fp32 adapters (and optimizer state) under the caller's autocast for the frozen towers.
     `CrossModalAdapterRelease` (last section) casts CLIP and the adapters to fp16, runs the towers with
     autocast off and returns fp32 features as the release does; an optimizer built on its parameters (AdamW
     or `BertAdam`) then keeps fp16 state. Which of the two reproduces 45.4 R@1 on MSR-VTT is not measured yet
     (needs a GPU run of each).
  2. Activation: QuickGELU, as the release asserts (v1 §3 says GELU, App. B "a GELU approximation").
  3. Dropout after the activation: v1 App. B says it helps, the release runs with 0. Default 0, `dropout`.
  4. Biases on all three projections (the equations omit them; the paper's parameter counts need them).
  5. The shared slice sits last in both towers (code), not at opposite ends as Fig. 2 draws it.
  6. Recipe from the paper's setting (r=8, d_s=16, lr 1e-5), not the release train.py's defaults
     (share_dim 0, lr 1e-4).
  7. The q-score makes the video vector depend on the caption, so `encode_video` returns per-frame
     embeddings [B, T, D] and `similarity(text, frames, mask)` gives the logits (the contract's similarity
     hook, docs/design.md); `pool="mean"` is the release's q_score=0 path (masked mean of raw frames, then
     cosine) as an ablation.
  8. Optimizer: the release uses BertAdam (Adam without bias correction, decoupled decay added to the update,
     lr 0 at step 0, cosine not re-based after warmup). `BertAdam` (last section) reproduces it, checked on the
     oracle's three steps; train.py trains with AdamW (bias correction changes only the first ~50 steps' size).
  9. Model selection on test (the release reports its best epoch): train.py reports the last epoch. The
     metrics are the release's: its metrics.py is CLIP4Clip's, whose tie rule (a k-way tie with the ground
     truth counts k times) retrieval.py reproduces.
  10. Unequal tower depths (e.g. ViT-L/14: 24 vision vs 12 text blocks) crash the release's constructor; we
      raise a clear error: slot j must exist in both towers to share its tensor.
  11. Dead flags of the release (LN before/after the adapter, non-linearity on the shared path, "Meta"
      hyper-network names) are omitted.
  12. Frames: the release reads 1 frame/s JPEGs made by a tool it does not ship, then spreads 12 (linspace);
      data.py decodes the same seconds from the video (`sampling="clip4clip"`, CLIP4Clip's extractor rule).

Usage:
    model = CrossModalAdapter(clip.load("ViT-B/32"), num_frames=12)                  # r=8, d_s=16
    t, f = model.encode_text(ids), model.encode_video(frames, frame_mask)         # [N, 512], [B, T, 512]
    logits = model.similarity(t, f, frame_mask)                                    # [N, B], x100
"""
import torch
import torch.nn.functional as F
from torch import nn

import clip

RECIPE = dict(
    lr=1e-5,              # v1 App. B and README command: --lr 1e-5 for the adapters
    clip_lr=None,         # nothing of CLIP trains (README passes --clip_lr 1e-7; it acts on no tensor)
    epochs=5,             # v1 App. B, README --epochs 5
    batch_size=128,       # README: 4 GPUs x 32, features all-gathered into one 128 x 128 score matrix
    frames=12,            # README --max_frames 12
    words=32,             # README --max_words 32
    sampling="clip4clip", # README: 1 fps images (fps_1), 12 spread by linspace (dataloader_retrieval_images.py)
    weight_decay=0.2,     # release train.py: 0.2 on adapter weights, 0 on biases (param_groups)
    warmup=0.1,           # BertAdam warmup_cosine, warmup 0.1 of all steps
    grad_clip=1.0,        # release train.py: clip_grad_norm_(1.0) before the step
    betas=(0.9, 0.98),    # release train.py BertAdam b1, b2
    eps=1e-6,             # BertAdam e
    r=8,                  # bottleneck width, v1 Tab. 5 / App. B (MSR-VTT)
    d_s=16,               # shared up-projection channels, v1 App. B (MSR-VTT); 0 = "w/o Share"
    pool="qscore",        # "qscore": Eq. 7-8 text-conditioned softmax over frames; "mean": ablation
    tau=5.0,              # q-score temperature (release --q_score_temp 5)
    dropout=0.0,          # after the activation; release 0 (deviation 3)
)
# v1 App. B. ActivityNet: 20 epochs. Synthetic: the tiny CLIP pretrained on still frames by train.py;
# 3e-3 because 1e-5 moves near-identity adapters of a 64-wide model too little in the few hundred steps
# that fit in minutes on 2 CPU cores (the paper's lr is for 7,030 steps at batch 128 on ViT-B/32), and r=8
# with d_s=8 keeps the bottleneck/shared ratio of MSR-VTT's widths roughly (16/512 vs 8/64 is the closest
# integer that still shares more than a couple of channels).
DATASET_RECIPES = dict(
    didemo=dict(r=8, d_s=8, frames=64, words=64),
    msvd=dict(r=16, d_s=16, frames=12, words=32),
    vatex=dict(r=16, d_s=64, frames=12, words=32),
    activitynet=dict(r=16, d_s=512, frames=64, words=64, epochs=20),
)  # the synthetic set's recipe: synthetic.RECIPES


# ----------------------------------------------------------------------------------------------------
# Sec. 3.2, Eq. 3-6: the adapter (release adapter_controller.call_adapter)


def adapter(h, down_w, down_b, up_w, up_b, share_w, share_b, dropout=0.0, training=False):
    """h [..., d] -> u [..., d]: QuickGELU(h Wd^T + bd) -> [unique (d - d_s) channels ++ shared d_s channels]."""
    z = F.linear(h, down_w, down_b)  # [..., r]
    z = z * torch.sigmoid(1.702 * z)  # QuickGELU (deviation 2)
    z = F.dropout(z, dropout, training)
    parts = []
    if up_w is not None:
        parts.append(F.linear(z, up_w, up_b))  # [..., d - d_s], this tower only
    if share_w is not None:
        parts.append(F.linear(z, share_w, share_b))  # [..., d_s], the same tensor in both towers
    return torch.cat(parts, dim=-1)  # [..., d]: shared slice last (deviation 5)


# ----------------------------------------------------------------------------------------------------
# Fig. 2: two adapters in every frozen block, on the attention and on the MLP sublayer's output


def adapted_blocks(x, blocks, adapt, is_causal=False):
    """Frozen pre-LN blocks, x [n, N, d] -> [n, N, d]: x + (h + adapt(h, j)) after each sublayer, where h is the
    sublayer's output and slot j = 2i after the attention, 2i + 1 after the MLP of block i."""
    def layer(x, block, i):  # one block and its two adapters: what --grad_checkpointing reruns in backward
        h = block.attention(x, is_causal=is_causal)  # attn(ln_1(x)), [n, N, d]
        x = x + (h + adapt(h, 2 * i))  # the adapter's own skip, then the block residual
        h = block.feed_forward(x)  # mlp(ln_2(x))
        return x + (h + adapt(h, 2 * i + 1))

    for i, block in enumerate(blocks):
        x = clip.checkpointed(blocks, layer, x, block, i)
    return x


# ----------------------------------------------------------------------------------------------------
# Sec. 3.3, Eq. 7-8: the video-text score (release CLIP4Clip.q_score and _loose_similarity)


def qscore_similarity(text_feats, video_feats, mask, tau, scale):
    """Raw text [Nt, E], raw frames [Nv, T, E], mask [Nv, T] bool -> logits [Nt, Nv]:
    w = softmax over valid frames of <t, f_k> / tau; v = sum_k w_k f_k; S = scale * cos(t, v)."""
    s = torch.einsum("nd,mtd->nmt", text_feats, video_feats) / tau  # [Nt, Nv, T], raw features
    w = s.masked_fill(~mask[None], float("-inf")).softmax(dim=-1)  # padded frames get weight 0
    v = F.normalize(torch.einsum("nmt,mtd->nmd", w, video_feats), dim=-1)  # [Nt, Nv, E]
    return scale * torch.einsum("nd,nmd->nm", F.normalize(text_feats, dim=-1), v)


def mean_similarity(text_feats, video_feats, mask, scale):
    """The ablation (release q_score=0): v = mean of the valid raw frames; S = scale * cos(t, v) [Nt, Nv]."""
    m = mask.to(video_feats.dtype).unsqueeze(-1)  # [Nv, T, 1]
    v = F.normalize((video_feats * m).sum(1) / m.sum(1), dim=-1)  # [Nv, E]
    return scale * F.normalize(text_feats, dim=-1) @ v.t()


# ----------------------------------------------------------------------------------------------------
# Cross-Modal Adapter


def trunc_normal(*shape, std=0.01):
    """Release init: trunc_normal_(0, std) with bounds +-2 (absolute), i.e. N(0, std^2) in effect."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=std))


class CrossModalAdapter(nn.Module):
    # train.py's method contract (docs/design.md)
    uses_clip = True  # built as CrossModalAdapter(clip_model, num_frames, **kwargs)
    normalize_pixels = staticmethod(clip.normalize_pixels)  # uint8 frames -> CLIP's input statistics
    # similarity: defined below (the release's pooling over frames, given the text)

    def __init__(self, clip_model, num_frames, *, r=8, d_s=16, pool="qscore", tau=5.0, dropout=0.0):
        super().__init__()
        self.clip, self.num_frames = clip_model, num_frames
        for p in self.clip.parameters():
            p.requires_grad_(False)  # all of CLIP, LayerNorms, projections and logit_scale (release train.py)
        Lv, Lt = len(self.clip.visual.transformer.resblocks), len(self.clip.transformer.resblocks)
        Dv, Dt = self.clip.visual.transformer.width, self.clip.transformer.width
        if Lv != Lt:
            raise ValueError(f"the shared up-projection pairs vision and text slots one to one, so both towers "
                             f"need the same depth; got {Lv} vision and {Lt} text blocks (deviation 10)")
        if r < 1 or not 0 <= d_s <= min(Dv, Dt):
            raise ValueError(f"need r >= 1 and 0 <= d_s <= min(widths) = {min(Dv, Dt)}; got r={r}, d_s={d_s}")
        if pool not in ("qscore", "mean"):
            raise ValueError(f"pool must be 'qscore' (Eq. 7-8) or 'mean' (ablation), got {pool!r}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.r, self.d_s, self.pool, self.tau, self.dropout = r, d_s, pool, tau, dropout
        S = 2 * Lv  # slots: 2i = after attention, 2i+1 = after the MLP of block i
        # Release names and layouts: [slots, out, in] weights, [slots, out] biases.
        self.visual_adapter_down_weight = trunc_normal(S, r, Dv)
        self.visual_adapter_down_bias = nn.Parameter(torch.zeros(S, r))
        self.text_adapter_down_weight = trunc_normal(S, r, Dt)
        self.text_adapter_down_bias = nn.Parameter(torch.zeros(S, r))
        for tower, D in (("visual", Dv), ("text", Dt)):  # unique part absent when d_s = width
            w, b = (trunc_normal(S, D - d_s, r), nn.Parameter(torch.zeros(S, D - d_s))) if D > d_s else (None, None)
            setattr(self, f"{tower}_adapter_up_unique_weight", w)
            setattr(self, f"{tower}_adapter_up_unique_bias", b)
        shared = d_s > 0  # d_s = 0: plain independent adapters ("w/o Share", v1 Tab. 2)
        self.vt_adapter_up_share_weight = trunc_normal(S, d_s, r) if shared else None
        self.vt_adapter_up_share_bias = nn.Parameter(torch.zeros(S, d_s)) if shared else None

    @property
    def logit_scale(self):  # CLIP's temperature, frozen (exp = 100 for OpenAI's weights)
        return self.clip.logit_scale

    def param_groups(self, weight_decay):
        """Release train.py: decay on adapter weights, none on adapter biases."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [dict(params=[p for n, p in named if not n.endswith("bias")], weight_decay=weight_decay),
                dict(params=[p for n, p in named if n.endswith("bias")], weight_decay=0.0)]

    def adapt(self, h, tower, j):
        """The adapter of `tower` ("visual"/"text") at slot j on its sublayer's output h [n, N, d] -> u [n, N, d]."""
        w = lambda name: getattr(self, f"{tower}_adapter_{name}")  # noqa: E731
        unique = (None, None) if w("up_unique_weight") is None else (w("up_unique_weight")[j], w("up_unique_bias")[j])
        share = self.vt_adapter_up_share_weight
        shared = (None, None) if share is None else (share[j], self.vt_adapter_up_share_bias[j])
        return adapter(h, w("down_weight")[j], w("down_bias")[j], *unique, *shared,
                       dropout=self.dropout, training=self.training)

    # ------------------------------------------------------------------------------------------------
    # Encoders (independent of each other and of the rest of the batch)

    def encode_text(self, text):
        """Token ids [N, L] (EOT = the largest id) -> raw text embeddings [N, E] at EOT."""
        if text.dim() != 2:
            raise ValueError(f"encode_text expects token ids [N, L], got shape {tuple(text.shape)}")
        x = self.clip.embed_text(text).to(self.clip.dtype)  # [N, L, Dt] in the towers' dtype, as OpenAI's
        x = adapted_blocks(x, self.clip.transformer.resblocks, lambda h, j: self.adapt(h, "text", j), is_causal=True)
        eot = text.argmax(dim=-1)  # EOT has the largest id; argmax returns the first one
        return self.clip.text_head(x[torch.arange(x.shape[0], device=x.device), eot])  # [N, E]

    def encode_video(self, video, video_mask):
        """Frames [B, T, 3, H, W] (CLIP-normalised), video_mask [B, T] bool -> raw frame embeddings
        [B, T, E] (deviation 7: pooling needs the caption, see `similarity`)."""
        if video.dim() != 5 or video_mask.shape != video.shape[:2]:
            raise ValueError(f"encode_video expects video [B, T, 3, H, W] and video_mask [B, T], got "
                             f"{tuple(video.shape)} and {tuple(video_mask.shape)}")
        B, T = video.shape[:2]
        x = self.clip.visual.embed(video.flatten(0, 1))  # [B*T, 1+g*g, Dv], CLS first
        x = adapted_blocks(x, self.clip.visual.transformer.resblocks, lambda h, j: self.adapt(h, "visual", j))
        return self.clip.visual.head(x[:, 0]).view(B, T, -1)  # [B, T, E]: ln_post(CLS) @ proj per frame

    def similarity(self, text_feats, video_feats, video_mask):
        """Raw text [Nt, E], raw frames [Nv, T, E], video_mask [Nv, T] bool -> logits [Nt, Nv] (Eq. 7-8, or the
        mean-pooling ablation). Memory is Nt x Nv x E: evaluate in blocks of texts and videos. Computed in fp32
        with autocast off (bf16 logits of size 100 would carry errors of ~0.4)."""
        if text_feats.dim() != 2 or video_feats.dim() != 3 or video_mask.shape != video_feats.shape[:2]:
            raise ValueError(f"similarity expects text [Nt, E], frames [Nv, T, E], mask [Nv, T]; got "
                             f"{tuple(text_feats.shape)}, {tuple(video_feats.shape)}, {tuple(video_mask.shape)}")
        mask = video_mask.bool()
        # checked where it is free (on a GPU an empty row gives NaN logits, which stop a run)
        if clip.value_checks(mask) and not mask.any(dim=1).all():
            raise ValueError("every video needs at least one valid frame (a row of video_mask is all False)")
        with torch.autocast(text_feats.device.type, enabled=False):  # fp32 scores x100, as the release
            t, f, scale = text_feats.float(), video_feats.float(), self.logit_scale.exp()
            if self.pool == "mean":
                return mean_similarity(t, f, mask, scale)
            return qscore_similarity(t, f, mask, self.tau, scale)


# ----------------------------------------------------------------------------------------------------
# ---- Reproducing the release ----
# Its pure-fp16 setting (deviation 1) and its optimizer (deviation 8). train.py trains CrossModalAdapter
# with AdamW; tests/test_adapter.py checks both of these against the release's behaviour.


def convert_weights_fp16(model):
    """Release convert_weights: Linear/Conv/attention weights, proj, text_projection and the adapter tensors to
    fp16; LayerNorms (run in fp32 anyway), embeddings and logit_scale stay fp32."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if (isinstance(module, (nn.Linear, nn.Conv2d, clip.MultiheadAttention))
                    or name in ("proj", "text_projection") or "adapter" in name):
                p.data = p.data.half()


class CrossModalAdapterRelease(CrossModalAdapter):
    """The release's pure fp16: CLIP and every adapter tensor cast by convert_weights (so an optimizer on them
    keeps fp16 state), the towers run with the caller's autocast off (a bf16 autocast must not recast them),
    features returned as fp32 (release: encode_text(...).float()). Same arguments as CrossModalAdapter."""

    def __init__(self, clip_model, num_frames, **kwargs):
        super().__init__(clip_model, num_frames, **kwargs)
        convert_weights_fp16(self)

    def encode_text(self, text):
        with torch.autocast(self.logit_scale.device.type, enabled=False):
            return super().encode_text(text).float()

    def encode_video(self, video, video_mask):
        with torch.autocast(self.logit_scale.device.type, enabled=False):
            return super().encode_video(video, video_mask).float()


class BertAdam(torch.optim.Optimizer):
    """The release's optimizer (modules/optimization.py; schedule left to the caller): Adam without bias
    correction, decay added to the update: p -= lr * (m / (sqrt(v) + eps) + wd * p).

    State keeps the parameter's dtype (fp16 under CrossModalAdapterRelease, as the release). The learning rate
    is group["lr"] as the caller's schedule sets it; the release's warmup_cosine gives lr 0 at step 0.
    """

    def __init__(self, params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            (b1, b2), eps, wd, lr = group["betas"], group["eps"], group["weight_decay"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = m / (v.sqrt() + eps)
                if wd > 0:
                    update += wd * p
                p.add_(-lr * update)
        return loss


if __name__ == "__main__":  # tiny-config shape check, then the ViT-B/32 count (meta device: no memory)
    torch.manual_seed(0)
    model = CrossModalAdapter(clip.CLIP(**clip.CONFIGS["tiny"]), 4, r=8, d_s=8).eval()
    ids = clip.tokenize(["a red square moves left", "a blue circle"], context_length=16)
    video, mask = torch.randn(3, 4, 3, 32, 32), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    t, f = model.encode_text(ids), model.encode_video(video, mask)
    print("text", tuple(t.shape), "frames", tuple(f.shape), "logits", tuple(model.similarity(t, f, mask).shape))
    print(f"trainable {clip.count_trainable(model):,} of {sum(p.numel() for p in model.parameters()):,}")
    with torch.device("meta"):  # ViT-B/32 shapes without allocating them
        b32 = CrossModalAdapter(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), 12, r=8, d_s=16)
    print(f"ViT-B/32, MSR-VTT (r=8, d_s=16): {clip.count_trainable(b32):,} trainable")
