"""flags.py: the settings of a run, from train.py's (and query.py's) command line. One flat merge:
LOOP_DEFAULTS, then the method's RECIPE, then its DATASET_RECIPES[--data], then the flags given; every RECIPE key
the loop does not know is the method's constructor argument and a flag of its own (`--K_d 0`). Flag names
follow CLIP4Clip's main_task_retrieval.py; --num_frames, --num_epochs, --noclip_lr are X-Pool/UMP's aliases.
A bad flag is one line `error: ...` and exit 2, as argparse's own errors."""
import argparse
import math
import os
import sys

import torch

import checks
import data
import frames
from methods import METHODS, PRETRAINING


LOOP_DEFAULTS = dict(
    method=None, data="synthetic", stage="finetune", clip=None, data_path=None, video_path=None, frame_cache=None,
    output_dir=None, cache_dir=None, init=None, checkpoint=None, size=None, batch_size=None, lr=None, clip_lr=None,
    coef_lr=None, epochs=None, frames=None, words=None, warmup=None, weight_decay=None, grad_clip=None,
    betas=(0.9, 0.999), eps=1e-8,  # torch's AdamW defaults, for a RECIPE that names none
    # num_workers: 2 on the CPU; on a GPU the cores of a local rank but its main process's, at most 8 (each
    # worker holds 2 batches in shared memory). Any count gives the same batches (data.SeededItems).
    num_workers=min(8, max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
    if torch.cuda.is_available() else 2,
    accum=1, seed=42, batch_size_val=64, log_every=20, save_every="30min", max_steps=0,
    device="cuda" if torch.cuda.is_available() else "cpu", precision=None, query=None, top_k=5,
    sampling="segments", augment="none", pairs="caption", dist_timeout=30.0,
    allow_missing=False, resume=False, overwrite=False, eval_only=False, dsl=False, grad_checkpointing=False,
    compile=False)
NONE = dict(size="the CLIP model input resolution", clip_lr="none: no CLIP weight trains")  # an unset default
FLAG_NAMES = dict(frames="--max_frames", words="--max_words", warmup="--warmup_proportion",
                  accum="--gradient_accumulation_steps")  # settings whose flag has another name


def amp_dtype(precision, device):
    """--precision on `device` -> the autocast dtype, None for fp32."""
    precision = precision or ("fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return dict(fp32=None, bf16=torch.bfloat16, fp16=torch.float16)[precision]


def fail(message, status=2):
    """A user error: one line on stderr, exit 2 (as argparse); status 1 for a run that failed in training."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors in one line too
        fail(f"{message} (python {self.prog} --method M --help lists M's flags)")


def boolean(s):  # argparse reports the ValueError as "invalid boolean value"
    return ("false", "true").index(s.lower()) == 1


def save_interval(s):
    """--save_every: N optimizer steps, or N minutes as "Nmin"; 0: at epoch ends only."""
    if not 0 <= (float(s[:-3]) if s.endswith("min") else int(s)) < math.inf:
        raise ValueError(s)
    return s


# (flags, type, help): a tuple type is its choices, bool a switch; "{key}" in a help: the default, which the
# method's RECIPE may set; LOOP_DEFAULTS' other defaults are added to the help as "(default ...)"
FLAGS = (
    ("--method", str, f"one of {', '.join(METHODS)}"),
    ("--data", str, f"one of {', '.join(data.DATASETS)} (default synthetic)"),
    ("--stage", ("pretrain", "finetune"), "pretrain: the method's pretraining objective (SimVTP), no "
     "evaluation (default finetune)"),
    ("--clip", str, "CLIP name (ViT-B/32, ...) or file (default: tiny CLIP for synthetic, else ViT-B/32)"),
    ("--data_path", str, "annotation directory (synthetic: generated there on first use)"),
    ("--video_path", str, "video directory (synthetic: <data_path>/videos)"),
    ("--frame_cache", str, "a uint8 frame cache (python frame_cache.py --cache DIR ...)"),
    ("--output_dir", str, "the run's folder: log.jsonl, checkpoint.pt (default out/<method>-<data>)"),
    ("--cache_dir", str, "tiny CLIP cache (default $XDG_CACHE_HOME/nanotvr or ~/.cache/nanotvr)"),
    ("--init", str, "load model weights from a (pretraining) checkpoint, non-strict"),
    ("--checkpoint", str, "with --eval_only: the checkpoint to evaluate (query.py: to search with)"),
    ("--size", int, "frame size ({size})"),
    ("--batch_size", int, "global batch per optimizer step ({batch_size})"),
    ("--lr --noclip_lr", float, "learning rate of the new (non-CLIP) parameters ({lr})"),
    ("--clip_lr", float, "learning rate of the trainable CLIP parameters ({clip_lr})"),
    ("--coef_lr", float, "clip_lr = lr x coef_lr (CLIP4Clip's flag; default unset)"),
    ("--epochs --num_epochs", int, "({epochs})"),
    ("--max_frames --num_frames", int, "frames per clip ({frames})"),
    ("--max_words", int, "text tokens with [SOT] and [EOT] ({words})"),
    ("--sampling", frames.SAMPLING, "which frames fill the slots, by the method's release: clip4clip (1 fps, then 12 "
     "spread), uniform (X-Pool), dgl, window (SimVTP), segments (nanoTVR's) ({sampling})"),
    ("--augment", frames.AUGMENT, "training augmentation: crop_flip is UMP's RandomResizedCrop + flip ({augment})"),
    ("--pairs", ("caption", "video"), "training pairs: one per caption, or one per video as SimVTP ({pairs})"),
    ("--warmup_proportion", float, "linear warmup, share of the steps ({warmup})"),
    ("--weight_decay", float, "AdamW's, on the method's decay groups ({weight_decay})"),
    ("--grad_clip", float, "max gradient norm, 0: none ({grad_clip})"),
    ("--eps", float, "AdamW's epsilon ({eps})"),
    ("--betas", float, "AdamW's ({betas})"),
    ("--gradient_accumulation_steps", int, "forward passes per step, batch_size/accum pairs each (CLIP4Clip)"),
    ("--seed", int, "initial weights, data order, frames, dropout"),
    ("--num_workers", int, "data loading processes per rank (0: in the main process)"),
    ("--batch_size_val", int, "evaluation batch"),
    ("--log_every", int, "a log.jsonl row every N steps"),
    ("--save_every", save_interval, "also checkpoint every N steps, or N minutes as Nmin; 0: epoch ends only"),
    ("--max_steps", int, "checkpoint and stop after N steps in all (0: no limit)"),
    ("--device", str, "torch device"),
    ("--dist_timeout", float, "minutes a rank waits for the others in a training collective under torchrun "
     "(evaluation has no limit: the other ranks wait for rank 0's in a group of their own)"),
    ("--precision", ("fp32", "bf16", "fp16"), "autocast of the forward and backward (fp16 with a GradScaler); logits "
     "and the loss stay fp32 (default: bf16 on a CUDA GPU that has it, else fp16 there; fp32 on the CPU)"),
    ("--grad_checkpointing", bool, "keep only each residual block's input and recompute the block in backward: "
     "far less activation memory for ~1/3 more compute, same results (docs/speed.md)"),
    ("--compile", bool, "torch.compile the training forward (inductor; the first step compiles, minutes on a "
     "small CPU; docs/speed.md)"),
    ("--query", str, "the caption to search the test videos (or a --data folder's videos) for"),
    ("--top_k", int, "videos --query prints and draws"),
    ("--allow_missing", bool, "use the videos that exist (say so when reporting)"),
    ("--resume", bool, "continue the run in --output_dir from its checkpoint.pt, exactly"),
    ("--overwrite", bool, "replace the run in --output_dir (its checkpoint.pt and log.jsonl)"),
    ("--eval_only", bool, "no training: evaluate --checkpoint (zeroshot: CLIP as it is)"),
    ("--dsl", bool, "also report DSL (CAMoE) metrics, as separate rows (transductive)"))


def flag_parser(prog, method_flags, shown=None):
    """Every flag with default None, so that the given ones are known. method_flags: RECIPE keys -> values (their
    types); shown: the settings --help shows as defaults (None: no --method, so none are known)."""
    def default(k):
        v = shown and shown[k]
        return "default: set by --method" if shown is None else f"default {NONE.get(k, 'none') if v is None else v}"

    p = Parser(prog=prog, add_help=False, allow_abbrev=False, description=f"{prog}: nanoTVR, parameter-efficient text-video retrieval (README.md, docs/design.md)",
               epilog=None if shown else f"python {prog} --method M --help shows M's defaults and its own flags.")
    p.add_argument("-h", "--help", action="store_true", default=None, help="show this help message and exit")
    for names, kind, text in FLAGS:
        dest = {v: k for k, v in FLAG_NAMES.items()}.get(names.split()[0], names.split()[0][2:])
        if "{" in text:  # a default the method's RECIPE may set
            text = text.replace("{" + dest + "}", default(dest))
        elif dest in LOOP_DEFAULTS and LOOP_DEFAULTS[dest] not in (None, False) and dest not in ("data", "stage"):
            text += f" (default {LOOP_DEFAULTS[dest]})"
        kw = (dict(action="store_true", default=None) if kind is bool else dict(choices=kind) if isinstance(kind, tuple)
              else dict(type=kind, nargs=2 if dest == "betas" else None))
        p.add_argument(*names.split(), dest=dest, help=text, **kw)
    group = p.add_argument_group(f"{shown['method']} hyperparameters (RECIPE; constructor arguments)") if shown else p
    for k, v in method_flags.items():
        seq = isinstance(v, (tuple, list))
        kind = type(v[0] if seq else v)
        source = f"see RECIPE in {shown['module']}.py (default {shown[k]})" if shown else "set by --method"
        group.add_argument(f"--{k}", type=boolean if kind is bool else kind, nargs=len(v) if seq else None,
                           help=f"constructor argument{' (true or false)' * (kind is bool)}, {source}")
    return p


def parse_args(argv, prog="train.py"):
    """-> (settings, method class, the settings given on the command line); a bad flag exits 2 with one line."""
    every_method = {k: v for _, r, _ in [*METHODS.values(), *PRETRAINING.values()] for k, v in r.items()
                    if k not in LOOP_DEFAULTS}
    given = {k: v for k, v in vars(flag_parser(prog, every_method).parse_args(argv)).items() if v is not None}
    method, data_name, stage = (given.get(k, LOOP_DEFAULTS[k]) for k in ("method", "data", "stage"))
    cls, recipe, dataset_recipes = (PRETRAINING if stage == "pretrain" else METHODS).get(method, (None, {}, {}))
    recipe = {**recipe, **dataset_recipes.get(data_name, {})}
    own = {k: v for k, v in recipe.items() if k not in LOOP_DEFAULTS}  # the method's constructor arguments
    settings = {**LOOP_DEFAULTS, **recipe, **given}
    if given.pop("help", False):
        shown = dict(settings, module=cls.__module__) if cls else None
        flag_parser(prog, own, shown).print_help()
        raise SystemExit(0)
    for flag, value, allowed in (("--method", method, tuple(METHODS)), ("--data", data_name, data.DATASETS)):
        if value not in allowed:
            fail(f"{flag} {value!r} is not known; choose from {', '.join(allowed)}")
    if stage == "pretrain" and method not in PRETRAINING:
        fail(f"--stage pretrain exists for {', '.join(PRETRAINING)}, not {method}")
    for k in given.keys() & every_method.keys() - own.keys():
        fail(f"--{k} is not a flag of --method {method} (python {prog} --method {method} --help lists its flags)")
    settings.update(clip_lr=settings["clip_lr"] if settings["coef_lr"] is None else settings["lr"] * settings["coef_lr"],
                    betas=tuple(settings["betas"]), kwargs={k: settings[k] for k in own},
                    output_dir=settings["output_dir"] or os.path.join("out", f"{method}-{data_name}"),
                    eval_only=settings["eval_only"] or bool(settings["query"]))
    args = argparse.Namespace(**settings)
    problems = checks.flag_problems(args, cls.uses_clip)
    if problems:
        fail("; ".join(problems))
    return args, cls, set(given)
