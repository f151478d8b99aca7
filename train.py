"""train.py: the one training loop of nanoTVR (every method, both baselines, evaluation, checkpoints).

  python train.py --method ump                       # CPU, minutes: synthetic set + tiny CLIP, train, evaluate
  python train.py --method zeroshot                  # frozen CLIP, mean of frames: evaluation only
  python train.py --method ump --data msrvtt --clip ViT-B/32 --data_path ANN --video_path VIDEOS   # 1 GPU
  torchrun --standalone --nproc_per_node=4 train.py --method dgl --data msrvtt ...   # 4 GPUs, global batch
  python train.py --method ump --resume              # continue the run in out/ump-synthetic, exactly
  python train.py --method full --eval_only --checkpoint out/full-synthetic/checkpoint.pt
  python train.py --method simvtp --stage pretrain ...; python train.py --method simvtp --init CKPT ...

Flags follow CLIP4Clip's (main_task_retrieval.py) where it has one, X-Pool/UMP's --num_frames, --num_epochs and
--noclip_lr are aliases; defaults come from the method's RECIPE, then its DATASET_RECIPES[--data], then the
command line; every other RECIPE key is a constructor argument and a flag (`--K_d 0`). What a method class must
provide is its contract (docs/design.md). Faithful to CLIP4Clip's loop (symmetric InfoNCE over the global batch,
meanP, its tie and multi-caption metric rules).

A run owns its --output_dir (runs.py): log.jsonl, checkpoint.pt (every --save_every, at epoch ends before the
evaluation, at --max_steps, on SIGINT/SIGTERM after the step) and a lock. Bad flags and data stop before anything
slow with one line `error: ...` (exit 2); a non-finite loss or gradient stops at once (exit 1). Deviations:
 1. The all-gather sums gradients: N ranks give the one-process gradient (CLIP4Clip's gives 1/N of it).
 2. AdamW (bias-corrected) instead of BertAdam; cosine over the steps after warmup, not the whole run.
 3. Default decay groups exempt biases, LayerNorms, embeddings, logit_scale (CLIP4Clip: biases only).
 4. `full`: fp32 masters + autocast, CLIP at lr 1e-7. CLIP4Clip's CLIP trains in pure fp16 by accident, where
    most 1e-7 updates round away; CLIP4Clip issue #96 reports R@1 ~43 with it, ~40 without. Expect ~40.
 5. Batches: one permutation per (seed, epoch) cut into global batches, rank r reads slice r of each; random
    frames seeded per (epoch, item), dropout and masks per (epoch, micro-batch, rank). 1 or N ranks see the same
    batches, and --resume is exact, mid-epoch too: nothing depends on what the global generator drew before
    (runs.py: EpochSampler, SeededItems, dropout_seed).
"""
import argparse
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import adapter
import clip
import data
import dgl
import meanp
import retrieval
import runs
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
           "simvtp": (simvtp.SimVTP, simvtp.RECIPE, simvtp.DATASET_RECIPES),
           # the releases' own forward passes, for comparison (each file's "Reproducing the release" section)
           "ump-release": (ump.UMPRelease, ump.RECIPE, ump.DATASET_RECIPES),
           "adapter-release": (adapter.CrossModalAdapterRelease, adapter.RECIPE, adapter.DATASET_RECIPES)}
PRETRAINING = {"simvtp": (simvtp.SimVTPPretraining, simvtp.PRETRAIN_RECIPE, simvtp.PRETRAIN_DATASET_RECIPES)}
STANDARD = ("lr", "clip_lr", "epochs", "batch_size", "frames", "words", "weight_decay", "warmup", "grad_clip",
            "betas", "eps", "size")  # the loop's own hyperparameters; every other RECIPE key goes to the class
DEFAULT_ADAMW = dict(betas=(0.9, 0.999), eps=1e-8)  # torch's, for a RECIPE that names none
MAX_LOGIT_SCALE = math.log(100)  # CLIP and CLIP4Clip clamp the learnt temperature here after every step


def fail(message, status=2):
    """A user error: one line on stderr, exit 2 (as argparse); status 1 for a run that failed in training."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


# ----------------------------------------------------------------------------------------------------
# Arguments: --method/--data/--stage first (they choose the recipe), then every flag with recipe defaults

class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors in one line too
        fail(f"{message} (python train.py --method M --help lists M's flags)")


def boolean(s):  # argparse reports the ValueError as "invalid boolean value"
    return ("false", "true").index(s.lower()) == 1


def flag_type(default):
    return boolean if isinstance(default, bool) else str if default is None else type(default)


def save_interval(s):
    """--save_every: N optimizer steps, or N minutes as "Nmin"; 0: at epoch ends only."""
    if not 0 <= (float(s[:-3]) if s.endswith("min") else int(s)) < math.inf:
        raise ValueError(s)
    return s


def parse_args(argv):
    """-> (args, method class, the dests given on the command line); a bad flag exits 2 with one line."""
    first = Parser(prog="train.py", add_help=False, allow_abbrev=False)
    first.add_argument("--method", help=f"one of {', '.join(METHODS)}")
    first.add_argument("--data", default="synthetic", help=f"one of {', '.join(data.DATASETS)} (default synthetic)")
    first.add_argument("--stage", default="finetune", choices=("pretrain", "finetune"),
                       help="pretrain: the method's pretraining objective (SimVTP), no evaluation (default finetune)")
    a, _ = first.parse_known_args(argv)
    if not {"-h", "--help"} & set(argv):
        for flag, value, allowed in (("--method", a.method, tuple(METHODS)), ("--data", a.data, data.DATASETS)):
            if value not in allowed:
                fail(f"{flag} {value!r} is not known; choose from {', '.join(allowed)}")
        if a.stage == "pretrain" and a.method not in PRETRAINING:
            fail(f"--stage pretrain exists for {', '.join(PRETRAINING)}, not {a.method}")
    cls, recipe, dataset_recipes = (PRETRAINING if a.stage == "pretrain" else METHODS).get(a.method, (None, {}, {}))
    recipe = {**recipe, **dataset_recipes.get(a.data, {})}
    extra = {k: v for k, v in recipe.items() if k not in STANDARD}
    p = parser(first, a.method, cls, recipe, extra)
    args = p.parse_args(argv)
    given = {x.dest for x in p._actions if any(t.split("=")[0] in x.option_strings for t in argv)}
    for k in STANDARD:
        if getattr(args, k) is None:
            setattr(args, k, recipe.get(k, DEFAULT_ADAMW.get(k)))
    args.clip_lr = args.clip_lr if args.coef_lr is None else args.lr * args.coef_lr
    args.betas, args.kwargs = tuple(args.betas), {k: getattr(args, k) for k in extra}
    args.output_dir = args.output_dir or os.path.join("out", f"{args.method}-{args.data}")
    args.eval_only = args.eval_only or bool(args.query)
    problems = runs.flag_problems(args, cls)
    if problems:
        fail("; ".join(problems))
    return args, cls, given


def parser(first, method, cls, recipe, extra):
    """Every flag, with the default that applies to the chosen method in its help."""

    dest = {flag: d for d, flag in runs.FLAG.items()}.get  # --max_frames -> frames, ...

    def default(k, none="none"):
        v = recipe.get(k, DEFAULT_ADAMW.get(k))
        return f"default {none if v is None else v}" if cls else "default: set by --method"

    p = Parser(prog="train.py", parents=[first], allow_abbrev=False, description=__doc__.split("\n")[0],
               epilog=None if cls else "python train.py --method M --help shows M's defaults and its own flags.")
    for flags, kind, text in (  # value flags; None defaults are filled from the recipe below
            ("--clip", str, "CLIP name (ViT-B/32, ...) or file (default: tiny CLIP for synthetic, else ViT-B/32)"),
            ("--data_path", str, "annotation directory (synthetic: generated there on first use)"),
            ("--video_path", str, "video directory (synthetic: <data_path>/videos)"),
            ("--frame_cache", str, "data.py's uint8 frame cache (python data.py --cache DIR ...)"),
            ("--output_dir", str, "the run's folder: log.jsonl, checkpoint.pt (default out/<method>-<data>)"),
            ("--cache_dir", str, "tiny CLIP cache (default $XDG_CACHE_HOME/nanotvr or ~/.cache/nanotvr)"),
            ("--init", str, "load model weights from a (pretraining) checkpoint, non-strict"),
            ("--checkpoint", str, "with --eval_only: the checkpoint to evaluate"),
            ("--query", str, "print the --top_k test videos (or --data folder videos) for this caption and draw them in "
             "<output_dir>/query.png; needs --checkpoint (or --method zeroshot), implies --eval_only"),
            ("--size", int, f"frame size ({default('size', 'the CLIP model input resolution')})"),
            ("--batch_size", int, f"global batch per optimizer step ({default('batch_size')})"),
            ("--lr --noclip_lr", float, f"learning rate of the new (non-CLIP) parameters ({default('lr')})"),
            ("--clip_lr", float, f"of trainable CLIP parameters ({default('clip_lr', 'none: no CLIP weight trains')})"),
            ("--coef_lr", float, "clip_lr = lr x coef_lr (CLIP4Clip's flag; default unset)"),
            ("--epochs --num_epochs", int, f"({default('epochs')})"),
            ("--max_frames --num_frames", int, f"frames per clip ({default('frames')})"),
            ("--max_words", int, f"text tokens with [SOT] and [EOT] ({default('words')})"),
            ("--warmup_proportion", float, f"linear warmup, share of the steps ({default('warmup')})"),
            ("--weight_decay", float, f"AdamW's, on the method's decay groups ({default('weight_decay')})"),
            ("--grad_clip", float, f"max gradient norm, 0: none ({default('grad_clip')})"),
            ("--eps", float, f"AdamW's epsilon ({default('eps')})")):
        p.add_argument(*flags.split(), dest=dest(flags.split()[0]), type=kind, help=text)
    p.add_argument("--betas", type=float, nargs=2, help=f"AdamW's ({default('betas')})")
    for flag, kind, value, text in (
            ("--gradient_accumulation_steps", int, 1, "forward passes per step, batch_size/accum pairs each (CLIP4Clip)"),
            ("--seed", int, 42, "initial weights, data order, frames, dropout"),
            ("--num_workers", int, 2, "data loading processes per rank (0: in the main process)"),
            ("--batch_size_val", int, 64, "evaluation batch"), ("--log_every", int, 20, "a log.jsonl row every N steps"),
            ("--save_every", save_interval, "30min", "also checkpoint every N steps, or N minutes as Nmin; 0: epoch ends only"),
            ("--max_steps", int, 0, "checkpoint and stop after N steps in all (0: no limit)"),
            ("--top_k", int, 5, "videos --query prints"),
            ("--device", str, "cuda" if torch.cuda.is_available() else "cpu", "torch device")):
        p.add_argument(flag, dest=dest(flag), type=kind, default=value,
                       help=f"{text} (default {value})")
    for flag, text in (("--allow_missing", "use the videos that exist (say so when reporting)"),
                       ("--resume", "continue the run in --output_dir from its checkpoint.pt, exactly"),
                       ("--overwrite", "replace the run in --output_dir (its checkpoint.pt and log.jsonl)"),
                       ("--eval_only", "no training: evaluate --checkpoint (zeroshot: CLIP as it is)"),
                       ("--dsl", "also report DSL (CAMoE) metrics, as separate rows (transductive)")):
        p.add_argument(flag, action="store_true", help=text)
    group = p.add_argument_group(f"{method} hyperparameters (RECIPE; constructor arguments)") if cls else p
    for k, v in extra.items():
        seq = isinstance(v, (tuple, list))
        group.add_argument(f"--{k}", type=flag_type(v[0] if seq else v), nargs=len(v) if seq else None, default=v,
                           help=f"constructor argument, see RECIPE in {cls.__module__}.py (default {v})")
    return p


# ----------------------------------------------------------------------------------------------------
# The model: CLIP (or the tiny CLIP of the synthetic default), then the method on top of it

def construct(args, cls, clip_model):
    """The method on clip_model; its constructor's ValueErrors are what a user fixes with a flag."""
    try:
        if cls.uses_clip:
            return cls(clip_model, args.frames, **args.kwargs)
        return cls(args.frames, size=args.size, **args.kwargs)
    except ValueError as e:
        fail(f"--method {args.method}: {e}")


def probe_method(args, cls, given, log):
    """The method built on a meta-device stand-in of its CLIP towers (no weights), when they are known before
    loading: every constructor check and flag check before anything slow. -> the stand-in method, or None."""
    stand_in = runs.clip_stand_in(args) if cls.uses_clip else None
    if cls.uses_clip and stand_in is None:
        return None
    args.size = args.size or (stand_in.visual.input_resolution if stand_in else None)
    try:
        with torch.device("meta"):
            method = construct(args, cls, stand_in)
    except Exception:  # a constructor that needs real tensors: checked once built
        return None
    runs.check_method(args, given, method, log)
    return method


def load_clip(args, log):
    tiny_clip_data = args.data_path if args.data == "synthetic" else getattr(args, "tiny_clip_data", None)
    if args.clip is None and tiny_clip_data:
        cache_dir = args.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanotvr")
        if not is_master():  # rank 0 pretrains and caches it, the others read the cache
            dist.barrier()
        clip_model = synthetic.tiny_clip(cache_dir, tiny_clip_data, log)
        if dist.is_initialized() and is_master():
            dist.barrier()
        return clip_model
    return clip.load(args.clip or "ViT-B/32")


def build_method(args, cls, device, log, unchecked=None):
    """-> the method on `device`, --init loaded; sets args.size when the CLIP model decides it. unchecked: the
    flags given, when the method could not be probed before the CLIP file was loaded."""
    clip_model = load_clip(args, log) if cls.uses_clip else None
    args.size = args.size or (clip_model.visual.input_resolution if clip_model else None)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    method = construct(args, cls, clip_model)
    if unchecked is not None:
        runs.check_method(args, unchecked, method, log)
    if args.init:
        runs.load_init(method, args.init, log)
    return method.to(device)


# ----------------------------------------------------------------------------------------------------
# Distributed helpers, loss, optimizer, schedule

def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


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


def diverged(what, step, opt):
    lrs = ", ".join(sorted({f"{g['lr']:.3g}" for g in opt.param_groups}))
    fail(f"non-finite {what} at step {step + 1} (lr {lrs}): try a lower --lr (or --clip_lr), a longer "
         f"--warmup_proportion or --grad_clip 1.0; nothing of this step was applied or saved", 1)


def train_epoch(pos, *, model, method, loader, opt, scaler, params, amp, device, args, total, steps_per_epoch,
                world, rank, record, checkpoints, stop):
    """Epoch pos["epoch"] from micro-batch pos["batch"] on, updating pos -> what stopped it early, or None.
    pos["window"]: the losses since the last log row (checkpointed: resumed rows equal uninterrupted ones)."""
    micro, pretrain, epoch, n_micro = args.accum, args.stage == "pretrain", pos["epoch"], steps_per_epoch * args.accum
    tty = sys.stderr.isatty()  # a bar on a terminal; plain lines into a file (no carriage returns)
    plain = not (tty and sys.stdout.isatty())
    bar = tqdm(total=steps_per_epoch, initial=pos["batch"] // micro, desc=f"epoch {epoch + 1}",
               disable=not (is_master() and tty), leave=False, dynamic_ncols=True)
    t_log = t_fetch = time.time()
    wait, seen, timed = 0.0, 0, 0
    for batch in loader:
        wait += time.time() - t_fetch
        # dropout and masks: a function of the position, whatever ran before (evaluation, loaders, a resume)
        torch.manual_seed(runs.dropout_seed(args.seed, epoch, pos["batch"], rank))
        for g in opt.param_groups if pos["batch"] % micro == 0 else ():
            g["lr"] = g["base_lr"] * lr_factor(pos["step"], total, args.warmup)
        pos["batch"] += 1
        video = method.normalize_pixels(batch["video"].to(device, non_blocking=True))
        text, mask = batch["text"].to(device, non_blocking=True), batch["video_mask"].to(device, non_blocking=True)
        with (model.no_sync() if world > 1 and pos["batch"] % micro else nullcontext()), amp:
            if pretrain:  # SimVTP: masked video/text modelling, a dict of losses with a "loss" entry
                parts = model(text, video, mask)
                loss = parts["loss"]
            else:
                loss, parts = contrastive_loss(method, *model(text, video, mask), mask), {}
            scaler.scale(loss / micro).backward()
        pos["window"].append({k: torch.as_tensor(x).item() for k, x in {**parts, "loss": loss}.items()})
        if not math.isfinite(pos["window"][-1]["loss"]):
            diverged("loss", pos["step"], opt)
        seen, timed = seen + len(text) * world, timed + 1
        if pos["batch"] % micro:
            t_fetch = time.time()
            continue
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
        if not scaler.is_enabled() and not math.isfinite(norm):  # fp16: the scaler skips such steps itself
            diverged("gradient", pos["step"], opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if method.logit_scale.requires_grad:  # CLIP4Clip clamps after every step
            method.logit_scale.data.clamp_(max=MAX_LOGIT_SCALE)
        pos["step"] += 1
        bar.update(1)
        if pos["step"] % args.log_every == 0 or pos["step"] == 1 or pos["batch"] == n_micro:  # 1: see it start
            dt, window = time.time() - t_log, pos["window"]
            pos["last"] = {k: sum(x[k] for x in window) / len(window) for k in window[-1]}
            row = dict(event="train", step=pos["step"], epoch=epoch + pos["batch"] / n_micro, **pos["last"],
                       lr=opt.param_groups[0]["lr"], step_time=dt * micro / timed, clips_per_s=seen / dt,
                       data_wait=wait / dt)
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            record(**row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", clips_s=f"{seen / dt:.0f}",
                            wait=f"{100 * wait / dt:.0f}%")
            if plain and is_master():
                print(f"epoch {epoch + 1} step {pos['step']}/{total}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, "
                      f"{seen / dt:.0f} clips/s, data wait {100 * wait / dt:.0f}%", flush=True)
            t_log, wait, seen, timed, pos["window"] = time.time(), 0.0, 0, 0, []
        why = stop.reason(pos["step"], args.max_steps, device) if pos["batch"] < n_micro else None  # else: epoch end
        if why or pos["batch"] < n_micro and checkpoints.due(pos["step"]):
            checkpoints.save(pos)
        if why:
            break
        t_fetch = time.time()
    bar.close()
    return why


def epoch_line(epoch, args, step, last, seconds, metrics):
    """The line an epoch leaves on the console (its bar is gone): loss, time and, if evaluated, R@1/5/10."""
    line = f"epoch {epoch + 1}/{args.epochs}: step {step}, loss {last['loss']:.4f}, {seconds:.0f} s"
    for d in ("t2v", "v2t") if metrics else ():
        line += f"; {d} R@1 {metrics[d]['R@1']:.1f} R@5 {metrics[d]['R@5']:.1f} R@10 {metrics[d]['R@10']:.1f}"
    if metrics and "temporal" in metrics:
        line += f"; temporal pair accuracy {metrics['temporal']['pair_acc']:.1f}%"
    return line


def evaluate_epoch(method, test, args, device, amp, pos, record, resume, picture):
    """The evaluation after an epoch's checkpoint, and its retrievals.png; a failure says that the epoch is kept
    and how to evaluate it."""
    keep = {}
    try:
        metrics = retrieval.evaluate(method, test, args, device, amp, keep)
    except Exception as e:
        why = (str(e).strip() or type(e).__name__).splitlines()[-1]  # a worker's error: its last line
        print(f"error: the evaluation after epoch {pos['epoch']} failed ({why}); the epoch's training is kept in "
              f"its checkpoint: fix the cause, then `{resume}` evaluates it and goes on", file=sys.stderr, flush=True)
        if isinstance(e, (data.VideoError, OSError)):  # the data's fault, said above: no traceback
            raise SystemExit(1)
        raise
    record(event="eval", epoch=pos["epoch"], step=pos["step"], **metrics)
    retrieval.write_retrievals(picture, test, keep["sim"], f"{args.method} on {test.name}, epoch {pos['epoch']}")
    return metrics


def evaluate_only(method, test, args, device, amp, log, picture):
    """--eval_only, --query and zeroshot: evaluate and write <output_dir>/eval-<time>.json and retrievals.png (or
    search and draw query.png); never a training log."""
    ck = runs.read_checkpoint(args.checkpoint, "--checkpoint", keys=("model",)) if args.checkpoint else None
    if ck:
        runs.load_trainable(method, ck, args.checkpoint)
    if not is_master():
        return None
    os.makedirs(args.output_dir, exist_ok=True)
    if args.query:  # search the test videos (or a --data folder) for one caption
        return retrieval.search(method, args.query, test, args, device, amp, args.top_k,
                                os.path.join(args.output_dir, "query.png"), log)
    keep = {}
    metrics = retrieval.evaluate(method, test, args, device, amp, keep)
    path = runs.write_eval(args, metrics)
    step = f", {os.path.basename(args.checkpoint)} at step {ck['step']}" if ck and "step" in ck else ""
    retrieval.write_retrievals(picture, test, keep["sim"], f"{args.method} on {test.name}{step}")
    log(f"{args.method} on {args.data} test ({len(test.captions)} captions, {len(test.videos)} videos)\n"
        + retrieval.table(metrics) + f"\nrecord: {path}\nretrieved clips: {picture}")
    return metrics


def summary(args, train_ds, metrics, evaluated, ckpt, log_path, picture):
    """What a run leaves on the console at its end: the last evaluation (never one picked on the test split)
    and where its files are."""
    lines = [f"WARNING: {train_ds.substitutions} training items replaced an unreadable video: "
             f"{train_ds.corrupt_videos[:5]}"] if train_ds.substitutions else []
    if metrics:
        lines += [f"final: {args.method} on {args.data} test after epoch {evaluated} of {args.epochs} (the last "
                  f"evaluated; nothing is selected on the test split)", retrieval.table(metrics),
                  f"retrieved clips: {picture}"]
    if args.stage == "pretrain":
        lines.append(f"{args.method} pretraining checkpoint: {ckpt}; fine-tune from it with --init {ckpt}")
    return "\n".join(lines + [f"run folder {args.output_dir}: checkpoint {ckpt}, log {log_path}"])


def main(argv=None):
    # setup: flags and the method's own checks before anything slow, processes, precision, signals, the folder
    argv = sys.argv[1:] if argv is None else list(argv)
    args, cls, given = parse_args(argv)
    device, world, rank, amp, amp_dtype, scaler = setup(args)
    master, pretrain, folder, stop = rank == 0, args.stage == "pretrain", None, runs.Stop()
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    ckpt, log_path, picture = (os.path.join(args.output_dir, f) for f in ("checkpoint.pt", "log.jsonl", "retrievals.png"))
    try:
        if args.data == "folder" and args.checkpoint:
            runs.use_checkpoint_settings(args, log)
        probe = probe_method(args, cls, given, log)  # None: --clip names a file, checked once it is loaded
        evaluating = args.eval_only or probe is not None and not any(p.requires_grad for p in probe.parameters())
        folder = runs.Folder(args) if master and not evaluating else None  # refuses a run it would overwrite

        # data and model
        train_split, test = runs.read_data(args, pretrain, evaluating)
        if folder:
            folder.claim(args.overwrite)
            log(f"run folder {folder.dir}: checkpoint {ckpt}, log {log_path}")
        method = build_method(args, cls, device, log, given if probe is None else None)
        n_all = sum(p.numel() for p in method.parameters())
        n_train = sum(p.numel() for p in method.parameters() if p.requires_grad)
        log(f"{args.method}: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.3f}%); device "
            f"{device} x {world}, autocast {amp_dtype}, {args.frames} frames of {args.size} px, {args.words} words")
        if evaluating or n_train == 0:  # zeroshot: nothing trains
            return evaluate_only(method, test, args, device, amp, log, picture)
        train_ds, loader, sampler, steps_per_epoch = runs.train_loader(args, train_split, world, rank, device)

        # optimizer: AdamW over the trainable parameters only; DDP reduces their gradients; --resume's state
        groups = param_groups(method, args.lr, args.clip_lr, args.weight_decay)
        opt = torch.optim.AdamW(groups, betas=args.betas, eps=args.eps)
        model = Forward(method, pretrain)
        model = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
        pos = dict(step=0, epoch=0, batch=0, window=[], last=None)  # what the checkpoint holds of the loop
        if args.resume:
            runs.restore(folder.resumed if master else runs.read_checkpoint(ckpt, "--resume"), ckpt, method, opt, scaler, pos)
            log(f"resumed from {ckpt}: step {pos['step']}, epoch {pos['epoch']}, micro-batch {pos['batch']}"
                + "".join(f"; --{k} {b} (was {a})" for k, (a, b) in (folder.changed.items() if folder else ())))
        record, has_eval = folder.open_log(pos["step"], argv) if master else (lambda **row: None, True)
        log(f"{len(train_ds)} training pairs: {steps_per_epoch} steps/epoch x {args.epochs} epochs of {args.batch_size} "
            f"({args.batch_size // (world * args.accum)} per rank x {world} ranks x {args.accum} accumulation)")

        # the loop: an epoch, its checkpoint, then its evaluation (which may fail without losing the epoch)
        checkpoints = runs.Checkpoints(ckpt, method, opt, scaler, args)
        resume = runs.resume_command(argv, world)
        evaluate = lambda: (evaluate_epoch(method, test, args, device, amp, pos, record, resume, picture), pos["epoch"])
        metrics, evaluated = evaluate() if pos["epoch"] and not (pos["batch"] or has_eval or pretrain) else (None, None)
        loop = dict(model=model, method=method, loader=loader, opt=opt, scaler=scaler, amp=amp, device=device,
                    params=[p for g in groups for p in g["params"]], args=args, total=steps_per_epoch * args.epochs,
                    steps_per_epoch=steps_per_epoch, world=world, rank=rank, record=record, checkpoints=checkpoints,
                    stop=stop)
        stop.armed = True
        for epoch in range(pos["epoch"], args.epochs):
            sampler.set_epoch(epoch, pos["batch"])
            method.train()
            t_epoch = time.time()
            why = train_epoch(pos, **loop)
            if why is None:  # the epoch's end
                pos.update(epoch=epoch + 1, batch=0)
                checkpoints.save(pos)
                metrics, evaluated = evaluate() if not pretrain and master else (metrics, evaluated)
                log(epoch_line(epoch, args, pos["step"], pos["last"], time.time() - t_epoch, not pretrain and metrics))
                why = stop.reason(pos["step"], args.max_steps, device) if epoch + 1 < args.epochs else None
            if why:
                log(f"stopped by {why} at step {pos['step']} (epoch {pos['epoch'] + 1}, micro-batch {pos['batch']}): "
                    f"checkpoint {ckpt}; continue with\n  {resume}")
                stop.exit(why)  # a signal: exit 128 + its number
                break

        # summary
        log(summary(args, train_ds, metrics, evaluated, ckpt, log_path, picture))
        return metrics
    except (runs.RunError, data.DataError, clip.ModelFileError) as e:  # the fix is the user's: the message says it
        fail(e, getattr(e, "status", 2))
    finally:  # the one teardown path
        stop.restore()
        if folder:
            folder.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
