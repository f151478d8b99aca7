"""meanp.py: the two baselines every method is measured against, CLIP4Clip's meanP (arXiv:2104.08860).

  ZeroShot  CLIP as released, frozen: each frame through the image tower, the frame features averaged.
            The floor: a method that does not beat it has learnt nothing.
  MeanP     the same pooling with CLIP fine-tuned end to end: CLIP4Clip's "meanP" (sim_header meanP),
            the ceiling a parameter-efficient method tries to reach with far fewer trainable tensors.

Pooling as CLIP4Clip's "loose" similarity: frame CLS features are L2-normalised, then averaged over the valid
frames (video_mask); train.py normalises the mean again before the cosine. Parameters named "clip.*" train at
--clip_lr (CLIP4Clip's coef_lr x lr), as CLIP4Clip's two-group BertAdam does.

  python train.py --method zeroshot               # evaluation only
  python train.py --method full                   # the synthetic default; --data msrvtt ... for MSR-VTT
"""
import torch.nn.functional as F
from torch import nn

import clip

# CLIP4Clip's README command for MSR-VTT: --lr 1e-4 --coef_lr 1e-3 (CLIP at 1e-7) --epochs 5 --batch_size 128
# (4 GPUs x 32) --max_frames 12 --max_words 32 --warmup_proportion 0.1; BertAdam weight decay 0.2, b1 0.9,
# b2 0.98, e 1e-6; clip_grad_norm_ 1.0. ZeroShot uses frames, words and batch_size_val only.
RECIPE = dict(lr=1e-4, clip_lr=1e-7, epochs=5, batch_size=128, frames=12, words=32, weight_decay=0.2,
              warmup=0.1, grad_clip=1.0, betas=(0.9, 0.98), eps=1e-6)
# Synthetic set (ours, tuned on 2 CPU cores): a tiny CLIP that knows no motion must learn it in a few hundred
# steps, so CLIP trains at lr 1e-7 x 3000; 8 frames cover the 16-24-frame clips; 3 epochs of the 9,000 pairs
# (843 steps; 5 epochs when the set had 4,500 pairs).
DATASET_RECIPES = dict(synthetic=dict(clip_lr=3e-4, epochs=3, batch_size=32, frames=8))


class MeanP(nn.Module):
    """Frame CLS features, L2-normalised, masked mean over frames; every CLIP tensor trains (train_clip)."""

    # train.py's method contract (docs/design.md)
    uses_clip = True  # built as MeanP(clip_model, num_frames, **kwargs)
    normalize_pixels = staticmethod(clip.normalize_pixels)  # uint8 frames -> CLIP's input statistics
    similarity = None  # the loop's cosine of the pooled embeddings x logit_scale

    def __init__(self, clip_model, num_frames, *, train_clip=True):
        super().__init__()
        self.clip, self.num_frames = clip_model.requires_grad_(train_clip), num_frames

    @property
    def logit_scale(self):
        return self.clip.logit_scale

    def param_groups(self, weight_decay):
        """Decay on matrices only (not biases, LayerNorms, embeddings, logit_scale); CLIP's tensors at clip_lr."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
        return [dict(params=decay, weight_decay=weight_decay, clip=True),
                dict(params=rest, weight_decay=0.0, clip=True)]

    def encode_text(self, text):
        return self.clip.encode_text(text)

    def encode_video(self, video, video_mask):
        B, T = video_mask.shape
        f = F.normalize(self.clip.encode_image(video.flatten(0, 1)).view(B, T, -1), dim=-1)  # [B, T, E]
        m = video_mask.unsqueeze(-1).to(f.dtype)  # [B, T, 1]
        return (f * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, E]


class ZeroShot(MeanP):
    """CLIP frozen: nothing trains, train.py evaluates it as it is."""

    def __init__(self, clip_model, num_frames):
        super().__init__(clip_model, num_frames, train_clip=False)
