"""train.py: the one training loop of nanoTVR (every method, both baselines, evaluation, checkpoints).

  python train.py --method ump                   # CPU, minutes: synthetic set + tiny CLIP, train, evaluate
  python train.py --method zeroshot              # frozen CLIP, mean of frames: evaluation only
  python train.py --method ump --data msrvtt --clip ViT-B/32 --data_path ANN --video_path VIDEOS   # 1 GPU
  torchrun --standalone --nproc_per_node=4 train.py --method dgl --data msrvtt ...   # 4 GPUs, global batch
  python train.py --method ump --resume          # continue the run in out/ump-synthetic, exactly
  python train.py --method full --eval_only --checkpoint out/full-synthetic/checkpoint.pt
  python train.py --method simvtp --stage pretrain ...; python train.py --method simvtp --init CKPT ...
  python query.py --method ump --checkpoint out/ump-synthetic/checkpoint.pt --query "a red circle"  # search

Flags: flags.py; a method's contract: docs/design.md. Faithful to CLIP4Clip's loop (symmetric InfoNCE over the
global batch, meanP, tie and multi-caption metric rules).

A run owns its --output_dir (run_folder.py): log.jsonl, checkpoint.pt (checkpoints.py: every --save_every, at
epoch ends before the evaluation, at --max_steps, on SIGINT/SIGTERM after the step) and a lock. Bad flags and
data stop before anything slow (checks.py) with one line `error: ...` (exit 2); a non-finite loss or gradient
stops at once (exit 1). Deviations:
 1. The all-gather sums gradients: N ranks give the one-process gradient (CLIP4Clip's gives 1/N of it).
 2. AdamW (bias-corrected) instead of BertAdam; cosine over the steps after warmup, not the whole run.
 3. Default decay groups exempt biases, LayerNorms, embeddings, logit_scale (CLIP4Clip: biases only).
 4. `full`: fp32 masters + autocast, CLIP at lr 1e-7. CLIP4Clip's CLIP trains in pure fp16 by accident, where
    most 1e-7 updates round away; CLIP4Clip issue #96 reports R@1 ~43 with it, ~40 without. Expect ~40.
 5. Batches: one permutation per (seed, epoch) cut into global batches, rank r reads slice r of each; frames
    and crops seeded per (epoch, item), dropout per (epoch, micro-batch, rank): 1 or N ranks see the same
    batches, and --resume is exact, mid-epoch too (data.py: EpochSampler, SeededItems, dropout_seed).
"""
import math
import os
import sys
import time
from collections import namedtuple
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import checks
import clip
import data
import data_checks
import flags
import methods
import pictures
import query
import retrieval
import run_folder
import synthetic
from flags import fail, parse_args
from loss import Forward, contrastive_loss
from optimizer import MAX_LOGIT_SCALE, param_groups, set_lr


# ----------------------------------------------------------------------------------------------------
# Setup: processes, precision, signals

Env = namedtuple("Env", "device world rank amp amp_dtype scaler stop")


def setup(args):
    """Processes, precision and signals -> Env."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if world > 1:  # torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=args.dist_timeout))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = device.type == "cuda"  # the patch embedding's fastest kernel
    amp_dtype = flags.amp_dtype(args.precision, device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Env(device, world, rank, amp, amp_dtype, scaler, run_folder.Stop(args.dist_timeout))


# ----------------------------------------------------------------------------------------------------
# The loop

@dataclass
class Position:
    """What checkpoint.pt keeps of the loop: steps, epochs and this epoch's micro-batches done, the losses since
    the last log row (a resumed row equals an uninterrupted one), that row, the steps fp16's scaler skipped, the
    first non-finite step (0: none); the last three on the device until settle()."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    window: list = field(default_factory=list)
    last: dict = None
    skipped: int = 0
    bad: int = 0


def first_bad(bad, x, step):  # the first step (1-based) with a non-finite x; no sync
    return bad + (bad == 0) * ~torch.isfinite(x) * (step + 1)


def forward_backward(model, batch, pos, env, args):
    """One micro-batch: forward under autocast, scaled backward (DDP reduces at the step's last) -> losses."""
    method = getattr(model, "module", model).method
    video = method.normalize_pixels(batch["video"].to(env.device, non_blocking=True))
    text, mask = (batch[k].to(env.device, non_blocking=True) for k in ("text", "video_mask"))
    with (model.no_sync() if env.world > 1 and (pos.batch + 1) % args.accum else nullcontext()), env.amp:
        if args.stage == "pretrain":  # SimVTP: masked video/text modelling, a dict of losses with a "loss" entry
            parts = model(text, video, mask)
        else:
            parts = dict(loss=contrastive_loss(method, *model(text, video, mask), mask))
        env.scaler.scale(parts["loss"] / args.accum).backward()
    pos.bad = first_bad(pos.bad, parts["loss"], pos.step)
    return {k: torch.as_tensor(x).detach() for k, x in parts.items()}


def optimizer_step(model, opt, pos, env, args):
    """Unscale, clip (marking a non-finite gradient), step, clamp the temperature as CLIP4Clip does."""
    env.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.grad_clip or math.inf)
    if env.scaler.is_enabled():  # fp16: the scaler skips such a step
        pos.skipped = pos.skipped + ~torch.isfinite(norm)
    else:
        pos.bad = first_bad(pos.bad, norm, pos.step)
    env.scaler.step(opt)
    env.scaler.update()
    opt.zero_grad(set_to_none=True)
    method = getattr(model, "module", model).method
    if method.logit_scale.requires_grad:
        method.logit_scale.data.clamp_(max=MAX_LOGIT_SCALE)
    pos.step += 1


def settle(pos, env, opt, saver):
    """The loop's read of the device, at a log row and before a checkpoint. A non-finite step, or an fp16 scale
    below 1 (overflow even unscaled), stops the run here: before any log row or checkpoint."""
    pos.window = [{k: float(v) for k, v in x.items()} for x in pos.window]
    pos.bad, pos.skipped = int(pos.bad), int(pos.skipped)
    if pos.bad or env.scaler.is_enabled() and env.scaler.get_scale() < 1:
        finite = all(math.isfinite(x["loss"]) for x in pos.window)
        what = "fp16 gradient" if not pos.bad else "gradient" if finite else "loss"
        fail(run_folder.divergence(what, pos.bad or pos.step, opt, saver.path), 1)


def data_failed(e, pos, env, opt, args, saver):
    """Checkpoint the steps done (--resume redoes the unfinished one's micro-batches), then say it."""
    undone = pos.batch % args.accum
    pos.batch -= undone
    del pos.window[len(pos.window) - undone:]
    settle(pos, env, opt, saver)
    saver.save(asdict(pos))
    fail(run_folder.data_failure(e, pos.step, saver.path, saver.resume, env.rank), 1)


def train_epoch(pos, model, loader, opt, env, args, saver, record):
    """Epoch pos.epoch from micro-batch pos.batch on, moving pos -> what stopped it early (a signal, --max_steps),
    or None at its end. saver: checkpoints.Checkpoints; record(**row): a log.jsonl row."""
    n_micro = loader.sampler.batches  # micro-batches per epoch
    total = n_micro // args.accum * args.epochs
    bar, why = run_folder.Progress(pos.epoch, n_micro // args.accum, pos.batch // args.accum, total, not env.rank), None
    for batch in run_folder.batches(loader, lambda e: data_failed(e, pos, env, opt, args, saver)):
        bar.fetched()
        # dropout and masks: a function of the position, whatever ran before (evaluation, a resume)
        torch.manual_seed(data.dropout_seed(args.seed, pos.epoch, pos.batch, env.rank))
        if pos.batch % args.accum == 0:
            set_lr(opt, pos.step, total, args.warmup)
        pos.window.append(forward_backward(model, batch, pos, env, args))
        pos.batch += 1
        bar.trained(len(batch["text"]) * env.world)
        if pos.batch % args.accum:
            continue
        optimizer_step(model, opt, pos, env, args)
        bar.update(1)
        if pos.step % args.log_every == 0 or pos.step == 1 or pos.batch == n_micro:  # 1: see it start
            settle(pos, env, opt, saver)  # first: the timings include the device's
            pos.last = {k: sum(x[k] for x in pos.window) / len(pos.window) for k in pos.window[-1]}
            row = dict(event="train", step=pos.step, epoch=pos.epoch + pos.batch / n_micro, **pos.last,
                       lr=opt.param_groups[0]["lr"], **bar.timings(args.accum, env.device))
            if env.scaler.is_enabled():
                row["skipped_steps"] = pos.skipped  # fp16: the first few are usual
            record(**row)
            bar.show(row)
            pos.window = []
        if pos.batch < n_micro:  # the epoch's end is checkpointed by the caller
            why = env.stop.reason(pos.step, args.max_steps)
            if why or saver.due(pos.step):
                settle(pos, env, opt, saver)
                saver.save(asdict(pos))
            if why:
                break
        bar.fetching()
    bar.close()
    return why


def train(args, method, split, test, env, folder, argv, log):
    """AdamW; DDP, then --compile (PyTorch's order); --resume; the epochs, each checkpointed, then
    evaluated (a failed evaluation keeps the epoch)."""
    train_ds, loader, sampler, steps_per_epoch = data.train_loader(split, args, env.world, env.rank,
                                                                   pin_memory=env.device.type == "cuda")
    opt = torch.optim.AdamW(param_groups(method, args.lr, args.clip_lr, args.weight_decay), betas=args.betas,
                            eps=args.eps, fused=env.scaler.is_enabled() or None)  # fp16: the scaler's skip on device
    pretrain, ckpt = args.stage == "pretrain", os.path.join(args.output_dir, "checkpoint.pt")
    model = Forward(method, pretrain)
    model = DDP(model, device_ids=[env.device] if env.device.type == "cuda" else None,
                gradient_as_bucket_view=True) if env.world > 1 else model
    model = torch.compile(model) if args.compile else model
    pos = Position()
    if args.resume:
        ck = folder.resumed if folder else checkpoints.read(ckpt, "--resume")
        pos = Position(**checkpoints.restore(ck, ckpt, method, opt, env.scaler))
        log(f"resumed from {ckpt}: step {pos.step}, epoch {pos.epoch}, micro-batch {pos.batch}"
            + "".join(f"; --{k} {b} (was {a})" for k, (a, b) in (folder.changed.items() if folder else ())))
    record, has_eval = folder.open_log(pos.step, argv) if folder else (lambda **row: None, True)
    log(f"{len(train_ds)} training pairs: {steps_per_epoch} steps/epoch x {args.epochs} epochs of {args.batch_size} "
        f"({args.batch_size // (env.world * args.accum)} per rank x {env.world} ranks x {args.accum} accumulation)")
    resume = run_folder.resume_command(argv, env.world)
    saver = checkpoints.Checkpoints(ckpt, method, opt, env.scaler, args, resume, folder and folder.data)
    metrics, evaluated = None, None
    if pos.epoch and not (pos.batch or has_eval or pretrain):  # an epoch whose evaluation failed
        metrics, evaluated = evaluate_epoch(method, test, args, env, pos, record, resume), pos.epoch
    env.stop.armed = True
    for epoch in range(pos.epoch, args.epochs):
        sampler.set_epoch(epoch, pos.batch)
        method.train()
        t_epoch = time.time()
        why = train_epoch(pos, model, loader, opt, env, args, saver, record)
        if why is None:  # the epoch's end
            pos.epoch, pos.batch = epoch + 1, 0
            saver.save(asdict(pos))
            if not pretrain and env.rank == 0:
                metrics, evaluated = evaluate_epoch(method, test, args, env, pos, record, resume), pos.epoch
            env.stop.wait_for_rank_0()
            log(epoch_line(epoch, args, pos, time.time() - t_epoch, not pretrain and metrics))
            why = env.stop.reason(pos.step, args.max_steps) if epoch + 1 < args.epochs else None
        if why:
            log(f"stopped by {why} at step {pos.step} (epoch {pos.epoch + 1}, micro-batch {pos.batch}): "
                f"checkpoint {ckpt}; continue with\n  {resume}")
            env.stop.exit(why)  # a signal: exit 128 + its number
            break
    log(run_folder.summary(args, train_ds, metrics, evaluated))
    return metrics


# ----------------------------------------------------------------------------------------------------
# Evaluation and the summary

def epoch_line(epoch, args, pos, seconds, metrics):
    """An epoch's console line (its bar is gone): loss, time and, if evaluated, R@1/5/10."""
    line = f"epoch {epoch + 1}/{args.epochs}: step {pos.step}, loss {pos.last['loss']:.4f}, {seconds:.0f} s"
    for d in ("t2v", "v2t") if metrics else ():
        line += f"; {d} R@1 {metrics[d]['R@1']:.1f} R@5 {metrics[d]['R@5']:.1f} R@10 {metrics[d]['R@10']:.1f}"
    if metrics and "temporal" in metrics:
        line += f"; temporal pair accuracy {metrics['temporal']['pair_acc']:.1f}%"
    return line


def evaluate_epoch(method, test, args, env, pos, record, resume):
    """The evaluation after an epoch's checkpoint, and retrievals.png; a failure says how to redo it."""
    try:
        metrics, sim = retrieval.evaluate(method, test, args, env.device, env.amp)
    except Exception as e:
        why = (str(e).strip() or type(e).__name__).splitlines()[-1]  # a worker's error: its last line
        print(f"error: the evaluation after epoch {pos.epoch} failed ({why}); the epoch's training is kept in "
              f"its checkpoint: fix the cause, then `{resume}` evaluates it and goes on", file=sys.stderr, flush=True)
        if isinstance(e, (data.VideoError, OSError)):  # the data's fault, said above: no traceback
            raise SystemExit(1)
        raise
    record(event="eval", epoch=pos.epoch, step=pos.step, **metrics)
    pictures.write_retrievals(os.path.join(args.output_dir, "retrievals.png"), test, sim,
                              f"{args.method} on {test.name}, epoch {pos.epoch}")
    return metrics


def evaluate_only(method, test, args, env, log, asked):
    """--eval_only and zeroshot: evaluate, write a record and a picture where run_folder.eval_paths says."""
    ck = checkpoints.read(args.checkpoint, "--checkpoint", keys=("model",)) if args.checkpoint else None
    if ck:
        checkpoints.load_trainable(method, ck, args.checkpoint)
    if env.rank > 0:
        return None
    metrics, sim = retrieval.evaluate(method, test, args, env.device, env.amp)
    log(f"{args.method} on {args.data} test ({len(test.captions)} captions, {len(test.videos)} videos)\n"
        + retrieval.table(metrics))  # first: a write that fails below loses nothing
    path, picture = run_folder.eval_paths(args, asked)
    path = run_folder.write_eval(path, args, metrics)
    step = f", {os.path.basename(args.checkpoint)} at step {ck['step']}" if ck and "step" in ck else ""
    pictures.write_retrievals(picture, test, sim, f"{args.method} on {test.name}{step}")
    log(f"record: {path}\nretrieved clips: {picture}")
    return metrics


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    """Setup, data, model, then train() or evaluate_only() -> the last evaluation's metrics."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, cls, given = parse_args(argv)
    if args.query:  # the query mode is query.py's
        return query.main(argv)
    env, folder = setup(args), None
    log = (lambda *a: print(*a, flush=True)) if env.rank == 0 else (lambda *a: None)
    try:
        # the checks before anything slow, on the method over meta-device CLIP towers
        probe = methods.probe(args, cls, given, log)
        evaluating = args.eval_only or probe is not None and not any(p.requires_grad for p in probe.parameters())
        # a run that trains owns a folder; a --clip file's run is known to train only once built (below)
        trains = env.rank == 0 and probe is not None and not evaluating
        folder = env.stop.follow_rank_0(lambda: run_folder.Folder(args, flags.FLAG_NAMES) if trains else None)

        # data: read (the synthetic set generated) and every test video opened before any CLIP is loaded
        if args.data == "synthetic":
            args.data_path = synthetic.ensure_synthetic(args.data_path)
        read = lambda split: data.read_split(args.data, split, args.data_path, args.video_path, args.allow_missing)
        train_split, test = None if evaluating else read("train"), None if args.stage == "pretrain" else read("test")
        if test:
            data_checks.check_videos(test, args.frame_cache)  # 1 ms each: a bad one would fail every evaluation
        if train_split and args.frame_cache:  # a stale or foreign cache: refused before the folder and CLIP
            data_checks.check_frame_cache(args.frame_cache, train_split.videos, methods.frame_size(args, probe),
                                          args.frames)
        data_id = checkpoints.data_identity(train_split, test)
        if folder:  # the data are found: the folder is the run's
            folder.claim(args.overwrite, data_id, log)

        # model
        tiny_clip_data = args.data_path if synthetic.uses_tiny_clip(args.clip, args.data) else None
        clip_model = methods.load_clip(args, tiny_clip_data, log) if cls.uses_clip else None
        args.size = args.size or (clip_model.visual.input_resolution if clip_model else None)
        method = methods.build(args, cls, clip_model, env.device, log, given if probe is None else None)
        n_all, n_train = sum(p.numel() for p in method.parameters()), clip.count_trainable(method)
        log(f"{args.method}: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.3f}%); device "
            f"{env.device} x {env.world}, autocast {env.amp_dtype}, {args.frames} frames of {args.size} px, "
            f"{args.words} words")
        if evaluating or n_train == 0:  # zeroshot: nothing trains
            return evaluate_only(method, test, args, env, log, "output_dir" in given)
        checks.check_memory(args, method, env)
        if probe is None:  # a --clip file's run: known to train only now
            make = lambda: run_folder.Folder(args, flags.FLAG_NAMES) if env.rank == 0 else None
            folder = env.stop.follow_rank_0(make)
            if folder:
                folder.claim(args.overwrite, data_id, log)
        return train(args, method, train_split, test, env, folder, argv, log)
    except (checks.RunError, data.DataError, clip.ModelFileError) as e:  # the message says the user's fix
        fail(e, getattr(e, "status", 2))
    finally:  # the one teardown path
        env.stop.restore()
        if folder:
            folder.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
