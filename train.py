"""train.py: the one training loop of nanoTVR (every method, both baselines, evaluation, checkpoints).

  python train.py --method full                      # CPU, minutes: synthetic set + tiny CLIP, train, evaluate
  python train.py --method zeroshot                  # frozen CLIP, mean of frames: evaluation only
  python train.py --method ump --data msrvtt --clip ViT-B/32 --data_path ANN --video_path VIDEOS   # 1 GPU
  torchrun --standalone --nproc_per_node=4 train.py --method dgl --data msrvtt ...   # 4 GPUs, global batch
  python train.py --method full --eval_only --checkpoint out/full-synthetic/checkpoint.pt
  python train.py --method simvtp --stage pretrain ...; python train.py --method simvtp --init CKPT ...

Flags follow CLIP4Clip @ 508ffa3 where it has one; defaults come from the method's RECIPE, then its
DATASET_RECIPES[--data], then the command line; every other RECIPE key is a constructor argument and a flag
(`--K_d 0`). Spec: shared/specs/pipeline.md. Faithful to CLIP4Clip's loop (symmetric InfoNCE over the global
batch, meanP, its tie and multi-caption metric rules). Deliberate deviations:
 1. The all-gather sums gradients: N ranks give the one-process gradient (CLIP4Clip's: 1/N of it, §3.1).
 2. AdamW (bias-corrected) instead of BertAdam; cosine over the steps after warmup, not the whole run.
 3. Default decay groups exempt biases, LayerNorms, embeddings, logit_scale (CLIP4Clip: biases only).
 4. `full`: fp32 masters + autocast, CLIP at lr 1e-7. CLIP4Clip's CLIP trains in pure fp16 by accident, where
    most 1e-7 updates round away; CLIP4Clip#96: R@1 ~43 with it, ~40 without. Expect ~40 (spec §5).
 5. Batches: one permutation per (seed, epoch) cut into global batches, rank r reads slice r of each; random
    frames seeded per (epoch, item). 1 or N ranks see the same batches; --resume is exact mid-epoch too.
"""
import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather as all_gather_with_grad
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import clip
import data

METHODS = {"ump": ("ump", "UMP"), "dgl": ("dgl", "DGL"), "adapter": ("adapter", "CrossModalAdapter"),
           "unipt": ("unipt", "UniPT"), "simvtp": ("simvtp", "SimVTP")}
BASELINES = ("zeroshot", "full")
STANDARD = ("lr", "clip_lr", "epochs", "batch_size", "frames", "words", "weight_decay", "warmup", "grad_clip",
            "betas", "eps", "size")

# CLIP4Clip meanP, its README command for MSR-VTT (spec §5): --lr 1e-4 --coef_lr 1e-3 (CLIP at 1e-7) --epochs 5
# --batch_size 128 (4 GPUs x 32) --max_frames 12 --max_words 32 --warmup_proportion 0.1; BertAdam weight decay
# 0.2, b1 0.9, b2 0.98, e 1e-6; clip_grad_norm_ 1.0. zeroshot uses frames, words and batch_size_val only.
BASELINE_RECIPE = dict(lr=1e-4, clip_lr=1e-7, epochs=5, batch_size=128, frames=12, words=32, weight_decay=0.2,
                       warmup=0.1, grad_clip=1.0, betas=(0.9, 0.98), eps=1e-6)
# Synthetic set (ours, tuned on 2 CPU cores): a tiny CLIP that knows no motion must learn it in a few hundred
# steps, so CLIP trains at lr 1e-7 x 3000; 8 frames cover the 16-24-frame clips.
BASELINE_DATASET_RECIPES = dict(synthetic=dict(clip_lr=3e-4, epochs=5, batch_size=32, frames=8))
# Tiny CLIP of the synthetic default, pretrained contrastively on still frames. Its token embeddings keep their
# random init (a dozen words; AdamW over 49408 rows would cost half of each step); every other tensor trains.
# 64 px frames (the set's own size) in 16 px patches: 17 tokens, yet shapes stay legible (at 32 px / 8 px
# patches it learnt colours but hardly shapes: 47% of still frames classified against 56-59% here).
TINY_CLIP = dict(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
TINY_PRETRAIN = dict(seed=0, steps=300, batch_size=128, lr=1e-3, weight_decay=0.1, frames=8, words=32,
                     frozen=("token_embedding.weight",))


# ----------------------------------------------------------------------------------------------------
# Arguments: --method/--data/--stage first (they choose the recipe), then every flag with recipe defaults

def load_method(method, stage):
    """-> (recipe, its per-data-set overrides, class; None for a baseline)."""
    if method in BASELINES:
        if stage == "pretrain":
            raise SystemExit(f"error: --stage pretrain exists for methods with a PRETRAIN_RECIPE, not {method}")
        return BASELINE_RECIPE, BASELINE_DATASET_RECIPES, None
    module_name, class_name = METHODS[method]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"error: method {method!r} needs {module_name}.py, which cannot be imported: {e}")
    prefix = "PRETRAIN_" if stage == "pretrain" else ""
    if not hasattr(module, prefix + "RECIPE"):
        raise SystemExit(f"error: {module_name}.py has no {prefix}RECIPE (no --stage {stage} for {method})")
    return getattr(module, prefix + "RECIPE"), getattr(module, prefix + "DATASET_RECIPES", {}), getattr(module, class_name)


def boolean(s):  # argparse reports the ValueError as "invalid boolean value"
    return ("false", "true").index(s.lower()) == 1


def flag_type(default):
    return boolean if isinstance(default, bool) else str if default is None else type(default)


def parse_args(argv=None):
    choices = BASELINES + tuple(METHODS)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--method", help=f"one of {', '.join(choices)}")
    first.add_argument("--data", default="synthetic", help=f"one of {', '.join(data.DATASETS)}")
    first.add_argument("--stage", default="finetune", choices=("pretrain", "finetune"),
                       help="pretrain: the method's pretraining objective (SimVTP), no evaluation")
    a, _ = first.parse_known_args(argv)
    helping = {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv)
    for flag, value, allowed in (("--method", a.method, choices), ("--data", a.data, data.DATASETS)):
        if value not in allowed and not helping:
            first.error(f"{flag} {value!r} is not known; choose from {', '.join(allowed)}")
    recipe, dataset_recipes, cls = load_method(a.method, a.stage) if a.method in choices else ({}, {}, None)
    recipe = {**recipe, **dataset_recipes.get(a.data, {})}

    p = argparse.ArgumentParser(parents=[first], description=__doc__.split("\n")[0])
    add, r = p.add_argument, recipe.get
    for flag, kind, text in (  # value flags; None defaults are filled from the recipe below
            ("--clip", str, "CLIP name (ViT-B/32, ...) or file; default tiny CLIP for synthetic, else ViT-B/32"),
            ("--data_path", str, "annotation directory (synthetic: generated there on first use)"),
            ("--video_path", str, "video directory (synthetic: <data_path>/videos)"),
            ("--frame_cache", str, "data.py's uint8 frame cache (python data.py --cache DIR ...)"),
            ("--output_dir", str, "log.jsonl and checkpoint.pt go here (default out/<method>-<data>)"),
            ("--cache_dir", str, "tiny CLIP cache (default $XDG_CACHE_HOME/nanotvr or ~/.cache/nanotvr)"),
            ("--init", str, "load model weights from a (pretraining) checkpoint, non-strict"),
            ("--checkpoint", str, "with --eval_only: the checkpoint to evaluate"),
            ("--size", int, f"frame size (recipe: {r('size')}; else the CLIP model's input resolution)"),
            ("--batch_size", int, f"global batch per optimizer step ({r('batch_size')})"),
            ("--lr", float, f"new parameters ({r('lr')})"),
            ("--clip_lr", float, f"trainable CLIP parameters ({r('clip_lr')})"),
            ("--coef_lr", float, "clip_lr = lr x coef_lr (CLIP4Clip's flag)"),
            ("--epochs", int, f"({r('epochs')})"),
            ("--weight_decay", float, f"({r('weight_decay')})"),
            ("--grad_clip", float, f"({r('grad_clip')})"),
            ("--eps", float, f"({r('eps')})")):
        add(flag, type=kind, help=text)
    add("--max_frames", dest="frames", type=int, help=f"frames per clip ({r('frames')})")
    add("--max_words", dest="words", type=int, help=f"text tokens ({r('words')})")
    add("--warmup_proportion", dest="warmup", type=float, help=f"({r('warmup')})")
    add("--betas", type=float, nargs=2, help=f"({r('betas')})")
    add("--gradient_accumulation_steps", dest="accum", type=int, default=1,
        help="forward passes per step; the loss sees batch_size/accum pairs at a time (CLIP4Clip)")
    for flag, default in (("--seed", 42), ("--num_workers", 2), ("--batch_size_val", 64), ("--log_every", 20)):
        add(flag, type=int, default=default)
    add("--max_steps", type=int, default=0, help="checkpoint and stop after N steps in all (0: no limit)")
    for flag, text in (("--allow_missing", "use the videos that exist (say so when reporting)"),
                       ("--resume", "continue from <output_dir>/checkpoint.pt"), ("--eval_only", "no training"),
                       ("--dsl", "also report DSL (CAMoE) metrics, as separate rows")):
        add(flag, action="store_true", help=text)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    extra = {k: v for k, v in recipe.items() if k not in STANDARD}
    group = p.add_argument_group(f"{a.method} hyperparameters (RECIPE; constructor arguments)")
    for k, v in extra.items():
        seq = isinstance(v, (tuple, list))
        group.add_argument(f"--{k}", type=flag_type(v[0] if seq else v), nargs=len(v) if seq else None, default=v,
                           help=f"(default {v})")
    args = p.parse_args(argv)
    for k in STANDARD:
        setattr(args, k, recipe.get(k, dict(betas=(0.9, 0.999), eps=1e-8).get(k)) if getattr(args, k) is None else getattr(args, k))
    args.clip_lr = args.clip_lr if args.coef_lr is None else args.lr * args.coef_lr
    args.betas, args.kwargs = tuple(args.betas), {k: getattr(args, k) for k in extra}
    args.output_dir = args.output_dir or os.path.join("out", f"{args.method}-{args.data}")
    args.epochs = 0 if args.method == "zeroshot" else args.epochs  # frozen CLIP: evaluation only
    for flag, path in (("--checkpoint", args.checkpoint), ("--init", args.init)):
        if path and not os.path.isfile(path):
            p.error(f"{flag} {path}: no such file")
    return args, cls


# ----------------------------------------------------------------------------------------------------
# Baselines (CLIP4Clip meanP, spec §3) and the tiny CLIP of the synthetic default

class MeanP(nn.Module):
    """CLIP4Clip "loose" meanP: frame CLS features, L2-normalised, masked mean; the loop normalises again.
    zeroshot: everything frozen; full: every CLIP weight trains (names "clip.*" get clip_lr)."""

    def __init__(self, clip_model, num_frames, *, train_clip):
        super().__init__()
        self.clip, self.num_frames = clip_model.requires_grad_(train_clip), num_frames

    @property
    def logit_scale(self):
        return self.clip.logit_scale

    def encode_text(self, text):
        return self.clip.encode_text(text)

    def encode_video(self, video, video_mask):
        B, T = video_mask.shape
        f = F.normalize(self.clip.encode_image(video.flatten(0, 1)).view(B, T, -1), dim=-1)  # [B, T, E]
        m = video_mask.unsqueeze(-1).to(f.dtype)  # [B, T, 1]
        return (f * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, E]


def tiny_clip(cache_dir, data_path, log=print):
    """The synthetic default's backbone: TINY_CLIP trained contrastively on single frames of the "still" split
    (captions name colour and shape only), so it knows objects but not motion. Cached by config hash."""
    config = dict(clip=TINY_CLIP, pretrain=TINY_PRETRAIN, data=data.SYNTHETIC_VERSION)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tiny-clip-{key}.pt")
    if os.path.isfile(path):
        return clip.load(path)
    P, t0 = TINY_PRETRAIN, time.time()
    split = data.read_split("synthetic", "still", data_path)
    ds = data.VideoTextDataset(split, frames=P["frames"], words=P["words"], size=TINY_CLIP["image_resolution"],
                               train=False, mode="videos")
    videos = torch.stack([ds[i]["video"] for i in range(len(ds))])  # [N, T, 3, S, S]: the object is in every frame
    names = sorted(set(split.captions))  # a dozen "a red circle" captions: one class each
    label = torch.tensor([names.index(c) for c in split.captions])
    ids = torch.stack([data.tokenize(c, P["words"]) for c in names])  # [C, L]
    video_of = torch.tensor(split.caption_video)
    torch.manual_seed(P["seed"])
    model = clip.CLIP(**TINY_CLIP).train()
    for n, p in model.named_parameters():
        p.requires_grad_(n not in P["frozen"])
    opt = torch.optim.AdamW(param_groups(model, P["lr"], None, P["weight_decay"]))
    for step in tqdm(range(P["steps"]), desc="pretrain tiny CLIP", leave=False, dynamic_ncols=True):
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = P["lr"] * lr_factor(step, P["steps"], 0.1)
        i = torch.randint(len(label), (P["batch_size"],))
        frame = clip.normalize(videos[video_of[i], torch.randint(P["frames"], (len(i),))])  # [B, 3, S, S]
        img = F.normalize(model.encode_image(frame), dim=-1)
        txt = F.normalize(model.encode_text(ids), dim=-1)[label[i]]  # [B, E]
        logits = model.logit_scale.exp() * img @ txt.T
        same = (label[i, None] == label[None, i]).float()  # repeated captions are positives, not negatives
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.logit_scale.data.clamp_(max=math.log(100))
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save(model.state_dict(), path)
    log(f"tiny CLIP: {P['steps']} steps on {len(ds)} still clips, {time.time() - t0:.0f} s, loss {loss.item():.3f}: {path}")
    return clip.load(path)


def build_method(args, cls, device, log=print):
    """-> (method module, frame size, normalize function)."""
    clip_model = None
    if args.method != "simvtp":
        if args.clip is None and args.data == "synthetic":
            cache_dir = args.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanotvr")
            if not is_master():  # rank 0 pretrains and caches it, the others read the cache
                dist.barrier()
            clip_model = tiny_clip(cache_dir, args.data_path, log)
            if dist.is_initialized() and is_master():
                dist.barrier()
        else:
            clip_model = clip.load(args.clip or "ViT-B/32")
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    if cls is None:
        method = MeanP(clip_model, args.frames, train_clip=args.method == "full")
    else:
        kwargs = dict(args.kwargs)
        if "size" in inspect.signature(cls).parameters and args.size:
            kwargs["size"] = args.size
        method = cls(args.frames, **kwargs) if clip_model is None else cls(clip_model, args.frames, **kwargs)
    size = args.size or getattr(getattr(clip_model, "visual", None), "input_resolution", None)
    if not size:
        raise SystemExit(f"error: {args.method} has no CLIP model to take the frame size from: pass --size")
    own = getattr(sys.modules[type(method).__module__], "normalize", None)  # e.g. SimVTP's ImageNet mean/std
    normalize = own if getattr(own, "__module__", None) == type(method).__module__ else clip.normalize
    return method.to(device), size, normalize


# ----------------------------------------------------------------------------------------------------
# Distributed helpers, loss, optimizer, schedule

def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def gather(x):
    """Concatenate x from every rank in rank order; differentiable, the backward sums gradients (spec §3.1)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if x.requires_grad:
        return torch.cat(all_gather_with_grad(x.contiguous()))
    y = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()  # gloo has no bool
    out = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(out, y)
    return torch.cat(out).to(x.dtype)


def similarity(method, text, video, video_mask):
    """[Nt, D], [Nv, D] (or [Nv, T, D] with method.similarity) -> [Nt, Nv] logits in fp32."""
    if hasattr(method, "similarity"):
        return method.similarity(text, video, video_mask).float()
    t, v = F.normalize(text.float(), dim=-1), F.normalize(video.float(), dim=-1)
    return method.logit_scale.exp().float() * t @ v.T


def contrastive_loss(method, text, video, video_mask):
    """Symmetric InfoNCE over the global batch: features of every rank gathered first (spec §3)."""
    logits = similarity(method, gather(text), gather(video), gather(video_mask))  # [B_global, B_global]
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


def param_groups(method, lr, clip_lr, weight_decay):
    """The method's AdamW groups, else: decay on matrices only, "clip.*" parameters at clip_lr."""
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    if hasattr(method, "param_groups"):
        groups = [dict(g) for g in method.param_groups(weight_decay)]
    else:
        buckets = {}
        for n, p in named:
            on_clip = n.startswith("clip.") and clip_lr is not None
            decay = p.ndim >= 2 and "embedding" not in n
            buckets.setdefault((on_clip, decay), dict(params=[], lr=clip_lr if on_clip else lr,
                                                      weight_decay=weight_decay if decay else 0.0))["params"].append(p)
        groups = list(buckets.values())
    seen = [id(p) for g in groups for p in g["params"]]
    if sorted(seen) != sorted(id(p) for _, p in named):
        raise ValueError("param_groups() must list every trainable parameter exactly once")
    return [dict(g, lr=g.get("lr", lr), base_lr=g.get("lr", lr)) for g in groups if g["params"]]


def lr_factor(step, total, warmup):
    """Linear warmup over the first warmup x total steps, then cosine to 0 (per step)."""
    w = int(warmup * total)
    return (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(total - w, 1)))


# ----------------------------------------------------------------------------------------------------
# Training order (deviation 5): resumable at any batch, the same global batches on 1 or N ranks

class EpochSampler(Sampler):
    """Yields (epoch, item) keys: rank `rank`'s slice of each global batch of this epoch's permutation."""

    def __init__(self, n, rank_batch, batches, rank, world, seed):
        self.n, self.b, self.batches, self.rank, self.world, self.seed = n, rank_batch, batches, rank, world, seed
        self.epoch = self.start = 0

    def set_epoch(self, epoch, start=0):  # start: micro-batches of this epoch already done
        self.epoch, self.start = epoch, start

    def __len__(self):
        return (self.batches - self.start) * self.b

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        mine = perm[:self.batches * self.world * self.b].view(self.batches, self.world, self.b)[self.start:, self.rank]
        return iter([(self.epoch, int(i)) for i in mine.flatten()])


class SeededItems(Dataset):
    """Item (epoch, i) is read under a torch seed made of (seed, epoch, i): its random frames repeat exactly."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + key[0]) * 100_000_007 + key[1])
            return self.dataset[key[1]]


# ----------------------------------------------------------------------------------------------------
# Metrics (CLIP4Clip metrics.py, spec §4) and evaluation

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


@torch.no_grad()
def evaluate(method, split, args, device, normalize, amp):
    """Encode every test text and video once, then the [Nt, Nv] similarity (blockwise with similarity())."""
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
                    videos.append(method.encode_video(normalize(b["video"].to(device)), mask).float())
                    masks.append(mask)
    text, video, mask = torch.cat(texts), torch.cat(videos), torch.cat(masks)
    block = max(1, 2 ** 26 // max(video[0].numel() * len(video), 1)) if hasattr(method, "similarity") else len(text)
    sim = torch.cat([similarity(method, text[i:i + block], video, mask) for i in range(0, len(text), block)])
    method.train(was_training)
    return {f"{label}{d}": m for label, dsl in (("", False), ("DSL ", True)) if dsl <= args.dsl
            for d, m in retrieval_metrics(sim, split.caption_video, dsl).items()}


def table(metrics):
    return "\n".join([f"{'':>12} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MdR':>6} {'MnR':>7}"] + [
        f"{k:>12} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} {m['MdR']:6.1f} {m['MnR']:7.2f}" for k, m in metrics.items()])


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one plain dict, written to a temporary file then renamed, loaded with weights_only=True

def atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # a crash before this line leaves the previous file untouched
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state():  # tensors and ints, which weights_only=True loads
    _, keys, pos, *_ = np.random.get_state()
    return dict(torch=torch.get_rng_state(), numpy=torch.from_numpy(keys.astype(np.int64)), numpy_pos=int(pos),
                python=torch.tensor(random.getstate()[1]), cuda=torch.cuda.get_rng_state_all())


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"]))
    random.setstate((3, tuple(s["python"].tolist()), None))
    s["cuda"] and torch.cuda.set_rng_state_all(s["cuda"])


def trainable_state(method):
    return {n: p.detach().cpu().clone() for n, p in method.named_parameters() if p.requires_grad}


def load_trainable(method, path):
    """Strict on the trainable set: the checkpoint must hold exactly the tensors that train here."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    names, have = set(trainable_state(method)), set(ck["model"])
    if have != names:
        raise SystemExit(f"error: {path} does not hold this model's trainable tensors (missing {sorted(names - have)[:4]}, "
                         f"unexpected {sorted(have - names)[:4]}): same --method and method flags as its run?")
    method.load_state_dict(ck["model"], strict=False)
    return ck


def save_checkpoint(path, method, opt, scaler, step, epoch, batch, args):
    rng = [rng_state()] * max(dist.is_initialized() and dist.get_world_size(), 1)
    if dist.is_initialized():  # every rank's generators, for an exact --resume
        dist.all_gather_object(rng, rng_state())
    if is_master():
        atomic_save(dict(model=trainable_state(method), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                         step=step, epoch=epoch, batch=batch, rng=rng, args=vars(args)), path)


# ----------------------------------------------------------------------------------------------------
# The run

def main(argv=None):
    args, cls = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if world > 1:  # torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master, pretrain = rank == 0, args.stage == "pretrain"
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = None if device.type != "cuda" else torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    amp = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    method, args.size, normalize = build_method(args, cls, device, log)
    torch.manual_seed(args.seed + rank), random.seed(args.seed + rank), np.random.seed(args.seed + rank)
    if args.init:
        state = torch.load(args.init, map_location="cpu", weights_only=True)
        missing, unexpected = method.load_state_dict(state.get("model", state), strict=False)
        log(f"--init {args.init}: {len(missing)} missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}")
    n_all = sum(p.numel() for p in method.parameters())
    n_train = sum(p.numel() for p in method.parameters() if p.requires_grad)
    log(f"{args.method}: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.3f}%); device "
        f"{device} x {world}, autocast {amp_dtype}, {args.frames} frames of {args.size} px, {args.words} words")
    os.makedirs(args.output_dir, exist_ok=True)
    jsonl = open(os.path.join(args.output_dir, "log.jsonl"), "a") if master else None

    def record(**row):
        if jsonl:
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()

    test = None if pretrain else data.read_split(args.data, "test", args.data_path, args.video_path, args.allow_missing)
    if args.eval_only or args.epochs == 0:
        if args.checkpoint:
            load_trainable(method, args.checkpoint)
        metrics = evaluate(method, test, args, device, normalize, amp) if master else None
        record(event="eval", epoch=None, **(metrics or {}))
        log(f"{args.method} on {args.data} test ({len(test.captions)} captions, {len(test.videos)} videos)\n"
            + table(metrics or {}))
        if jsonl:
            jsonl.close()
        if dist.is_initialized():  # rank 0 evaluates alone (no collectives), the others are done
            dist.destroy_process_group()
        return metrics

    # data: global batches cut from one permutation per epoch, rank r reads slice r of each
    if args.batch_size % (world * args.accum):
        raise SystemExit(f"error: --batch_size {args.batch_size} must divide by ranks x accumulation ({world * args.accum})")
    rank_batch = args.batch_size // (world * args.accum)
    split = data.read_split(args.data, "train", args.data_path, args.video_path, args.allow_missing)
    train_ds = data.VideoTextDataset(split, frames=args.frames, words=args.words, size=args.size, train=True,
                                     frame_cache=args.frame_cache)
    steps_per_epoch, micro = len(train_ds) // args.batch_size, args.accum
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_ds)} training pairs make no batch of {args.batch_size}")
    sampler = EpochSampler(len(train_ds), rank_batch, steps_per_epoch * micro, rank, world, args.seed)
    loader = DataLoader(SeededItems(train_ds, args.seed), batch_size=rank_batch, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0, worker_init_fn=getattr(data, "_worker_init", None))

    # AdamW over the trainable parameters only; DDP reduces their gradients
    groups = param_groups(method, args.lr, args.clip_lr, args.weight_decay)
    opt = torch.optim.AdamW(groups, betas=args.betas, eps=args.eps)
    params = [p for g in groups for p in g["params"]]
    forward = Forward(method, pretrain)
    model = DDP(forward, device_ids=[device] if device.type == "cuda" else None) if world > 1 else forward
    total, step, start_epoch, start_batch = steps_per_epoch * args.epochs, 0, 0, 0
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: --resume: no checkpoint at {ckpt_path}")
        ck = load_trainable(method, ckpt_path)
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        step, start_epoch, start_batch = ck["step"], ck["epoch"], ck["batch"]
        set_rng_state(ck["rng"][rank if len(ck["rng"]) == world else 0])
        log(f"resumed from {ckpt_path}: step {step}, epoch {start_epoch}, batch {start_batch}")
    log(f"{len(train_ds)} training pairs: {steps_per_epoch} steps/epoch x {args.epochs} epochs of {args.batch_size} "
        f"({rank_batch} per rank x {world} ranks x {micro} accumulation)")

    best, metrics, last = None, None, {"loss": math.nan}
    for epoch in range(start_epoch, args.epochs):
        batch_no = start_batch if epoch == start_epoch else 0
        sampler.set_epoch(epoch, batch_no)
        method.train()
        bar = tqdm(total=steps_per_epoch, initial=batch_no // micro, desc=f"epoch {epoch + 1}", disable=not master,
                   leave=False, dynamic_ncols=True)
        t_log = t_fetch = time.time()
        wait, seen, losses = 0.0, 0, []
        for batch in loader:
            wait += time.time() - t_fetch
            batch_no += 1
            video = normalize(batch["video"].to(device, non_blocking=True))
            text, mask = batch["text"].to(device, non_blocking=True), batch["video_mask"].to(device, non_blocking=True)
            with (model.no_sync() if world > 1 and batch_no % micro else nullcontext()), amp:
                if pretrain:  # SimVTP: masked video/text modelling, a dict of losses with a "loss" entry
                    parts = model(text, video, mask)
                    loss = parts["loss"]
                else:
                    loss, parts = contrastive_loss(method, *model(text, video, mask), mask), {}
                scaler.scale(loss / micro).backward()
            losses.append({k: torch.as_tensor(x).item() for k, x in {**parts, "loss": loss}.items()})
            seen += len(text) * world
            if batch_no % micro:
                t_fetch = time.time()
                continue
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, args.warmup)
            scaler.unscale_(opt)
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if method.logit_scale.requires_grad:  # CLIP4Clip clamps after every step
                method.logit_scale.data.clamp_(max=math.log(100))
            step += 1
            bar.update(1)
            if step % args.log_every == 0 or batch_no == steps_per_epoch * micro:
                dt = time.time() - t_log
                last = {k: sum(x[k] for x in losses) / len(losses) for k in losses[-1]}
                row = dict(event="train", step=step, epoch=epoch + batch_no / (steps_per_epoch * micro), **last,
                           lr=opt.param_groups[0]["lr"], step_time=dt * micro / len(losses), clips_per_s=seen / dt,
                           data_wait=wait / dt)
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                record(**row)
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{row['lr']:.1e}", clips_s=f"{seen / dt:.0f}",
                                wait=f"{100 * wait / dt:.0f}%")
                t_log, wait, seen, losses = time.time(), 0.0, 0, []
            if step == args.max_steps:  # a mid-epoch checkpoint, as a pre-empted job would want
                save_checkpoint(ckpt_path, method, opt, scaler, step, epoch, batch_no, args)
                break
            t_fetch = time.time()
        bar.close()
        if step == args.max_steps:
            log(f"stopped at step {step} (--max_steps); continue with --resume")
            break
        if not pretrain and master:
            metrics = evaluate(method, test, args, device, normalize, amp)
            record(event="eval", epoch=epoch + 1, step=step, **metrics)
            log(f"epoch {epoch + 1}/{args.epochs}, step {step}, loss {last['loss']:.4f}\n" + table(metrics))
            best = max(best or (0, -1.0), (epoch + 1, metrics["t2v"]["R@1"]), key=lambda b: b[1])
        save_checkpoint(ckpt_path, method, opt, scaler, step, epoch + 1, 0, args)
    if train_ds.substitutions:
        log(f"WARNING: {train_ds.substitutions} training items replaced an unreadable video: {train_ds.corrupt_videos[:5]}")
    if metrics:
        log(f"final ({args.method}, {args.data}, epoch {args.epochs}; best t2v R@1 {best[1]:.1f} at epoch {best[0]}, "
            "test-selected as CLIP4Clip does)\n" + table(metrics))
    if jsonl:
        jsonl.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
