"""unipt.py: UniPT, a parallel side network beside a frozen CLIP (CLIP4Clip meanP head).

UniPT: Universal Parallel Tuning for Transfer Learning with Efficient Parameter and Memory
(Diao, Wan, Zhang, Jia, Lu, Chen; CVPR 2024), arXiv:2308.14316.
Official code: Paranioar/UniPT @ 3fa457d (CLIP4Clip/modules/module_adapter.py `Our_tuning_for_transformer`,
called from CLIP4Clip/modules/modeling.py L251-261, get_sequence_output / get_visual_output).
Only the paper's abstract and Fig. 2 caption were readable, so the equations below follow the official
CLIP4Clip code; docs/unipt.md maps it to the lines below.

Faithful to: CLIP frozen and run once without a graph; 13 taps per tower (embedding stage + every block
output); per-tap ReLU->Linear projections attended by the projected final embedding with ReLU + L1
weights (no softmax, no scaling) plus the same-position token; a shared gate scoring q * mean(X_l), softmax
over layers; output = frozen embedding + ReLU->Linear(sum); PyTorch's default Linear init (the model does
not start as the identity); CLIP's logit_scale frozen; meanP pooling; the official parameter names, so the
authors' `image_adapter.*` / `text_adapter.*` checkpoint keys load unchanged (strict).

Deliberate deviations:
  1. Text padding comes from the EOT position (token positions <= argmax(ids) are valid). The release
     uses `ids != 0`, but id 0 is "!" in CLIP's BPE, so a "!" inside a caption was masked out.
     Identical for captions without "!".
  2. The 13 down-projections run as one batched matmul over their stacked weights instead of a Python
     loop (same parameters and key names, same numbers); tap count and widths come from the CLIP config
     instead of the hard-coded 13 / 768 / 512, so other ViT sizes work.
  3. Precision: the release keeps CLIP's weights in fp16; here CLIP keeps whatever dtype it has (fp32 from
     clip.load, the caller may autocast) and the side network always runs in fp32 with autocast disabled
     (the release's adapters are fp32 too).
  4. Optimiser and schedule are train.py's AdamW + warmup/cosine rather than CLIP4Clip's BertAdam (no bias
     correction, per-tensor clipping); weight decay on weights only, as BertAdam's bias rule.
  5. Frames: CLIP4Clip's rule (`sampling="clip4clip"`: 1 frame/s, 12 spread, the same every epoch) on the source
     video; the release's script reads its 3 fps re-encode with the same rule, which picks the same seconds.

Usage:
    model = UniPT(clip.load("ViT-B/32"), num_frames=12)
    t, v = model.encode_text(ids), model.encode_video(frames, frame_mask)      # [B, 512], [B, 512]
    logits = model.logit_scale.exp() * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T
"""
import torch
import torch.nn.functional as F
from torch import nn

import clip

RECIPE = dict(
    lr=1e-4,             # train_msrvtt_tuning.sh --lr 1e-4 (all adapter params)
    clip_lr=None,        # no CLIP parameter trains (--coef_lr 1e-3 touches empty groups)
    epochs=5,            # --epochs 5
    batch_size=128,      # --batch_size 128 (4 GPUs x 32)
    frames=12,           # --max_frames 12, --slice_framepos 2
    words=32,            # --max_words 32
    sampling="clip4clip",  # --feature_framerate 1 --slice_framepos 2 (rawvideo_util.py), same frames each epoch
    weight_decay=0.2,    # BertAdam weight_decay 0.2 (0 on biases)
    warmup=0.1,          # --warmup_proportion 0.1, warmup_cosine
    grad_clip=1.0,       # clip_grad_norm_(1.0) in main_task_retrieval.py
    betas=(0.9, 0.98),   # BertAdam b1, b2 in prep_optimizer
    eps=1e-6,            # BertAdam e
    D=1,                 # downsample_D_factor = 1 in modeling.py: side width M = E // D = 512
)

DATASET_RECIPES = dict(
    msvd=dict(),         # train_msvd_tuning.sh uses the MSR-VTT values above
)  # the synthetic set's recipe: synthetic.RECIPES


# ----------------------------------------------------------------------------------------------------
# Frozen CLIP: final embedding (anchor) + token states at every tap


@torch.no_grad()  # not inference_mode: the side network saves ReLU(taps) for its own backward
def frozen_image_taps(model, images):
    """Images [N, 3, H, W] -> (anchor [N, E], taps [L+1, N, S, Wv]); tap 0 is after ln_pre, tap l block l."""
    x = model.visual.embed(images)  # [N, S, Wv], S = 1 + g*g
    taps = [x]
    for block in model.visual.transformer.resblocks:
        x = block(x)
        taps.append(x)
    anchor = model.visual.head(x[:, 0])  # CLS after ln_post @ proj, = encode_image
    return anchor, torch.stack(taps)  # [N, E], [L+1, N, S, Wv]


@torch.no_grad()
def frozen_text_taps(model, text):
    """Ids [N, L] -> (anchor [N, E], taps [L+1, N, L, Wt]); tap 0 is token + position embedding."""
    x = model.embed_text(text)  # [N, L, Wt]
    taps = [x]
    for block in model.transformer.resblocks:
        x = block(x, is_causal=True)
        taps.append(x)
    eot = text.argmax(dim=-1)  # EOT has the largest id; argmax returns the first maximum
    anchor = model.text_head(x[torch.arange(x.shape[0], device=x.device), eot])  # [N, E], = encode_text
    return anchor, torch.stack(taps)  # [N, E], [L+1, N, L, Wt]


# ----------------------------------------------------------------------------------------------------
# Side network: parallel interaction + confidence aggregation (official Our_tuning_for_transformer)


def relu_linear(d_in, d_out):
    # The release writes every projection as Sequential(ReLU, Linear); keeping it keeps the `.1.` key names.
    return nn.Sequential(nn.ReLU(), nn.Linear(d_in, d_out))


class ParallelSideNetwork(nn.Module):
    """One per tower. taps [L+1, N, S, H], anchor [N, E], mask [N, S] bool or None, position [N] -> [N, E]."""

    def __init__(self, num_taps, width, embed_dim, D=1):
        super().__init__()
        if embed_dim % D:
            raise ValueError(f"D={D} must divide the embedding width {embed_dim}")
        M = embed_dim // D
        self.downsample_layers = nn.ModuleList([relu_linear(width, M) for _ in range(num_taps)])  # phi_l
        self.downsample_layer = relu_linear(embed_dim, M)  # projects the anchor
        self.upsample_layer = relu_linear(M, embed_dim)
        self.gate_layer = nn.Linear(M, 1)  # theta, shared by all layers

    def forward(self, taps, anchor, mask=None, position=None):
        """Returns (output [N, E], layer confidences c [N, L+1])."""
        with torch.autocast(taps.device.type, enabled=False):  # side network in fp32, as the release
            taps, anchor = taps.float(), anchor.float()
            if taps.shape[0] != len(self.downsample_layers):
                raise ValueError(f"got {taps.shape[0]} taps, the side network was built for {len(self.downsample_layers)}")
            # step 1: q = W_a ReLU(a) + b_a
            q = self.downsample_layer(anchor)  # [N, M]
            # step 2: X_l = W_l ReLU(h_l) + b_l, all l in one batched matmul. Plain form, the release's loop:
            # torch.stack([phi(h) for phi, h in zip(self.downsample_layers, taps)]); the oracle test
            # tests/test_unipt.py::test_side_network_matches_official pins this form to the release's
            W = torch.stack([p[1].weight for p in self.downsample_layers])  # [L+1, M, H]
            b = torch.stack([p[1].bias for p in self.downsample_layers])  # [L+1, M]
            L1, N, S, H = taps.shape
            X = torch.baddbmm(b[:, None], taps.relu().reshape(L1, N * S, H), W.transpose(1, 2))  # [L+1, N*S, M]
            X = X.view(L1, N, S, -1)  # [L+1, N, S, M]
            m = X.new_ones(N, S) if mask is None else mask.to(X.dtype)  # [N, S], 1 = valid token
            # (matmuls on X as stored below: an einsum over n saved a permuted copy of X, +39% activation
            # memory, and X * m would make a transient copy of X)
            # step 3: layer summary = (masked) mean over tokens; vision: plain mean, CLS included
            x_bar = (m[:, None] @ X).squeeze(2) / m.sum(1).clamp(min=1.0)[:, None]  # [L+1, N, 1, M] -> [L+1, N, M]
            # step 4: interaction weights alpha = L1(ReLU((X_l q) * m)), no softmax, no 1/sqrt(d)
            r = torch.relu((X @ q[:, :, None]).squeeze(-1) * m)  # [L+1, N, S, 1] -> [L+1, N, S]
            alpha = r / r.sum(-1, keepdim=True).clamp(min=1e-6)  # r >= 0 so |r| = r; all <= 0 gives alpha = 0
            # step 5: y_l = sum_s alpha_s X_l,s + X_l,p (same-position token: CLS for vision, EOT for text)
            p = torch.zeros(N, dtype=torch.long, device=X.device) if position is None else position
            y = (alpha[:, :, None] @ X).squeeze(2)  # [L+1, N, 1, S] @ [L+1, N, S, M] -> [L+1, N, M]
            y = y + X[:, torch.arange(N, device=X.device), p]  # [L+1, N, M]
            # step 6: confidence c = softmax over layers of theta(q * x_bar_l)
            c = self.gate_layer(q * x_bar).squeeze(-1).softmax(dim=0)  # [L+1, N]
            # step 7: output = a + W_u ReLU(sum_l c_l y_l) + b_u (residual on the frozen embedding)
            z = (c[:, :, None] * y).sum(0)  # [N, M]
            return anchor + self.upsample_layer(z), c.t()  # [N, E], [N, L+1]


# ----------------------------------------------------------------------------------------------------
# The method: frozen CLIP + one side network per tower, CLIP4Clip meanP


class UniPT(nn.Module):
    # train.py's method contract (docs/design.md)
    uses_clip = True  # built as UniPT(clip_model, num_frames, **kwargs)
    normalize_pixels = staticmethod(clip.normalize_pixels)  # uint8 frames -> CLIP's input statistics
    similarity = None  # the loop's cosine of the pooled embeddings x logit_scale

    def __init__(self, clip_model, num_frames, *, D=1):
        super().__init__()
        self.clip = clip_model.requires_grad_(False)  # everything in CLIP is frozen, logit_scale included
        self.num_frames = num_frames
        E = clip_model.text_projection.shape[1]
        vision, text = clip_model.visual.transformer, clip_model.transformer
        self.image_adapter = ParallelSideNetwork(vision.layers + 1, vision.width, E, D)
        self.text_adapter = ParallelSideNetwork(text.layers + 1, text.width, E, D)

    @property
    def logit_scale(self):
        return self.clip.logit_scale  # frozen: exp = 100 for the released weights

    def text_mask(self, text):
        """Valid tokens = positions up to and including EOT (deviation 1; the release used ids != 0)."""
        eot = text.argmax(dim=-1)  # [N]
        return torch.arange(text.shape[1], device=text.device)[None] <= eot[:, None], eot  # [N, L] bool, [N]

    def encode_text(self, text):
        if text.dim() != 2 or text.dtype.is_floating_point:
            raise ValueError(f"text must be integer token ids [B, L], got {tuple(text.shape)} {text.dtype}")
        text = text.long()
        anchor, taps = frozen_text_taps(self.clip, text)  # [B, E], [Lt+1, B, L, Wt]
        mask, eot = self.text_mask(text)
        return self.text_adapter(taps, anchor, mask, eot)[0]  # [B, E]

    def encode_frames(self, video):
        """Video [B, T, 3, H, W] -> per-frame UniPT embeddings [B, T, E] (unnormalised)."""
        B, T = video.shape[:2]
        anchor, taps = frozen_image_taps(self.clip, video.flatten(0, 1))  # [B*T, E], [Lv+1, B*T, S, Wv]
        return self.image_adapter(taps, anchor)[0].view(B, T, -1)  # vision: no token mask, CLS residual

    def encode_video(self, video, video_mask):
        if video.dim() != 5 or video_mask.shape != video.shape[:2]:
            raise ValueError(f"expected video [B, T, 3, H, W] and video_mask [B, T], got "
                             f"{tuple(video.shape)} and {tuple(video_mask.shape)}")
        frames = F.normalize(self.encode_frames(video), dim=-1)  # [B, T, E], meanP normalises each frame
        m = video_mask.to(frames.dtype)[:, :, None]  # [B, T, 1]; padded frames are encoded, then dropped
        return (frames * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, E]; the loop's normalise completes meanP

    def param_groups(self, weight_decay):
        """BertAdam's grouping: decay on weights, none on biases (CLIP4Clip prep_optimizer)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [dict(params=[p for p in params if p.dim() > 1], weight_decay=weight_decay),
                dict(params=[p for p in params if p.dim() <= 1], weight_decay=0.0)]


if __name__ == "__main__":
    torch.manual_seed(0)
    model = UniPT(clip.CLIP(**clip.CONFIGS["tiny"]), num_frames=3)
    ids = clip.tokenize(["a red circle moves to the left", "a blue square grows!"], context_length=12)
    video, mask = torch.randn(2, 3, 3, 32, 32), torch.tensor([[True, True, True], [True, True, False]])
    t, v = model.encode_text(ids), model.encode_video(video, mask)
    count = clip.count_trainable
    print(f"tiny: text {tuple(t.shape)} video {tuple(v.shape)} trainable {count(model):,}")
    with torch.device("meta"):  # ViT-B/32 shapes without weights
        b32 = UniPT(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), num_frames=12)
    print(f"ViT-B/32: trainable {count(b32):,} (video {count(b32.image_adapter):,}, "
          f"text {count(b32.text_adapter):,}), frozen CLIP {sum(p.numel() for p in b32.clip.parameters()):,}")
