"""meanp.py: the two baselines every method is measured against, CLIP4Clip's meanP (arXiv:2104.08860).

  ZeroShot  CLIP as released, frozen: each frame through the image tower, the frame features averaged.
            The floor: a method that does not beat it has learnt nothing.
  MeanP     the same pooling with CLIP fine-tuned end to end: CLIP4Clip's "meanP" (sim_header meanP),
            the ceiling a parameter-efficient method tries to reach with far fewer trainable tensors.

Pooling as CLIP4Clip's "loose" similarity: frame CLS features are L2-normalised, then averaged over the valid
frames (video_mask); train.py normalises the mean again before the cosine. Parameters named "clip.*" train at
--clip_lr (CLIP4Clip's coef_lr x lr), as CLIP4Clip's two-group BertAdam does.

What trains follows CLIP4Clip's --freeze_layer_num rule (main_task_retrieval.py), whose default 0 is the one its
published runs use: the output ends (ln_final, text_projection, logit_scale, visual.ln_post, visual.proj) always
train; a residual block of either tower trains when its index is >= freeze_layer_num; every other CLIP tensor
(token_embedding, positional_embedding, visual.class_embedding, visual.positional_embedding, visual.conv1,
visual.ln_pre) is frozen. So 0 freezes the embeddings and the patch stem only, k in 1..layers also freezes the
first k blocks of each tower, and -1 trains every tensor (CLIP4Clip's "no freezing"). ViT-B/32: 0 trains
123,540,993 of its 151,277,313 parameters (the frozen ones are 25.3M of token embedding, 2.4M of conv1
and 0.08M of positions, class embedding and ln_pre), -1 all of them, 12 only the output ends (657,921).

  python train.py --method zeroshot               # evaluation only
  python train.py --method full                   # the synthetic default; --data msrvtt ... for MSR-VTT
  python meanp.py                                 # trainable counts of both at ViT-B/32
"""
import torch
import torch.nn.functional as F
from torch import nn

import clip

# CLIP4Clip's README command for MSR-VTT: --lr 1e-4 --coef_lr 1e-3 (CLIP at 1e-7) --epochs 5 --batch_size 128
# (4 GPUs x 32) --max_frames 12 --max_words 32 --warmup_proportion 0.1; BertAdam weight decay 0.2, b1 0.9,
# b2 0.98, e 1e-6; clip_grad_norm_ 1.0. ZeroShot uses frames, words and batch_size_val only.
RECIPE = dict(lr=1e-4, clip_lr=1e-7, epochs=5, batch_size=128, frames=12, words=32, weight_decay=0.2,
              warmup=0.1, grad_clip=1.0, betas=(0.9, 0.98), eps=1e-6,
              sampling="clip4clip",  # --feature_framerate 1 --slice_framepos 2: 1 frame/s, 12 spread, every epoch
              freeze_layer_num=0)  # CLIP4Clip's --freeze_layer_num (its README command's value): see above
DATASET_RECIPES = dict()  # the synthetic set's recipe: synthetic.RECIPES


# ----------------------------------------------------------------------------------------------------
# What trains: CLIP4Clip's --freeze_layer_num rule (main_task_retrieval.py)

# CLIP tensors that always train under CLIP4Clip's rule (name prefixes, as its main_task_retrieval.py tests them)
ALWAYS_TRAINED = ("ln_final.", "text_projection", "logit_scale", "visual.ln_post.", "visual.proj")


def clip4clip_trainable(name, freeze_layer_num):
    """Does CLIP tensor `name` train under CLIP4Clip's --freeze_layer_num rule (-1: everything trains)?"""
    if freeze_layer_num == -1 or name.startswith(ALWAYS_TRAINED):
        return True
    if name.startswith(("visual.transformer.resblocks.", "transformer.resblocks.")):
        return int(name.split(".resblocks.")[1].split(".")[0]) >= freeze_layer_num
    return False


# ----------------------------------------------------------------------------------------------------
# The video vector: CLIP4Clip's parameter-free similarity, meanP (its "loose" type)


def mean_pool(frames, video_mask):
    """L2-normalised frame features [B, T, E], valid frames [B, T] bool -> their masked mean [B, E]."""
    m = video_mask.unsqueeze(-1).to(frames.dtype)  # [B, T, 1]
    return (frames * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, E]; the loop normalises it again


# ----------------------------------------------------------------------------------------------------
# The two baselines


class MeanP(nn.Module):
    """Frame CLS features, L2-normalised, masked mean over frames; CLIP trains by CLIP4Clip's freeze rule."""

    # train.py's method contract (docs/design.md)
    uses_clip = True  # built as MeanP(clip_model, num_frames, **kwargs)
    normalize_pixels = staticmethod(clip.normalize_pixels)  # uint8 frames -> CLIP's input statistics
    similarity = None  # the loop's cosine of the pooled embeddings x logit_scale

    def __init__(self, clip_model, num_frames, *, freeze_layer_num=0, train_clip=True):
        super().__init__()
        layers = max(clip_model.visual.transformer.layers, clip_model.transformer.layers)
        if not -1 <= freeze_layer_num <= layers:  # CLIP4Clip asserts -1 <= k <= 12 (ViT-B's depth)
            raise ValueError(f"freeze_layer_num must be -1 (train all), 0 (CLIP4Clip's default) or up to {layers} "
                             f"(the towers' depth), not {freeze_layer_num}")
        self.clip, self.num_frames = clip_model, num_frames
        for name, p in clip_model.named_parameters():  # train_clip=False: nothing trains (ZeroShot)
            p.requires_grad_(train_clip and clip4clip_trainable(name, freeze_layer_num))

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
        return mean_pool(f, video_mask)


class ZeroShot(MeanP):
    """CLIP frozen: nothing trains, train.py evaluates it as it is."""

    def __init__(self, clip_model, num_frames, *, freeze_layer_num=0):  # shares MeanP's RECIPE: the flag is moot
        super().__init__(clip_model, num_frames, freeze_layer_num=freeze_layer_num, train_clip=False)


if __name__ == "__main__":  # trainable counts at ViT-B/32 (meta device: shapes only, no memory)
    for name, cls in (("full", MeanP), ("zeroshot", ZeroShot)):
        with torch.device("meta"):
            model = cls(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), 12)
        total = sum(p.numel() for p in model.parameters())
        print(f"ViT-B/32 {name}: {clip.count_trainable(model):,} trainable of {total:,}")
