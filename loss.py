"""loss.py: what train.py minimises. Symmetric InfoNCE over the global batch, the features of every rank
gathered first by an all-gather whose backward sums the gradient over the ranks (train.py deviation 1: N
ranks give the one-process gradient), and the one forward DDP sees (both encoders, or SimVTP's pretraining)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import retrieval


class GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gathered batch's gradient over the ranks and keeps this rank's rows
    (torch.distributed.nn's all_gather does the same and is deprecated)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's rows
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(x):
    """Concatenate x from every rank in rank order; differentiable, the backward sums gradients."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    y = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()  # gloo has no bool
    return GatherWithGrad.apply(y).to(x.dtype)


def contrastive_loss(method, text, video, video_mask):
    """Symmetric InfoNCE over the global batch: features of every rank gathered first."""
    logits = retrieval.similarity(method, gather(text), gather(video), gather(video_mask))  # [B_global, B_global]
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class Forward(nn.Module):
    """One forward for DDP (it must see forward() to reduce gradients): both encoders, or SimVTP's pretraining."""

    def __init__(self, method, pretrain=False):
        super().__init__()
        self.method, self.pretrain = method, pretrain

    def forward(self, text, video, video_mask):
        if self.pretrain:
            return self.method.pretraining_loss(video, video_mask, text)
        return self.method.encode_text(text), self.method.encode_video(video, video_mask)
