"""retrieval.py: evaluation of a trained method: encode the test set once, score every caption against every
video, and the metrics of the field (recall@k, median and mean rank) as CLIP4Clip's metrics.py computes them.

  t2v  each caption ranks every video; its rank is the position of the video it describes
  v2t  each video ranks the caption groups (one group per video: multi-caption sets have several), each group
       scored by its best caption
Ties with the ground truth follow CLIP4Clip: a k-way tie at ranks r..r+k-1 adds all k ranks (each counted
once per query in the median/mean), so a constant similarity matrix scores at chance, not at R@1 = 100.
"""
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import synthetic

SIM_BLOCK_ELEMENTS = 2 ** 26  # a method's own similarity() sees [texts, videos, T, D] blocks of at most this


def similarity(method, text, video, video_mask):
    """[Nt, D], [Nv, D] (or [Nv, T, D] with method.similarity) -> [Nt, Nv] logits in fp32."""
    if method.similarity is not None:
        return method.similarity(text, video, video_mask).float()
    t, v = F.normalize(text.float(), dim=-1), F.normalize(video.float(), dim=-1)
    return method.logit_scale.exp().float() * t @ v.T


def ranks_of(sim, gt):
    """sim [Nq, Nc], gt [Nq] -> 1-based ranks; a k-way tie with the ground truth adds k entries r..r+k-1."""
    score = sim[torch.arange(len(sim)), gt].unsqueeze(1)
    above, tied = (sim > score).sum(1), (sim == score).sum(1)
    return torch.cat([torch.arange(a + 1, a + t + 1) for a, t in zip(above.tolist(), tied.tolist())]).double()


def summarize(r):
    return {"R@1": 100 * (r <= 1).double().mean().item(), "R@5": 100 * (r <= 5).double().mean().item(),
            "R@10": 100 * (r <= 10).double().mean().item(), "MdR": float(np.median(r.numpy())), "MnR": r.mean().item()}


def retrieval_metrics(sim, caption_video, dsl=False):
    """sim [Nt, Nv] (caption i describes video caption_video[i]) -> {"t2v": ..., "v2t": ...}.
    v2t ranks, for video j, each video's caption group by its best caption's score (multi-caption rule)."""
    sim, cv = sim.double().cpu(), torch.as_tensor(caption_video)
    t2v_sim = v2t_sim = sim
    if dsl:  # CAMoE's dual softmax: reweight by a softmax over the query axis (transductive, off by default)
        t2v_sim, v2t_sim = sim * sim.softmax(0) * len(sim), sim * sim.softmax(1) * sim.shape[1]
    groups = torch.full((sim.shape[1], sim.shape[1]), -math.inf, dtype=sim.dtype).scatter_reduce(
        0, cv[:, None].expand_as(v2t_sim), v2t_sim, "amax")  # [group g, video j]: best caption of g
    return {"t2v": summarize(ranks_of(t2v_sim, cv)),
            "v2t": summarize(ranks_of(groups.T, torch.arange(sim.shape[1])))}


def temporal_pair_accuracy(sim, caption_video, twin):
    """Share (%) of captions whose video scores above its time-reversed twin, twin[j] = the twin of video j
    (a tie counts half): 50 for a model blind to frame order, 100 when order always decides. sim [Nt, Nv]."""
    sim, cv = sim.double().cpu(), torch.as_tensor(caption_video)
    own, other = sim[torch.arange(len(sim)), cv], sim[torch.arange(len(sim)), torch.as_tensor(twin)[cv]]
    return 100 * ((own > other).double() + 0.5 * (own == other).double()).mean().item()


@torch.no_grad()
def evaluate(method, split, args, device, amp):
    """Encode every test text and video once, then the [Nt, Nv] similarity (blockwise for method.similarity)."""
    was_training = method.training
    method.eval()
    kw = dict(frames=args.frames, words=args.words, size=args.size, train=False, frame_cache=args.frame_cache)
    texts, videos, masks = [], [], []
    for mode in ("texts", "videos"):
        ds = data.VideoTextDataset(split, mode=mode, **kw)
        loader = data.make_loader(ds, batch_size=args.batch_size_val, shuffle=False, num_workers=args.num_workers)
        for b in tqdm(loader, desc=f"encode {mode}", leave=False, disable=not sys.stderr.isatty()):
            with amp:
                if mode == "texts":
                    texts.append(method.encode_text(b["text"].to(device)).float())
                else:
                    mask = b["video_mask"].to(device)
                    videos.append(method.encode_video(method.normalize_pixels(b["video"].to(device)), mask).float())
                    masks.append(mask)
    text, video, mask = torch.cat(texts), torch.cat(videos), torch.cat(masks)
    block = len(text) if method.similarity is None else max(1, SIM_BLOCK_ELEMENTS // max(video.numel(), 1))
    sim = torch.cat([similarity(method, text[i:i + block], video, mask) for i in range(0, len(text), block)])
    method.train(was_training)
    metrics = {f"{label}{d}": m for label, dsl in (("", False), ("DSL ", True)) if dsl <= args.dsl
               for d, m in retrieval_metrics(sim, split.caption_video, dsl).items()}
    if split.name == "synthetic-test":  # its clips come in time-reversed pairs (synthetic.twins)
        metrics["temporal"] = {"pair_acc": temporal_pair_accuracy(sim, split.caption_video, synthetic.twins(split))}
    return metrics


def table(metrics):
    rows = {k: m for k, m in metrics.items() if k != "temporal"}
    return "\n".join([f"{'':>12} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MdR':>6} {'MnR':>7}"] + [
        f"{k:>12} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} {m['MdR']:6.1f} {m['MnR']:7.2f}"
        for k, m in rows.items()] + ([f"temporal pair accuracy {metrics['temporal']['pair_acc']:.1f}% "
                                      "(caption's clip above its time-reversed twin; order-blind: 50%)"]
                                     if "temporal" in metrics else []))
