"""train.py: the one training loop of nanoTVR (every method, both baselines, evaluation, checkpoints).

  python train.py --method full                      # CPU, minutes: synthetic set + tiny CLIP, then train/eval
  python train.py --method zeroshot                  # frozen CLIP, mean of frames, evaluation only
  python train.py --method ump --data msrvtt --clip ViT-B/32 --data_path ANN --video_path VIDEOS   # 1 GPU
  torchrun --standalone --nproc_per_node=4 train.py --method dgl --data msrvtt ...   # 4 GPUs, batch is global
  python train.py --method full --eval_only --checkpoint out/full-synthetic/checkpoint.pt
  python train.py --method simvtp --stage pretrain ...; python train.py --method simvtp --init CKPT ...

Flags follow CLIP4Clip @ 508ffa3 where it has one (--max_frames --max_words --batch_size --batch_size_val --lr
--coef_lr --epochs --warmup_proportion --output_dir --seed --num_workers); their defaults come from the
method's RECIPE, then its DATASET_RECIPES[--data], then the command line. Every other RECIPE key is a
constructor argument of the method and a flag of the same name (`--K_d 0`). Spec: shared/specs/pipeline.md.
Faithful to CLIP4Clip's loop (symmetric InfoNCE over the global batch, meanP, metrics with its tie and
multi-caption rules). Deliberate deviations:
 1. The all-gather sums gradients (torch.distributed.nn), so N ranks give the one-process gradient of the
    global batch; CLIP4Clip's keeps only the local slice, 1/N of it (spec §3.1).
 2. AdamW with bias correction instead of BertAdam (no correction, per-tensor clipping); cosine decays over
    the steps after warmup (CLIP4Clip: over the whole run, lr 0.976 at the end of warmup).
 3. Default weight-decay groups exempt biases, LayerNorms, embeddings and logit_scale (CLIP4Clip decays all
    but biases); a method's param_groups() overrides this.
 4. `full`: fp32 master weights + autocast. CLIP4Clip trains CLIP's matrices in pure fp16 (an accident of
    convert_weights) where most 1e-7 updates round away; ArrowLuo/CLIP4Clip#96 measured R@1 ~40 without it
    against ~43 with it. We keep lr 1e-7 for CLIP (coef_lr 1e-3) and expect the lower number (spec §5).
 5. Training batches: one permutation per (seed, epoch), cut into global batches, rank r takes slice r of
    each, so 1 or N ranks see the same global batches; random frame choices are seeded per (epoch, item),
    which makes --resume exact even mid-epoch and independent of the loader workers.
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

# CLIP4Clip meanP (README command for MSR-VTT, spec §5); zeroshot uses frames/words/batch only
BASELINE_RECIPE = dict(
    lr=1e-4,             # --lr 1e-4 (new parameters; meanP has none)
    clip_lr=1e-7,        # --coef_lr 1e-3 x lr: every CLIP weight (fp32 here, see deviation 4)
    epochs=5,            # --epochs 5
    batch_size=128,      # --batch_size 128 (global: 4 GPUs x 32)
    frames=12,           # --max_frames 12
    words=32,            # --max_words 32
    weight_decay=0.2,    # BertAdam weight_decay 0.2
    warmup=0.1,          # --warmup_proportion 0.1
    grad_clip=1.0,       # clip_grad_norm_(1.0) in the loop
    betas=(0.9, 0.98),   # BertAdam b1, b2
    eps=1e-6,            # BertAdam e
)
# Synthetic set (ours, tuned on 2 CPU cores): a tiny CLIP that knows no motion must learn it in a few hundred
# steps, so CLIP trains at lr 1e-7 x 3000; 8 frames cover the 16-24-frame clips.
BASELINE_DATASET_RECIPES = dict(synthetic=dict(clip_lr=3e-4, epochs=5, batch_size=32, frames=8))

# Tiny CLIP for the synthetic default: conftest's TINY config, pretrained contrastively on still frames
TINY_CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
# token embeddings stay at their random init while pretraining (a dozen words; AdamW over 49408 rows would
# cost half of each step); every other tensor trains
TINY_PRETRAIN = dict(seed=0, steps=300, batch_size=128, lr=2e-3, weight_decay=0.1, frames=8, words=32,
                     frozen=("token_embedding.weight",))


# ----------------------------------------------------------------------------------------------------
# Arguments: --method/--data/--stage first (they choose the recipe), then every flag with recipe defaults

def load_method(method, stage):
    """-> (recipe, dataset recipes, class or None for a baseline)."""
    if method in BASELINES:
        return BASELINE_RECIPE, BASELINE_DATASET_RECIPES, None
    module_name, class_name = METHODS[method]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"error: method {method!r} needs {module_name}.py, which cannot be imported: {e}")
    if stage == "pretrain":
        if not hasattr(module, "PRETRAIN_RECIPE"):
            raise SystemExit(f"error: method {method!r} has no pretraining stage (no PRETRAIN_RECIPE)")
        return module.PRETRAIN_RECIPE, getattr(module, "PRETRAIN_DATASET_RECIPES", {}), getattr(module, class_name)
    return module.RECIPE, getattr(module, "DATASET_RECIPES", {}), getattr(module, class_name)


def flag_type(default):
    if isinstance(default, bool):
        def boolean(s):
            if s.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
            return s.lower() in ("true", "1")
        return boolean
    return str if default is None else type(default)


def parse_args(argv=None):
    choices = BASELINES + tuple(METHODS)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--method", help=f"one of {', '.join(choices)}")
    first.add_argument("--data", default="synthetic", help=f"one of {', '.join(data.DATASETS)}")
    first.add_argument("--stage", default="finetune", choices=("pretrain", "finetune"),
                       help="pretrain: the method's pretraining objective (SimVTP), no evaluation")
    a, _ = first.parse_known_args(argv)
    if a.method not in choices and not ({"-h", "--help"} & set(argv if argv is not None else sys.argv[1:])):
        first.error(f"--method {a.method!r} is not a method; choose from {', '.join(choices)}")
    if a.data not in data.DATASETS:
        first.error(f"--data {a.data!r} is not a data set; choose from {', '.join(data.DATASETS)}")
    if a.stage == "pretrain" and a.method in BASELINES:
        first.error("--stage pretrain exists for methods with a PRETRAIN_RECIPE (simvtp) only")
    recipe, dataset_recipes, cls = load_method(a.method, a.stage) if a.method in choices else ({}, {}, None)
    recipe = {**recipe, **dataset_recipes.get(a.data, {})}

    p = argparse.ArgumentParser(parents=[first], description=__doc__.split("\n")[0])
    p.add_argument("--clip", help="CLIP name (ViT-B/32, ...) or checkpoint path; default: the tiny CLIP with "
                   "--data synthetic, else ViT-B/32")
    p.add_argument("--data_path", help="annotation directory (synthetic: generated there on first use)")
    p.add_argument("--video_path", help="video directory (default: <data_path>/videos for synthetic)")
    p.add_argument("--frame_cache", help="directory of data.py's uint8 frame cache (python data.py --cache)")
    p.add_argument("--allow_missing", action="store_true", help="train/evaluate on the videos that exist")
    p.add_argument("--output_dir", help="log.jsonl and checkpoint.pt go here (default out/<method>-<data>)")
    p.add_argument("--cache_dir", help="tiny CLIP cache (default $XDG_CACHE_HOME/nanotvr or ~/.cache/nanotvr)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--max_frames", dest="frames", type=int, help=f"frames per clip ({recipe.get('frames')})")
    p.add_argument("--max_words", dest="words", type=int, help=f"text tokens ({recipe.get('words')})")
    p.add_argument("--size", type=int, help="frame size (default: the recipe's, else CLIP's input resolution)")
    p.add_argument("--batch_size", type=int, help=f"global batch per optimizer step ({recipe.get('batch_size')})")
    p.add_argument("--batch_size_val", type=int, default=64)
    p.add_argument("--gradient_accumulation_steps", dest="accum", type=int, default=1,
                   help="forward passes per step; the loss sees batch_size/accum pairs at a time (CLIP4Clip)")
    p.add_argument("--lr", type=float, help=f"new parameters ({recipe.get('lr')})")
    p.add_argument("--clip_lr", type=float, help=f"trainable CLIP parameters ({recipe.get('clip_lr')})")
    p.add_argument("--coef_lr", type=float, help="set clip_lr = lr x coef_lr (CLIP4Clip's flag)")
    p.add_argument("--epochs", type=int, help=f"({recipe.get('epochs')})")
    p.add_argument("--warmup_proportion", dest="warmup", type=float, help=f"({recipe.get('warmup')})")
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--grad_clip", type=float)
    p.add_argument("--betas", type=float, nargs=2)
    p.add_argument("--eps", type=float)
    p.add_argument("--log_every", type=int, default=20, help="optimizer steps per log line")
    p.add_argument("--save_every", type=int, default=0, help="also checkpoint every N steps (mid-epoch)")
    p.add_argument("--max_steps", type=int, default=0, help="checkpoint and stop after N steps (0: no limit)")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoint.pt")
    p.add_argument("--init", help="load model weights from a (pretraining) checkpoint, non-strict")
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--checkpoint", help="with --eval_only: the checkpoint to evaluate")
    p.add_argument("--dsl", action="store_true", help="also report DSL (CAMoE) metrics, a separate row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    extra = {k: v for k, v in recipe.items() if k not in STANDARD}
    group = p.add_argument_group(f"{a.method} hyperparameters (RECIPE, passed to the constructor)")
    for k, v in extra.items():
        if isinstance(v, (tuple, list)):
            group.add_argument(f"--{k}", type=flag_type(v[0]), nargs=len(v), default=v)
        else:
            group.add_argument(f"--{k}", type=flag_type(v), default=v, help=f"(default {v})")
    args = p.parse_args(argv)
    for k in STANDARD:
        if getattr(args, k, None) is None:
            setattr(args, k, recipe.get(k))
    if args.coef_lr is not None:
        args.clip_lr = args.lr * args.coef_lr
    args.betas = tuple(args.betas or (0.9, 0.999))
    args.eps = 1e-8 if args.eps is None else args.eps
    args.output_dir = args.output_dir or os.path.join("out", f"{args.method}-{args.data}")
    args.kwargs = {k: getattr(args, k) for k in extra}
    if args.method == "zeroshot":
        args.epochs = 0  # frozen CLIP: evaluation only
    if args.eval_only and args.checkpoint and not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.init and not os.path.isfile(args.init):
        p.error(f"--init {args.init}: no such file")
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


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "nanotvr")


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
        for g in opt.param_groups:
            g["lr"] = P["lr"] * lr_factor(step, P["steps"], 0.1)
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
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100))
    log(f"tiny CLIP: pretrained {P['steps']} steps on {len(ds)} still clips in {time.time() - t0:.0f} s "
        f"(last loss {loss.item():.3f}); cached at {path}")
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save(model.state_dict(), path)
    return clip.load(path)


def build_method(args, cls, device, log=print):
    """-> (method module, frame size, normalize function)."""
    clip_model = None
    if args.method != "simvtp":
        if args.clip is None and args.data == "synthetic":
            cache_dir = args.cache_dir or default_cache_dir()
            if is_master():
                clip_model = tiny_clip(cache_dir, args.data_path, log)
            barrier()
            clip_model = clip_model or tiny_clip(cache_dir, args.data_path, log)
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
    size = args.size or (clip_model.visual.input_resolution if clip_model is not None else None)
    if not size:
        raise SystemExit(f"error: {args.method} has no CLIP model to take the frame size from: pass --size")
    module = sys.modules[type(method).__module__]
    normalize = getattr(module, "normalize", None) if module.__name__ != "clip" else None
    return method.to(device), size, normalize or clip.normalize


# ----------------------------------------------------------------------------------------------------
# Distributed helpers, loss, optimizer, schedule

def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather(x):
    """Concatenate x from every rank in rank order; differentiable, the backward sums gradients (spec §3.1)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if x.requires_grad:
        return torch.cat(all_gather_with_grad(x.contiguous()))
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


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
    for g in groups:
        g.setdefault("lr", lr)
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


def lr_factor(step, total, warmup):
    """Linear warmup over the first warmup x total steps, then cosine to 0 (per step)."""
    w = int(warmup * total)
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(total - w, 1)))


# ----------------------------------------------------------------------------------------------------
# Training data order (deviation 5): resumable at any batch, the same global batches on 1 or N ranks

class EpochSampler(Sampler):
    def __init__(self, n, rank_batch, steps_per_epoch, accum, rank, world, seed):
        self.n, self.b, self.batches, self.rank, self.world, self.seed = n, rank_batch, steps_per_epoch * accum, rank, world, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start  # start: micro-batches of this epoch already done

    def __len__(self):
        return (self.batches - self.start) * self.b

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[:self.batches * self.world * self.b]
        mine = perm.view(self.batches, self.world, self.b)[self.start:, self.rank].flatten()  # [batches - start, b]
        return iter([(self.epoch, int(i)) for i in mine])


class SeededItems(Dataset):
    """Item (epoch, i) is drawn under a torch seed made of (seed, epoch, i): random frames repeat exactly."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 100_000_007 + i)
            return self.dataset[i]


def _worker_init(_):
    torch.set_num_threads(1)
    getattr(data, "_worker_init", lambda _: None)(_)


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
    t2v_sim, v2t_sim = sim, sim
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
    metrics = {"": retrieval_metrics(sim, split.caption_video)}
    if args.dsl:
        metrics["DSL "] = retrieval_metrics(sim, split.caption_video, dsl=True)
    method.train(was_training)
    return {f"{label}{d}": m for label, rows in metrics.items() for d, m in rows.items()}


def table(metrics):
    lines = [f"{'':>12} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MdR':>6} {'MnR':>7}"]
    for name, m in metrics.items():
        lines.append(f"{name:>12} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} {m['MdR']:6.1f} {m['MnR']:7.2f}")
    return "\n".join(lines)


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


def rng_state():
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), numpy=torch.from_numpy(np_state[1].astype(np.int64)),
                numpy_pos=int(np_state[2]), python=torch.tensor(random.getstate()[1], dtype=torch.int64),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"]))
    random.setstate((3, tuple(s["python"].tolist()), None))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def trainable_state(method):
    return {n: p.detach().cpu().clone() for n, p in method.named_parameters() if p.requires_grad}


def load_trainable(method, state, path):
    """Strict on the trainable set: the checkpoint must hold exactly the tensors that train here."""
    names = set(trainable_state(method))
    if set(state) != names:
        raise ValueError(f"{path} does not match this model's trainable tensors: missing "
                         f"{sorted(names - set(state))[:5]}, unexpected {sorted(set(state) - names)[:5]} "
                         "(same --method and method flags as the run that wrote it?)")
    method.load_state_dict(state, strict=False)


def save_checkpoint(path, method, opt, scaler, step, epoch, batch, args):
    rng = [rng_state()]
    if dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, rng_state())
    if is_master():
        atomic_save(dict(model=trainable_state(method), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                         step=step, epoch=epoch, batch=batch, rng=rng,
                         args={k: v for k, v in vars(args).items() if k != "kwargs"}), path)


# ----------------------------------------------------------------------------------------------------
# The run

def main(argv=None):
    args, cls = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None
    amp = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    pretrain = args.stage == "pretrain"

    method, args.size, normalize = build_method(args, cls, device, log)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    if args.init:
        state = torch.load(args.init, map_location="cpu", weights_only=True)
        missing, unexpected = method.load_state_dict(state.get("model", state), strict=False)
        log(f"--init {args.init}: {len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected "
            f"{unexpected[:4]}")
    n_train = sum(p.numel() for p in method.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in method.parameters())
    log(f"{args.method}: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.3f}%); "
        f"device {device}, world {world}, amp {amp_dtype}, frames {args.frames}x{args.size}px, words {args.words}")
    os.makedirs(args.output_dir, exist_ok=True)
    jsonl = open(os.path.join(args.output_dir, "log.jsonl"), "a") if master else None

    def record(**row):
        if jsonl:
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()

    metrics = None
    test = None if pretrain else data.read_split(args.data, "test", args.data_path, args.video_path, args.allow_missing)
    if args.eval_only or args.epochs == 0:
        if args.checkpoint:
            load_trainable(method, torch.load(args.checkpoint, map_location="cpu", weights_only=True)["model"],
                           args.checkpoint)
        if master:
            metrics = evaluate(method, test, args, device, normalize, amp)
            record(event="eval", epoch=None, **metrics)
            log(f"{args.method} on {args.data} test ({len(test.captions)} captions, {len(test.videos)} videos)\n"
                + table(metrics))
        barrier()
        return metrics if master else None

    # data: the same global batches on 1 or N ranks
    if args.batch_size % (world * args.accum):
        raise SystemExit(f"error: --batch_size {args.batch_size} must divide by world x accumulation "
                         f"= {world * args.accum}")
    rank_batch = args.batch_size // (world * args.accum)
    train = data.read_split(args.data, "train", args.data_path, args.video_path, args.allow_missing)
    train_ds = data.VideoTextDataset(train, frames=args.frames, words=args.words, size=args.size, train=True,
                                     frame_cache=args.frame_cache)
    steps_per_epoch = len(train_ds) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_ds)} training pairs make no batch of {args.batch_size}")
    sampler = EpochSampler(len(train_ds), rank_batch, steps_per_epoch, args.accum, rank, world, args.seed)
    loader = DataLoader(SeededItems(train_ds, args.seed), batch_size=rank_batch, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0, worker_init_fn=_worker_init)

    # optimizer over trainable parameters only; DDP wrapper for the gradient all-reduce
    groups = param_groups(method, args.lr, args.clip_lr, args.weight_decay)
    opt = torch.optim.AdamW(groups, betas=args.betas, eps=args.eps)
    forward = Forward(method, pretrain)
    model = DDP(forward, device_ids=[device] if device.type == "cuda" else None) if world > 1 else forward
    params = [p for g in groups for p in g["params"]]
    total = steps_per_epoch * args.epochs
    step, start_epoch, start_batch = 0, 0, 0
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: --resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        load_trainable(method, ck["model"], ckpt_path)
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        step, start_epoch, start_batch = ck["step"], ck["epoch"], ck["batch"]
        set_rng_state(ck["rng"][rank if len(ck["rng"]) == world else 0])
        log(f"resumed from {ckpt_path}: step {step}, epoch {start_epoch}, batch {start_batch}")
    log(f"{len(train_ds)} training pairs, {steps_per_epoch} steps/epoch x {args.epochs} epochs of "
        f"{args.batch_size} ({rank_batch} per rank x {world} ranks x {args.accum} accumulation)")

    best, metrics, stop, last = None, None, False, {"loss": math.nan}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        method.train()
        bar = tqdm(total=steps_per_epoch, initial=step - epoch * steps_per_epoch, desc=f"epoch {epoch + 1}",
                   disable=not master, leave=False, dynamic_ncols=True)
        batch_no = start_batch if epoch == start_epoch else 0
        t_last, wait, seen, losses = time.time(), 0.0, 0, []
        t_fetch = time.time()
        for batch in loader:
            wait += time.time() - t_fetch
            batch_no += 1
            video = normalize(batch["video"].to(device, non_blocking=True))
            text, mask = batch["text"].to(device, non_blocking=True), batch["video_mask"].to(device, non_blocking=True)
            last_micro = batch_no % args.accum == 0
            with (model.no_sync() if world > 1 and not last_micro else nullcontext()), amp:
                if pretrain:
                    parts = model(text, video, mask)
                    loss = parts["loss"]
                else:
                    t, v = model(text, video, mask)
                    loss, parts = contrastive_loss(method, t, v, mask), {}
                scaler.scale(loss / args.accum).backward()
            losses.append({"loss": loss.item(), **{k: float(x) for k, x in parts.items() if k != "loss"}})
            seen += len(text) * world
            if not last_micro:
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
            if method.logit_scale.requires_grad:
                with torch.no_grad():
                    method.logit_scale.clamp_(max=math.log(100))  # CLIP4Clip clamps after every step
            step += 1
            bar.update(1)
            if step % args.log_every == 0 or batch_no == steps_per_epoch * args.accum:
                dt, n = time.time() - t_last, len(losses) // args.accum
                last = {k: sum(x[k] for x in losses) / len(losses) for k in losses[-1]}
                row = dict(event="train", step=step, epoch=epoch + batch_no / (steps_per_epoch * args.accum), **last,
                           lr=opt.param_groups[0]["lr"], step_time=dt / n, clips_per_s=seen / dt, data_wait=wait / dt)
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                record(**row)
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{row['lr']:.1e}", clips_s=f"{seen / dt:.0f}",
                                wait=f"{100 * wait / dt:.0f}%")
                t_last, wait, seen, losses = time.time(), 0.0, 0, []
            if (args.save_every and step % args.save_every == 0) or step == args.max_steps:
                save_checkpoint(ckpt_path, method, opt, scaler, step, epoch, batch_no, args)
            if step == args.max_steps:
                stop = True
                break
            t_fetch = time.time()
        bar.close()
        if stop:
            log(f"stopped at step {step} (--max_steps); continue with --resume")
            break
        if not pretrain and master:
            metrics = evaluate(method, test, args, device, normalize, amp)
            record(event="eval", epoch=epoch + 1, step=step, **metrics)
            log(f"epoch {epoch + 1}/{args.epochs}, step {step}, loss {last['loss']:.4f}\n"
                + table(metrics))
            if best is None or metrics["t2v"]["R@1"] > best[1]:
                best = (epoch + 1, metrics["t2v"]["R@1"])
        barrier()
        save_checkpoint(ckpt_path, method, opt, scaler, step, epoch + 1, 0, args)
    if train_ds.substitutions:
        log(f"WARNING: {train_ds.substitutions} training items used a substitute for an unreadable video: "
            f"{train_ds.corrupt_videos[:5]}")
    if metrics and master:
        log(f"final ({args.method}, {args.data}, epoch {args.epochs}; best t2v R@1 {best[1]:.1f} at epoch "
            f"{best[0]}, test-selected as in CLIP4Clip)\n" + table(metrics))
    if jsonl:
        jsonl.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
