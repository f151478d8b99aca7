"""checks.py: what is wrong with a run's flags, found before anything slow (no CLIP loaded, no data read, no
folder made). The flags' ranges and combinations, then what they mean for the chosen method, checked on the
method built over a meta-device stand-in of its CLIP towers (clip.CONFIGS: no weights, no download) when the
towers are known before loading. A fault the user fixes raises RunError (or data.DataError, clip.ModelFileError);
train.py prints it as one line `error: ...`; docs/faults.md lists them."""
import math
import os

import torch

import clip
import synthetic


class RunError(ValueError):
    """A fault the user fixes, the message says how; status: the exit status train.py gives it."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


def device_problem(name):
    """--device -> what is wrong with it on this machine (a name torch does not know, a GPU it lacks), or None."""
    gpus, mps = torch.cuda.device_count(), torch.backends.mps.is_available()
    here = ", ".join(["cpu"] + [f"cuda (cuda:0 to cuda:{gpus - 1})"] * (gpus > 0) + ["mps"] * mps)
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name} is not a device; this machine has {here}"
    if device.type == "cpu" or device.type == "cuda" and (device.index or 0) < gpus or device.type == "mps" and mps:
        return None
    return f"--device {name}: not on this machine, which has {here}"


def folder_problem(flag, path):
    """--output_dir, --cache_dir -> why a run could not write there (a file, a read-only folder), or None; nothing
    is made."""
    if not path.strip():
        return f"{flag} is empty: name a folder"
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"{flag} {path} is a file (or a link to nothing), not a folder: choose another {flag}"
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):  # the folder the run would be made in
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        why = ("is a file (or a link to nothing)" if not os.path.isdir(existing) else
               "is not writable (a read-only mount or folder?)")
        return f"{flag} {path}: {existing} {why}; choose another {flag}"
    return None


def flag_problems(args, uses_clip):
    """Ranges and combinations of train.py's flags -> what is wrong with them, each saying how to fix it."""
    rate = lambda x: x is not None and 0 < x < math.inf
    world = int(os.environ.get("WORLD_SIZE", 1))
    tiny = synthetic.uses_tiny_clip(args.clip, args.data)
    context = clip.CONFIGS.get("synthetic" if tiny else args.clip or "ViT-B/32", clip.CONFIGS["ViT-B/32"])["context_length"]
    return [message for ok, message in (
            (args.frames >= 1, f"--max_frames {args.frames}: a clip needs at least 1 frame"),
            (args.words >= 3, f"--max_words {args.words}: [SOT] and [EOT] take 2 tokens, so >= 3 keep a word"),
            (not uses_clip or args.words <= context, f"--max_words {args.words}: CLIP's text context is {context} "
             f"tokens; pass --max_words {context} or less"),
            (args.batch_size >= 1 and args.accum >= 1 and args.batch_size % (world * args.accum) == 0,
             f"--batch_size {args.batch_size}: >= 1, divisible by ranks x --gradient_accumulation_steps "
             f"({world} x {args.accum})"),
            (rate(args.lr), f"--lr {args.lr}: a learning rate is positive and finite"),
            (args.clip_lr is None or rate(args.clip_lr), f"--clip_lr {args.clip_lr}: positive and finite, or unset"),
            (args.epochs >= 1 or args.eval_only, f"--epochs {args.epochs}: train at least 1 epoch (or --eval_only)"),
            (0 <= args.warmup <= 1, f"--warmup_proportion {args.warmup}: a share of the steps, in [0, 1]"),
            (args.weight_decay >= 0 and 0 <= args.grad_clip < math.inf and rate(args.eps) and
             all(0 <= b < 1 for b in args.betas), "--weight_decay and --grad_clip >= 0, --eps > 0, --betas in [0, 1)"),
            (min(args.num_workers, args.max_steps, args.seed) >= 0, "--num_workers, --max_steps, --seed: >= 0"),
            (min(args.log_every, args.batch_size_val) >= 1, "--log_every, --batch_size_val: >= 1"),
            (uses_clip or args.size or args.data == "folder",  # a folder query: the checkpoint's size
             f"{args.method} has no CLIP model to take the frame size from: pass --size"),
            (args.size is None or args.size >= 1, f"--size {args.size}: >= 1 pixel"),
            (not (args.resume and args.overwrite), "--resume continues the run in --output_dir, --overwrite replaces it"),
            (not (args.eval_only and (args.resume or args.stage == "pretrain")),
             "--eval_only: not with --resume or --stage pretrain"),
            (args.checkpoint is None or args.eval_only, "--checkpoint is what --eval_only evaluates; to continue a run "
             "pass --resume, to start from weights --init"),
            (device_problem(args.device) is None, device_problem(args.device)),
            *[(folder_problem(flag, path) is None, folder_problem(flag, path)) for flag, path in
              (("--output_dir", args.output_dir), ("--cache_dir", args.cache_dir))  # a read-only cache that holds
              if path is not None and (flag == "--output_dir" or not os.path.isdir(path))],  # the tiny CLIP serves
            (args.data != "folder" or args.query, "--data folder is for --query only: a folder of videos has no "
             "captions to train or evaluate on"),
            (not args.query or args.checkpoint or args.method == "zeroshot", f"--query with --method {args.method} "
             "needs --checkpoint (a trained run's checkpoint.pt), or use --method zeroshot"),
            (not args.query or args.top_k >= 1, f"--top_k {args.top_k}: >= 1"),
            (args.query is None or args.query.strip(), "--query is empty: give the caption to search for"),
            *[(not path or os.path.isfile(path), f"--{flag} {path}: " + ("a folder; name the checkpoint file in it "
               "(checkpoint.pt)" if path and os.path.isdir(path) else "no such file")) for flag, path in
              (("checkpoint", args.checkpoint), ("init", args.init))]) if not ok]


def clip_stand_in(name):
    """A meta-device CLIP (no memory, no weights) of clip.CONFIGS[name] ("synthetic": the tiny CLIP of the
    synthetic default), or None for a file, checked once it is loaded."""
    if name not in clip.CONFIGS:
        return None
    with torch.device("meta"):
        return clip.CLIP(**clip.CONFIGS[name])


def check_method(args, given, method, log):
    """What the flags mean for this method: an error for a run that cannot work, a WARNING for a flag it ignores."""
    vision = next((m for m in method.modules() if isinstance(m, clip.VisionTransformer)), None)
    if method.uses_clip and vision and args.size not in (None, vision.input_resolution):  # its position embedding
        raise RunError(f"--size {args.size}: the CLIP of {args.method} takes {vision.input_resolution} px frames (one "
                       f"position embedding per patch); pass --size {vision.input_resolution} or leave --size out")
    groups = [g for g in method.param_groups(args.weight_decay) if g["params"]]
    clip_groups, trains = [g.get("clip", False) for g in groups], bool(groups)
    if args.eval_only and trains and not args.checkpoint:
        raise RunError(f"--eval_only would evaluate an untrained {args.method}: pass --checkpoint <output_dir>/checkpoint.pt")
    if any(clip_groups) and args.clip_lr is None:
        raise RunError(f"{args.method} trains CLIP parameters and its recipe sets no rate for them: pass --clip_lr")
    for flag, idle, why in (("clip_lr", not any(clip_groups), "no CLIP parameter trains"),
                            ("coef_lr", not any(clip_groups), "no CLIP parameter trains"),
                            ("lr", trains and all(clip_groups), "every trainable parameter is CLIP's (--clip_lr)"),
                            ("clip", not method.uses_clip, "it has its own encoders"),
                            ("cache_dir", not method.uses_clip or not synthetic.uses_tiny_clip(args.clip, args.data),
                             "it holds the tiny CLIP of the synthetic default only"),
                            ("dsl", args.stage == "pretrain", "pretraining has no evaluation"),
                            ("grad_checkpointing", not trains or args.method == "unipt",
                             "no backward runs through its blocks (UniPT's CLIP runs without autograd)")):
        if flag in given and idle:
            stage = " --stage pretrain" * (args.stage == "pretrain")
            log(f"WARNING: --{flag} has no effect for --method {args.method}{stage}: {why}")


# ----------------------------------------------------------------------------------------------------
# Memory: the training step's estimate, checked against the GPU's free memory before step 1

# What autograd keeps per clip (and its caption), MiB, without and with --grad_checkpointing: ViT-B/32 (SimVTP: its
# ViT-B/16), 224 px, the recipe's frames (12; SimVTP 16) and words, bf16 autocast, random weights; `python bench.py
# memory` on a CPU, 2026-12-06 (docs/speed.md). fp32 keeps at most twice as much.
ACTIVATION_MIB = {"full": (240.8, 11.4), "ump": (311.0, 12.9), "dgl": (227.3, 12.4), "adapter": (192.3, 11.4),
                  "unipt": (41.2, 41.2), "simvtp": (526.8, 62.9), "simvtp-pretrain": (355.8, 81.6)}
MEASURED_AT = 12 * 50 * 768 * 12  # frames x tokens per frame x width x layers of ViT-B/32's image tower
SIMVTP_TOKENS = 1568  # SimVTP's video tokens per clip as measured: 16 frames in 2-frame tubelets of 14 x 14 patches


def step_memory(method, name, frames, clips, checkpointing, amp, world):
    """A training step's bytes on one GPU, estimated -> {weights, weight_copies (autocast's bf16 casts), optimizer
    (fp32 gradients and AdamW's two moments; DDP's gradient buckets), activations, margin (10% + 1 GiB: the
    allocator, cuBLAS workspaces, the backward's transient gradients)}. The measured activations scale with the
    video tower's frames x tokens x width x layers; checkpointed, backward reruns one block at a time, which adds
    a block's share (1/12) of the plain figure."""
    plain, kept = ACTIVATION_MIB[name.replace("-release", "")]
    if method.uses_clip:
        v = method.clip.visual
        scale = frames * ((v.input_resolution // v.patch_size) ** 2 + 1) * v.transformer.width * v.transformer.layers
        scale /= MEASURED_AT
    else:
        scale = method.num_tokens / SIMVTP_TOKENS
    per_clip = (kept + (plain - kept) / 12 if checkpointing else plain) * 2**20 * scale * (1 if amp else 2)
    weights = sum(p.numel() * p.element_size() for p in method.parameters())
    trainable = sum(p.numel() * 4 for p in method.parameters() if p.requires_grad)
    parts = dict(weights=weights, weight_copies=weights // 2 if amp else 0,
                 optimizer=trainable * (3 + (world > 1)), activations=per_clip * clips)
    return dict(parts, margin=0.1 * sum(parts.values()) + 2**30)


def check_memory(args, method, env):
    """--grad_checkpointing on `method`; then on CUDA, the step's estimate (step_memory) against the GPU's free
    memory (the weights are on it already): one error line with the ways out instead of an out-of-memory error
    at step 1."""
    clip.set_grad_checkpointing(method, args.grad_checkpointing)
    device, world = env.device, env.world
    name = args.method.replace("-release", "") + "-pretrain" * (args.stage == "pretrain")
    if device.type != "cuda" or name not in ACTIVATION_MIB:
        return
    clips = args.batch_size // (world * args.accum)
    estimate = lambda ckpt: step_memory(method, name, args.frames, clips, ckpt, args.precision != "fp32", world)
    parts, free = estimate(args.grad_checkpointing), torch.cuda.mem_get_info(device)[0]
    need = sum(parts.values()) - parts["weights"]
    if need <= free:
        return
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    ckpt, w = estimate(True), parts["weights"]
    raise RunError(
        f"a training step of --method {args.method} needs about {gib(need)} of {device} besides the weights "
        f"(estimate: activations {gib(parts['activations'])} = {clips} clips per GPU x "
        f"{parts['activations'] / clips / 2**20:.0f} MiB; gradients and AdamW {gib(parts['optimizer'])}; autocast's "
        f"weight copies {gib(parts['weight_copies'])}; margin {gib(parts['margin'])}), and {gib(free)} are free. "
        f"Ways out: "
        + ("" if args.grad_checkpointing else f"--grad_checkpointing (needs about {gib(sum(ckpt.values()) - w)}); ")
        + f"more GPUs (torchrun --nproc_per_node=N train.py ...: the global batch of {args.batch_size} is split over "
        f"them, the loss still contrasts all {args.batch_size}); a smaller --batch_size (fewer negatives). "
        f"--gradient_accumulation_steps K also fits, but each micro-batch's loss then contrasts only "
        f"{args.batch_size} / K clips: fewer negatives, another objective (docs/speed.md)")
