"""retrieval.py: evaluation of a trained method: encode the test set once, score every caption against every
video, and the metrics of the field (recall@k, median and mean rank) as CLIP4Clip's metrics.py computes them.

  t2v  each caption ranks every video; its rank is the position of the video it describes
  v2t  each video ranks the caption groups (one group per video: multi-caption sets have several), each group
       scored by its best caption
Ties and medians follow CLIP4Clip's metrics.py, function by function, as its eval_epoch calls them: the
published numbers of CLIP4Clip and of the methods built on its evaluation (MSR-VTT, MSVD, VATEX, ...) came from
these functions, and a number is comparable only when it is computed the same way. Two rules, by case:
  one caption per video, both directions; and v2t of every set (compute_metrics)
       a k-way tie with the ground truth at ranks r..r+k-1 adds all k ranks to the list every metric is taken
       over, so a constant similarity matrix scores at chance, not at R@1 = 100; the median of an even count
       is the mean of the two middle ranks (numpy.median).
  t2v when some video has several captions, e.g. MSVD, VATEX (tensor_text_to_video_metrics)
       one rank per caption, its position in the caption's sorted videos; the median of an even count is
       the lower middle rank (torch.median). Tied videos: in index order (the ground truth after the tied
       videos listed before it). CLIP4Clip orders them as torch.argsort's unstable sort happens to, which
       depends on the row length and the build (torch 2.14.1 keeps index order in rows of 12, not of 20):
       no rule reproduces that, so nanoTVR takes the same function with a stable sort.
Real similarity matrices almost never tie, so the tie rules matter for degenerate scores only (the fixture's
200 x 20 matrix of round(3x) scores, t2v R@1: 1.8 under the k-entry rule, 4.0 in index order, 3.5 under
CLIP4Clip's unstable sort); the median rule can move MdR by 0.5. tests/fixtures/clip4clip_metrics.pt holds
CLIP4Clip's outputs on such matrices (tests/oracles/make_metrics_fixture.py); tests/test_metrics.py checks them.
"""
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data

SIM_BLOCK_ELEMENTS = 2 ** 26  # a method's own similarity() sees [texts, videos, T, D] blocks of at most this


def similarity(method, text, video, video_mask):
    """[Nt, D], [Nv, D] (or [Nv, T, D] with method.similarity) -> [Nt, Nv] logits, in fp32 under any autocast: in
    bf16, logits of 70-90 would move the loss by ~1% and its gradient by ~10%."""
    with torch.autocast(text.device.type, enabled=False):
        if method.similarity is not None:
            return method.similarity(text.float(), video.float(), video_mask).float()
        t, v = F.normalize(text.float(), dim=-1), F.normalize(video.float(), dim=-1)
        return method.logit_scale.exp().float() * t @ v.T


def ranks_of(sim, gt):
    """sim [Nq, Nc], gt [Nq] -> 1-based ranks; a k-way tie with the ground truth adds k entries r..r+k-1."""
    score = sim[torch.arange(len(sim)), gt].unsqueeze(1)
    above, tied = (sim > score).sum(1), (sim == score).sum(1)
    return torch.cat([torch.arange(a + 1, a + t + 1) for a, t in zip(above.tolist(), tied.tolist())]).double()


def index_order_ranks(sim, gt):
    """sim [Nq, Nc], gt [Nq] -> one 1-based rank per query; tied candidates rank in index order."""
    score, gt = sim[torch.arange(len(sim)), gt].unsqueeze(1), gt.unsqueeze(1)
    before = (sim > score) | ((sim == score) & (torch.arange(sim.shape[1]) < gt))
    return before.sum(1).double() + 1


def summarize(r, lower_median=False):
    median = r.median().item() if lower_median else float(np.median(r.numpy()))
    return {"R@1": 100 * (r <= 1).double().mean().item(), "R@5": 100 * (r <= 5).double().mean().item(),
            "R@10": 100 * (r <= 10).double().mean().item(), "MdR": median, "MnR": r.mean().item()}


def retrieval_metrics(sim, caption_video, dsl=False):
    """sim [Nt, Nv] (caption i describes video caption_video[i]) -> {"t2v": ..., "v2t": ...}.
    v2t ranks, for video j, each video's caption group by its best caption's score (multi-caption rule);
    t2v takes CLIP4Clip's multi-caption rules when there are more captions than videos (module docstring)."""
    sim, cv = sim.double().cpu(), torch.as_tensor(caption_video)
    t2v_sim = v2t_sim = sim
    if dsl:  # CAMoE's dual softmax: reweight by a softmax over the query axis (transductive, off by default)
        t2v_sim, v2t_sim = sim * sim.softmax(0) * len(sim), sim * sim.softmax(1) * sim.shape[1]
    groups = torch.full((sim.shape[1], sim.shape[1]), -math.inf, dtype=sim.dtype).scatter_reduce(
        0, cv[:, None].expand_as(v2t_sim), v2t_sim, "amax")  # [group g, video j]: best caption of g
    multi = len(cv) > sim.shape[1]
    return {"t2v": summarize(index_order_ranks(t2v_sim, cv) if multi else ranks_of(t2v_sim, cv), lower_median=multi),
            "v2t": summarize(ranks_of(groups.T, torch.arange(sim.shape[1])))}


def temporal_pair_accuracy(sim, caption_video, twin):
    """Share (%) of captions whose video scores above its time-reversed twin, twin[j] = the index of video j's
    twin, None when it has none here (--allow_missing): those captions are left out; a tie counts half. 50 for a
    model blind to frame order, 100 when order always decides. sim [Nt, Nv] -> (%, captions counted)."""
    rows = [i for i, v in enumerate(caption_video) if twin[v] is not None]
    if not rows:
        return None, 0
    sim, rows = sim.double().cpu(), torch.tensor(rows)
    cv = torch.as_tensor(caption_video)[rows]
    own, other = sim[rows, cv], sim[rows, torch.tensor([twin[v] for v in cv.tolist()])]
    return 100 * ((own > other).double() + 0.5 * (own == other).double()).mean().item(), len(rows)


@torch.no_grad()
def encode(method, split, mode, args, device, amp):
    """mode "texts": -> [Nt, D]; mode "videos": -> (what encode_video returns for every video, [Nv, D] or
    [Nv, T, D] for a method with its own similarity; video_mask [Nv, T]). The caller sets eval mode."""
    kw = dict(frames=args.frames, words=args.words, size=args.size, train=False, frame_cache=args.frame_cache,
              sampling=args.sampling)
    ds = data.VideoTextDataset(split, mode=mode, **kw)
    loader = data.make_loader(ds, batch_size=args.batch_size_val, shuffle=False, num_workers=args.num_workers)
    out, masks = [], []
    for b in tqdm(loader, desc=f"encode {mode}", leave=False, disable=not sys.stderr.isatty()):
        with amp:
            if mode == "texts":
                out.append(method.encode_text(b["text"].to(device)).float())
            else:
                mask = b["video_mask"].to(device)
                out.append(method.encode_video(method.normalize_pixels(b["video"].to(device)), mask).float())
                masks.append(mask)
    return torch.cat(out) if mode == "texts" else (torch.cat(out), torch.cat(masks))


def similarity_matrix(method, text, video, mask):
    """[Nt, Nv] logits of every text against every video, in blocks of texts for a method's own similarity."""
    block = len(text) if method.similarity is None else max(1, SIM_BLOCK_ELEMENTS // max(video.numel(), 1))
    return torch.cat([similarity(method, text[i:i + block], video, mask) for i in range(0, len(text), block)])


@torch.no_grad()
def evaluate(method, split, args, device, amp):
    """Encode every test text and video once, then the [Nt, Nv] similarity (blockwise for method.similarity).
    -> (metrics, the [Nt, Nv] similarity matrix, which pictures.write_retrievals draws)."""
    was_training = method.training
    method.eval()
    text = encode(method, split, "texts", args, device, amp)
    video, mask = encode(method, split, "videos", args, device, amp)
    sim = similarity_matrix(method, text, video, mask)
    method.train(was_training)
    return metrics_of(sim, split, args.dsl), sim


def metrics_of(sim, split, dsl=False):
    """The [Nt, Nv] similarity's numbers: the t2v and v2t rows; with dsl also "DSL t2v" and "DSL v2t" beside them
    (never in their place: DSL is transductive); temporal pair accuracy where the split names twins."""
    metrics = {f"{label}{d}": m for label, use_dsl in (("", False), ("DSL ", True)) if use_dsl <= dsl
               for d, m in retrieval_metrics(sim, split.caption_video, use_dsl).items()}
    acc, n = temporal_pair_accuracy(sim, split.caption_video, split.twin) if split.twin else (None, 0)
    if n:  # a set whose test CSV names each clip's time-reversed twin (the synthetic set)
        metrics["temporal"] = {"pair_acc": acc, "captions": n}
    return metrics


def table(metrics):
    rows = {k: m for k, m in metrics.items() if k != "temporal"}
    lines = [f"{'':>12} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MdR':>6} {'MnR':>7}"] + [
        f"{k:>12} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} {m['MdR']:6.1f} {m['MnR']:7.2f}"
        for k, m in rows.items()]
    if "temporal" in metrics:
        lines.append(f"temporal pair accuracy {metrics['temporal']['pair_acc']:.1f}% "
                     "(caption's clip above its time-reversed twin; order-blind: 50%)")
    if any(k.startswith("DSL") for k in rows):
        lines.append(DSL_NOTE)
    return "\n".join(lines)


DSL_NOTE = ("DSL rows: CAMoE's dual softmax normalises over all test queries at once, so they are transductive "
            "and not comparable with the rows above")
