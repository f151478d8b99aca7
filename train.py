"""train.py: the one training loop of nanoTVR (every method, both baselines, evaluation, checkpoints).

  python train.py --method ump                       # CPU, minutes: synthetic set + tiny CLIP, train, evaluate
  python train.py --method zeroshot                  # frozen CLIP, mean of frames: evaluation only
  python train.py --method ump --data msrvtt --clip ViT-B/32 --data_path ANN --video_path VIDEOS   # 1 GPU
  torchrun --standalone --nproc_per_node=4 train.py --method dgl --data msrvtt ...   # 4 GPUs, global batch
  python train.py --method full --eval_only --checkpoint out/full-synthetic/checkpoint.pt
  python train.py --method simvtp --stage pretrain ...; python train.py --method simvtp --init CKPT ...

Flags follow CLIP4Clip's (main_task_retrieval.py) where it has one; defaults come from the method's RECIPE,
then its DATASET_RECIPES[--data], then the command line; every other RECIPE key is a constructor argument and
a flag (`--K_d 0`). What a method class must provide is its contract (docs/design.md). Faithful to CLIP4Clip's
loop (symmetric InfoNCE over the global batch, meanP, its tie and multi-caption metric rules). Deviations:
 1. The all-gather sums gradients: N ranks give the one-process gradient (CLIP4Clip's gives 1/N of it).
 2. AdamW (bias-corrected) instead of BertAdam; cosine over the steps after warmup, not the whole run.
 3. Default decay groups exempt biases, LayerNorms, embeddings, logit_scale (CLIP4Clip: biases only).
 4. `full`: fp32 masters + autocast, CLIP at lr 1e-7. CLIP4Clip's CLIP trains in pure fp16 by accident, where
    most 1e-7 updates round away; CLIP4Clip issue #96 reports R@1 ~43 with it, ~40 without. Expect ~40.
 5. Batches: one permutation per (seed, epoch) cut into global batches, rank r reads slice r of each; random
    frames seeded per (epoch, item). 1 or N ranks see the same batches; --resume is exact mid-epoch too.
"""
import argparse
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

import adapter
import clip
import data
import dgl
import meanp
import retrieval
import simvtp
import synthetic
import ump
import unipt

# --method -> (class, its RECIPE, its per-data-set overrides); --stage pretrain uses PRETRAINING
METHODS = {"zeroshot": (meanp.ZeroShot, meanp.RECIPE, meanp.DATASET_RECIPES),
           "full": (meanp.MeanP, meanp.RECIPE, meanp.DATASET_RECIPES),
           "ump": (ump.UMP, ump.RECIPE, ump.DATASET_RECIPES),
           "dgl": (dgl.DGL, dgl.RECIPE, dgl.DATASET_RECIPES),
           "adapter": (adapter.CrossModalAdapter, adapter.RECIPE, adapter.DATASET_RECIPES),
           "unipt": (unipt.UniPT, unipt.RECIPE, unipt.DATASET_RECIPES),
           "simvtp": (simvtp.SimVTP, simvtp.RECIPE, simvtp.DATASET_RECIPES)}
PRETRAINING = {"simvtp": (simvtp.SimVTPPretraining, simvtp.PRETRAIN_RECIPE, simvtp.PRETRAIN_DATASET_RECIPES)}
STANDARD = ("lr", "clip_lr", "epochs", "batch_size", "frames", "words", "weight_decay", "warmup", "grad_clip",
            "betas", "eps", "size")  # the loop's own hyperparameters; every other RECIPE key goes to the class
DEFAULT_ADAMW = dict(betas=(0.9, 0.999), eps=1e-8)  # torch's, for a RECIPE that names none
MAX_LOGIT_SCALE = math.log(100)  # CLIP and CLIP4Clip clamp the learnt temperature here after every step
# Seeds of the training order (deviation 5): large primes, so that (seed, epoch, item) never collide
EPOCH_STRIDE, SEED_STRIDE, ITEM_STRIDE = 100_003, 1_000_003, 100_000_007


# ----------------------------------------------------------------------------------------------------
# Arguments: --method/--data/--stage first (they choose the recipe), then every flag with recipe defaults

def boolean(s):  # argparse reports the ValueError as "invalid boolean value"
    return ("false", "true").index(s.lower()) == 1


def flag_type(default):
    return boolean if isinstance(default, bool) else str if default is None else type(default)


def parse_args(argv=None):
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--method", help=f"one of {', '.join(METHODS)}")
    first.add_argument("--data", default="synthetic", help=f"one of {', '.join(data.DATASETS)}")
    first.add_argument("--stage", default="finetune", choices=("pretrain", "finetune"),
                       help="pretrain: the method's pretraining objective (SimVTP), no evaluation")
    a, _ = first.parse_known_args(argv)
    helping = {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv)
    for flag, value, allowed in (("--method", a.method, tuple(METHODS)), ("--data", a.data, data.DATASETS)):
        if value not in allowed and not helping:
            first.error(f"{flag} {value!r} is not known; choose from {', '.join(allowed)}")
    if a.stage == "pretrain" and a.method not in PRETRAINING and not helping:
        first.error(f"--stage pretrain exists for {', '.join(PRETRAINING)}, not {a.method}")
    cls, recipe, dataset_recipes = (PRETRAINING if a.stage == "pretrain" else METHODS).get(a.method, (None, {}, {}))
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
        if getattr(args, k) is None:
            setattr(args, k, recipe.get(k, DEFAULT_ADAMW.get(k)))
    args.clip_lr = args.clip_lr if args.coef_lr is None else args.lr * args.coef_lr
    args.betas, args.kwargs = tuple(args.betas), {k: getattr(args, k) for k in extra}
    args.output_dir = args.output_dir or os.path.join("out", f"{args.method}-{args.data}")
    for flag, path in (("--checkpoint", args.checkpoint), ("--init", args.init)):
        if path and not os.path.isfile(path):
            p.error(f"{flag} {path}: no such file")
    return args, cls


# ----------------------------------------------------------------------------------------------------
# The model: CLIP (or the tiny CLIP of the synthetic default), then the method on top of it

def build_method(args, cls, device, log=print):
    """-> the method on `device`; sets args.size when the CLIP model decides it."""
    clip_model = None
    if cls.uses_clip:
        if args.clip is None and args.data == "synthetic":
            cache_dir = args.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanotvr")
            if not is_master():  # rank 0 pretrains and caches it, the others read the cache
                dist.barrier()
            clip_model = synthetic.tiny_clip(cache_dir, args.data_path, log)
            if dist.is_initialized() and is_master():
                dist.barrier()
        else:
            clip_model = clip.load(args.clip or "ViT-B/32")
        args.size = args.size or clip_model.visual.input_resolution
    elif not args.size:
        raise SystemExit(f"error: {args.method} has no CLIP model to take the frame size from: pass --size")
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    if cls.uses_clip:
        method = cls(clip_model, args.frames, **args.kwargs)
    else:
        method = cls(args.frames, size=args.size, **args.kwargs)
    return method.to(device)


# ----------------------------------------------------------------------------------------------------
# Distributed helpers, loss, optimizer, schedule

def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def gather(x):
    """Concatenate x from every rank in rank order; differentiable, the backward sums gradients."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if x.requires_grad:
        return torch.cat(all_gather_with_grad(x.contiguous()))
    y = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()  # gloo has no bool
    out = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(out, y)
    return torch.cat(out).to(x.dtype)


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


def param_groups(method, lr, clip_lr, weight_decay):
    """The method's AdamW groups; a group marked clip=True trains at clip_lr, the others at lr."""
    groups = [dict(g) for g in method.param_groups(weight_decay)]
    seen = [id(p) for g in groups for p in g["params"]]
    if sorted(seen) != sorted(id(p) for p in method.parameters() if p.requires_grad):
        raise ValueError("param_groups() must list every trainable parameter exactly once")
    for g in groups:
        g["lr"] = g["base_lr"] = clip_lr if g.pop("clip", False) else lr
    return [g for g in groups if g["params"]]


def lr_factor(step, total, warmup):
    """Linear warmup over the first warmup x total steps, then cosine to 0 (per step)."""
    w = int(warmup * total)
    return (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(total - w, 1)))


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
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + self.epoch))
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
            torch.manual_seed((self.seed * SEED_STRIDE + key[0]) * ITEM_STRIDE + key[1])
            return self.dataset[key[1]]


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


def resume(path, method, opt, scaler, rank, world):
    """Load <output_dir>/checkpoint.pt into the method, optimizer, scaler and generators: -> (step, epoch, batch)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume: no checkpoint at {path}")
    ck = load_trainable(method, path)
    opt.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    set_rng_state(ck["rng"][rank if len(ck["rng"]) == world else 0])
    return ck["step"], ck["epoch"], ck["batch"]


# ----------------------------------------------------------------------------------------------------
# The phases of a run

def setup(args):
    """Processes and precision: -> (device, world, rank, autocast context, its dtype, GradScaler)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if world > 1:  # torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = None if device.type != "cuda" else torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    amp = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return device, world, rank, amp, amp_dtype, scaler


def train_loader(args, world, rank, device):
    """Global batches cut from one permutation per epoch, rank r reads slice r of each (deviation 5)."""
    if args.batch_size % (world * args.accum):
        raise SystemExit(f"error: --batch_size {args.batch_size} must divide by ranks x accumulation ({world * args.accum})")
    rank_batch = args.batch_size // (world * args.accum)
    split = data.read_split(args.data, "train", args.data_path, args.video_path, args.allow_missing)
    ds = data.VideoTextDataset(split, frames=args.frames, words=args.words, size=args.size, train=True,
                               frame_cache=args.frame_cache)
    steps_per_epoch = len(ds) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(ds)} training pairs make no batch of {args.batch_size}")
    sampler = EpochSampler(len(ds), rank_batch, steps_per_epoch * args.accum, rank, world, args.seed)
    loader = DataLoader(SeededItems(ds, args.seed), batch_size=rank_batch, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0, worker_init_fn=data._worker_init)
    return ds, loader, sampler, steps_per_epoch


def train_epoch(epoch, batch_no, step, *, model, method, loader, opt, scaler, params, amp, device, args, total,
                steps_per_epoch, world, record, log):
    """One epoch from micro-batch `batch_no` on: -> (step, mean losses of the last logging window, stopped)."""
    micro, pretrain, master = args.accum, args.stage == "pretrain", is_master()
    bar = tqdm(total=steps_per_epoch, initial=batch_no // micro, desc=f"epoch {epoch + 1}", disable=not master,
               leave=False, dynamic_ncols=True)
    t_log = t_fetch = time.time()
    wait, seen, losses, last = 0.0, 0, [], {"loss": math.nan}
    for batch in loader:
        wait += time.time() - t_fetch
        batch_no += 1
        video = method.normalize_pixels(batch["video"].to(device, non_blocking=True))
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
            method.logit_scale.data.clamp_(max=MAX_LOGIT_SCALE)
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
            bar.close()
            return step, last, batch_no
        t_fetch = time.time()
    bar.close()
    return step, last, None


def main(argv=None):
    # setup: flags, processes, precision, the output folder and its log
    args, cls = parse_args(argv)
    device, world, rank, amp, amp_dtype, scaler = setup(args)
    master, pretrain = rank == 0, args.stage == "pretrain"
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    os.makedirs(args.output_dir, exist_ok=True)
    jsonl = open(os.path.join(args.output_dir, "log.jsonl"), "a") if master else None

    def record(**row):
        if jsonl:
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()

    try:
        # data and model
        if args.data == "synthetic":
            args.data_path = synthetic.ensure_synthetic(args.data_path)
        method = build_method(args, cls, device, log)
        torch.manual_seed(args.seed + rank), random.seed(args.seed + rank), np.random.seed(args.seed + rank)
        if args.init:
            state = torch.load(args.init, map_location="cpu", weights_only=True)
            missing, unexpected = method.load_state_dict(state.get("model", state), strict=False)
            log(f"--init {args.init}: {len(missing)} missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}")
        n_all = sum(p.numel() for p in method.parameters())
        n_train = sum(p.numel() for p in method.parameters() if p.requires_grad)
        log(f"{args.method}: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.3f}%); device "
            f"{device} x {world}, autocast {amp_dtype}, {args.frames} frames of {args.size} px, {args.words} words")
        test = None if pretrain else data.read_split(args.data, "test", args.data_path, args.video_path, args.allow_missing)
        if args.eval_only or n_train == 0:  # zeroshot: nothing trains
            if args.checkpoint:
                load_trainable(method, args.checkpoint)
            metrics = retrieval.evaluate(method, test, args, device, amp) if master else None
            record(event="eval", epoch=None, **(metrics or {}))
            log(f"{args.method} on {args.data} test ({len(test.captions)} captions, {len(test.videos)} videos)\n"
                + retrieval.table(metrics or {}))
            return metrics
        train_ds, loader, sampler, steps_per_epoch = train_loader(args, world, rank, device)

        # optimizer: AdamW over the trainable parameters only; DDP reduces their gradients
        groups = param_groups(method, args.lr, args.clip_lr, args.weight_decay)
        opt = torch.optim.AdamW(groups, betas=args.betas, eps=args.eps)
        params = [p for g in groups for p in g["params"]]
        forward = Forward(method, pretrain)
        model = DDP(forward, device_ids=[device] if device.type == "cuda" else None) if world > 1 else forward
        total, step, start_epoch, start_batch = steps_per_epoch * args.epochs, 0, 0, 0
        ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
        if args.resume:
            step, start_epoch, start_batch = resume(ckpt_path, method, opt, scaler, rank, world)
            log(f"resumed from {ckpt_path}: step {step}, epoch {start_epoch}, batch {start_batch}")
        log(f"{len(train_ds)} training pairs: {steps_per_epoch} steps/epoch x {args.epochs} epochs of "
            f"{args.batch_size} ({args.batch_size // (world * args.accum)} per rank x {world} ranks x {args.accum} accumulation)")

        # the loop: an epoch, its checkpoint, its evaluation
        metrics, loop = None, dict(model=model, method=method, loader=loader, opt=opt, scaler=scaler, params=params,
                                   amp=amp, device=device, args=args, total=total, steps_per_epoch=steps_per_epoch,
                                   world=world, record=record, log=log)
        for epoch in range(start_epoch, args.epochs):
            batch_no = start_batch if epoch == start_epoch else 0
            sampler.set_epoch(epoch, batch_no)
            method.train()
            step, last, stopped_at = train_epoch(epoch, batch_no, step, **loop)
            if stopped_at is not None:
                save_checkpoint(ckpt_path, method, opt, scaler, step, epoch, stopped_at, args)
                log(f"stopped at step {step} (--max_steps); continue with --resume")
                break
            if not pretrain and master:
                metrics = retrieval.evaluate(method, test, args, device, amp)
                record(event="eval", epoch=epoch + 1, step=step, **metrics)
                log(f"epoch {epoch + 1}/{args.epochs}, step {step}, loss {last['loss']:.4f}\n" + retrieval.table(metrics))
            save_checkpoint(ckpt_path, method, opt, scaler, step, epoch + 1, 0, args)

        # summary
        if train_ds.substitutions:
            log(f"WARNING: {train_ds.substitutions} training items replaced an unreadable video: {train_ds.corrupt_videos[:5]}")
        if metrics:
            log(f"final ({args.method}, {args.data}, epoch {args.epochs})\n" + retrieval.table(metrics))
        return metrics
    finally:  # the one teardown path
        if jsonl:
            jsonl.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
