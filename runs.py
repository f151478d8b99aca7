"""runs.py: a training run from the outside, train.py's bookkeeping: the checks before anything slow, the
training order, the run's folder and checkpoint, and how a run stops and continues exactly.

  flag_problems, check_method  the flags' ranges, and what they mean for the method (on a meta-device stand-in
                               of its CLIP towers when they are known before loading: no weights, no download)
  read_data                    annotations read and every test video opened before any CLIP is loaded
  EpochSampler, SeededItems    batches, frames and dropout as a function of (seed, epoch, position) only
  <output_dir>/lock            one run at a time: "host pid", created exclusively; a dead process's is taken over
  <output_dir>/checkpoint.pt   the trainable tensors, optimizer, scaler, position (step, epoch, micro-batch, the
                               losses since the last log row) and flags: written whole (a temporary file,
                               renamed) or not at all, and never with a non-finite tensor
  <output_dir>/log.jsonl       a JSON row per event (start, resume, train, eval); a resume drops the rows after
                               its checkpoint's step, which the resumed run writes again, equal
A new run refuses a folder that holds a checkpoint (--resume continues it, --overwrite replaces it); --resume
refuses flags that differ from the checkpoint's run, except RESUME_MAY_CHANGE. Stop turns SIGINT/SIGTERM into a
checkpoint after the current step. A fault the user fixes raises RunError (or data.DataError,
clip.ModelFileError); train.py prints it as one line `error: ...`. docs/faults.md lists every fault, what it
prints and what is kept.
"""
import json
import math
import os
import shlex
import signal
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

import clip
import data
import synthetic

# What --resume may change: how long, how often, where, how fast. Every other flag must equal the checkpoint's.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "save_every", "log_every", "num_workers", "batch_size_val", "device",
                     "dsl", "output_dir", "data_path", "video_path", "frame_cache", "cache_dir", "resume")
CHECKPOINT = ("model", "optimizer", "scaler", "args", "step", "epoch", "batch")  # what train.py's checkpoints hold
# Seeds of the training order: large primes, so that (seed, epoch, item) never collide
EPOCH_STRIDE, SEED_STRIDE, ITEM_STRIDE, RANK_STRIDE = 100_003, 1_000_003, 100_000_007, 1024
FLAG = dict(frames="--max_frames", words="--max_words", warmup="--warmup_proportion",
            accum="--gradient_accumulation_steps")  # flags whose argparse dest is another name


class RunError(ValueError):
    """A fault the user fixes, the message says how; status: the exit status train.py gives it."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------------
# Before anything slow: the flags' ranges, and what they mean for the chosen method

def flag_problems(args, cls):
    """Ranges and combinations of train.py's flags -> what is wrong with them, each saying how to fix it."""
    rate = lambda x: x is not None and 0 < x < math.inf
    world = int(os.environ.get("WORLD_SIZE", 1))
    return [message for ok, message in (
            (args.frames >= 1, f"--max_frames {args.frames}: a clip needs at least 1 frame"),
            (args.words >= 3, f"--max_words {args.words}: [SOT] and [EOT] take 2 tokens, so >= 3 keep a word"),
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
            (cls.uses_clip or args.size or args.data == "folder",  # a folder query: the checkpoint's size
             f"{args.method} has no CLIP model to take the frame size from: pass --size"),
            (args.size is None or args.size >= 1, f"--size {args.size}: >= 1 pixel"),
            (not (args.resume and args.overwrite), "--resume continues the run in --output_dir, --overwrite replaces it"),
            (not (args.eval_only and (args.resume or args.stage == "pretrain")),
             "--eval_only: not with --resume or --stage pretrain"),
            (args.checkpoint is None or args.eval_only, "--checkpoint is what --eval_only evaluates; to continue a run "
             "pass --resume, to start from weights --init"),
            (not args.device.startswith("cuda") or torch.cuda.is_available(), f"--device {args.device}: no CUDA here"),
            (args.data != "folder" or args.query, "--data folder is for --query only: a folder of videos has no "
             "captions to train or evaluate on"),
            (not args.query or args.checkpoint or args.method == "zeroshot", f"--query with --method {args.method} "
             "needs --checkpoint (a trained run's checkpoint.pt), or use --method zeroshot"),
            (not args.query or args.top_k >= 1, f"--top_k {args.top_k}: >= 1"),
            (not args.checkpoint or os.path.isfile(args.checkpoint), f"--checkpoint {args.checkpoint}: no such file"),
            (not args.init or os.path.isfile(args.init), f"--init {args.init}: no such file")) if not ok]


# OpenAI's CLIP ViTs (clip.build_model reads the same from a file), known before any download so that a method's
# checks run first: (embed_dim, image_resolution, vision_layers, vision_width, patch, text width); 12 text layers
CLIP_TOWERS = {"ViT-B/32": (512, 224, 12, 768, 32, 512), "ViT-B/16": (512, 224, 12, 768, 16, 512),
               "ViT-L/14": (768, 224, 24, 1024, 14, 768), "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768)}


def clip_stand_in(args):
    """A meta-device CLIP (no memory, no weights) with the towers --clip will have, if known before loading."""
    if args.clip is None and (args.data == "synthetic" or getattr(args, "tiny_clip_data", None)):
        config = synthetic.TINY_CLIP
    elif (args.clip or "ViT-B/32") in CLIP_TOWERS:
        e, r, layers, w, patch, tw = CLIP_TOWERS[args.clip or "ViT-B/32"]
        config = dict(embed_dim=e, image_resolution=r, vision_layers=layers, vision_width=w, vision_patch_size=patch,
                      context_length=77, vocab_size=49408, transformer_width=tw, transformer_heads=tw // 64,
                      transformer_layers=12)
    else:
        return None  # a file: checked once it is loaded
    with torch.device("meta"):
        return clip.CLIP(**config)


def check_method(args, given, method, log):
    """What the flags mean for this method: an error for a run that cannot work, a WARNING for a flag it ignores."""
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
                            ("cache_dir", not method.uses_clip or args.clip or args.data != "synthetic",
                             "it holds the tiny CLIP of the synthetic default only"),
                            ("dsl", args.stage == "pretrain", "pretraining has no evaluation")):
        if flag in given and idle:
            stage = " --stage pretrain" * (args.stage == "pretrain")
            log(f"WARNING: --{flag} has no effect for --method {args.method}{stage}: {why}")


def read_data(args, pretrain, evaluating):
    """The splits this run needs, read (the synthetic set generated) before any CLIP is loaded, every test video
    opened (1 ms each: an unreadable one would fail every evaluation): -> (train, test)."""
    if args.data == "synthetic":
        args.data_path = synthetic.ensure_synthetic(args.data_path)
    read = lambda split: data.read_split(args.data, split, args.data_path, args.video_path, args.allow_missing)
    train_split, test = None if evaluating else read("train"), None if pretrain else read("test")
    if test:
        data.check_videos(test, args.frame_cache)  # raises data.DataError, as read_split
    return train_split, test


# ----------------------------------------------------------------------------------------------------
# The training order, a function of (seed, epoch, position) only: what makes a resume exact (train.py deviation 5)

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


def dropout_seed(seed, epoch, batch, rank):
    """The torch seed of micro-batch `batch` of `epoch` on `rank` (dropout, masks): the same in a resumed run."""
    return ((seed * SEED_STRIDE + epoch) * ITEM_STRIDE + batch) * RANK_STRIDE + rank


def train_loader(args, split, world, rank, device):
    """Global batches cut from one permutation per epoch, rank r reads slice r of each (deviation 5)."""
    ds = data.VideoTextDataset(split, frames=args.frames, words=args.words, size=args.size, train=True,
                               frame_cache=args.frame_cache)
    steps_per_epoch, rank_batch = len(ds) // args.batch_size, args.batch_size // (world * args.accum)
    if steps_per_epoch == 0:
        raise RunError(f"{len(ds)} training pairs make no batch of {args.batch_size}: lower --batch_size")
    sampler = EpochSampler(len(ds), rank_batch, steps_per_epoch * args.accum, rank, world, args.seed)
    loader = DataLoader(SeededItems(ds, args.seed), batch_size=rank_batch, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0, worker_init_fn=data._worker_init)
    return ds, loader, sampler, steps_per_epoch


# ----------------------------------------------------------------------------------------------------
# Checkpoints and the run's folder

def read_checkpoint(path, flag, keys=CHECKPOINT):
    """torch.load(weights_only=True) of a file the user named with `flag`; a failure says what it should be."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # cut off, random bytes, text, pickled code: torch's advice (weights_only=False) is unsafe
        raise RunError(f"{flag} {path} ({os.path.getsize(path)} bytes) is truncated or not a torch checkpoint "
                       f"(written by train.py?)") from None
    if not isinstance(ck, dict) or not set(keys) <= set(ck):
        kind = f"dict without {', '.join(sorted(set(keys) - set(ck)))}" if isinstance(ck, dict) else type(ck).__name__
        raise RunError(f"{flag} {path} holds a {kind}, not a checkpoint of train.py")
    return ck


def trainable_state(method):
    return {n: p.detach().cpu().clone() for n, p in method.named_parameters() if p.requires_grad}


def load_trainable(method, ck, path):
    """Strict on the trainable set: the checkpoint must hold exactly the tensors that train here."""
    names, have = set(trainable_state(method)), set(ck["model"])
    if have != names:
        raise RunError(f"{path} does not hold this model's trainable tensors (missing {sorted(names - have)[:4]}, "
                       f"unexpected {sorted(have - names)[:4]}): same --method and method flags as its run?")
    method.load_state_dict(ck["model"], strict=False)


def names(keys):  # a key list in one line: small groups in full, large ones as "decoder.* (17)"
    groups = {}
    for k in keys:
        groups.setdefault(k.split(".")[0], []).append(k)
    return ", ".join(", ".join(g) if len(g) <= 3 else f"{p}.* ({len(g)})" for p, g in groups.items()) or "none"


def load_init(method, path, log):
    """--init: the tensors whose names match; says which are left out and why."""
    ck = read_checkpoint(path, "--init", keys=())
    state = ck.get("model", ck)
    try:
        towers = getattr(method, "towers_from_pretraining", None)  # SimVTP: the pretrained encoder into both towers
        missing, unexpected = method.load_state_dict(towers(state) if towers else state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise RunError(f"--init {path} does not fit this model ({str(e).splitlines()[-1].strip()}): same method "
                       f"flags as the run that wrote it?") from None
    if len(unexpected) == len(state):
        raise RunError(f"--init {path}: none of its {len(state)} tensors ({names(state)}) is one of this model")
    stage = ck.get("args", {}).get("stage") if "model" in ck else None
    why = "pretraining-only modules, not built for fine-tuning" if stage == "pretrain" else "not in this model"
    log(f"--init {path}: {len(state) - len(unexpected)} tensors loaded; {len(unexpected)} unused ({why}): "
        f"{names(unexpected)}; {len(missing)} keep their initialisation (not in the file): {names(missing)}")


def use_checkpoint_settings(args, log=print):
    """--data folder has no recipe: build the model as the checkpoint's run did (backbone, frames, words, frame
    size, method flags), whatever the command line says."""
    run = read_checkpoint(args.checkpoint, "--checkpoint", keys=("model", "args"))["args"]
    for k in ("clip", "frames", "words", "size", "kwargs"):
        setattr(args, k, run[k])
    if run["data"] == "synthetic" and run["clip"] is None:  # the tiny CLIP, pretrained on the synthetic set
        args.tiny_clip_data = synthetic.ensure_synthetic(run["data_path"])
    backbone = "the tiny CLIP" if getattr(args, "tiny_clip_data", None) else f"--clip {run['clip'] or 'ViT-B/32'}"
    log(f"--data folder: the model as {args.checkpoint}'s run built it ({run['data']}): {backbone}, --max_frames "
        f"{run['frames']} --max_words {run['words']} --size {run['size']}")


def restore(ck, path, method, opt, scaler, pos):
    """--resume: the checkpoint into the method, the optimizer, the scaler and the loop's position `pos`."""
    load_trainable(method, ck, path)
    opt.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    pos.update({k: ck[k] for k in pos if k in ck})


def atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # a crash before this line leaves the previous file untouched
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Checkpoints:
    """checkpoint.pt, written by rank 0: at epoch ends, stops and every --save_every (steps, or minutes)."""

    def __init__(self, path, method, opt, scaler, args):
        self.path, self.method, self.opt, self.scaler, self.args, self.saved = path, method, opt, scaler, args, time.time()

    def save(self, pos):
        if not dist.is_initialized() or dist.get_rank() == 0:
            model = trainable_state(self.method)
            bad = [n for n, t in model.items() if not torch.isfinite(t).all()]
            if bad:
                raise RunError(f"not writing {self.path}: {len(bad)} trainable tensors are not finite ({bad[:3]}); "
                               f"the last checkpoint is kept", status=1)
            atomic_save(dict(model=model, optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(),
                             args=vars(self.args), **pos), self.path)
        self.saved = time.time()

    def due(self, step):  # --save_every N (steps) or Nmin
        every = self.args.save_every
        if every.endswith("min"):
            return float(every[:-3]) > 0 and time.time() - self.saved >= 60 * float(every[:-3])
        return int(every) > 0 and step % int(every) == 0


class Folder:
    """A training run's --output_dir (rank 0 only): the checks of a new or resumed run (no side effect), then
    claim(): the folder and its lock, then open_log()."""

    def __init__(self, args):
        self.dir, self.log, self.owned = args.output_dir, None, None
        self.ckpt, self.log_path, self.lock = (os.path.join(self.dir, f) for f in ("checkpoint.pt", "log.jsonl", "lock"))
        if os.path.exists(self.ckpt) and not (args.resume or args.overwrite):
            raise RunError(f"{self.dir} holds a run ({self.ckpt}); pass --resume to continue it or --overwrite to "
                           f"replace it (or another --output_dir)")
        if args.resume and not os.path.isfile(self.ckpt):
            raise RunError(f"--resume: no checkpoint at {self.ckpt}; start without --resume")
        self.resumed = read_checkpoint(self.ckpt, "--resume") if args.resume else None
        self.stamp = os.path.exists(self.ckpt) and os.stat(self.ckpt).st_mtime_ns  # as these checks saw it
        saved, now = (self.resumed or {}).get("args", {}), vars(args)  # size None: the CLIP file's, known later
        self.changed = {k: [saved[k], now[k]] for k in sorted(saved.keys() & now.keys() - {"kwargs"})
                        if saved[k] != now[k] and not (k == "size" and now[k] is None)}
        refused = [f"{FLAG.get(k, '--' + k)} {b} (checkpoint: {a})" for k, (a, b) in self.changed.items()
                   if k not in RESUME_MAY_CHANGE]
        if refused:
            raise RunError(f"--resume with flags that differ from the checkpoint's run: {', '.join(refused)}; pass "
                           f"the run's values (only --{', --'.join(RESUME_MAY_CHANGE[:-1])} may change)")

    def claim(self, overwrite):
        """Once the data are found: the folder, its lock; a killed checkpoint write removed, --overwrite's run too."""
        os.makedirs(self.dir, exist_ok=True)
        self.owned = self.take_lock()
        if (os.path.exists(self.ckpt) and os.stat(self.ckpt).st_mtime_ns) != self.stamp:
            self.close()  # another run wrote it between the checks and the lock
            raise RunError(f"{self.ckpt} was written by another run while this one started; run the command again")
        for f in os.listdir(self.dir):
            if f.startswith("checkpoint.pt.tmp"):  # a checkpoint write that was killed
                os.remove(os.path.join(self.dir, f))
                print(f"WARNING: removed {f}, a checkpoint write a killed run left in {self.dir}", file=sys.stderr)
        for f in (self.ckpt, self.log_path) if overwrite else ():
            if os.path.exists(f):
                os.remove(f)

    def take_lock(self):
        me = f"{socket.gethostname()} {os.getpid()}"
        for attempt in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, me.encode())
                os.close(fd)
                return me
            except FileExistsError:
                host, _, pid = open(self.lock).read().partition(" ")
            if attempt == 0 and host == socket.gethostname() and not alive(pid):
                print(f"WARNING: {self.lock}: its run (pid {pid}) died; taking the folder over", file=sys.stderr)
                os.remove(self.lock)
        raise RunError(f"{self.dir} is in use by another run (pid {pid} on {host}): wait for it, choose another "
                       f"--output_dir, or delete {self.lock} if no run is active")

    def open_log(self, step, argv):
        """-> (record(**row), whether `step` has its eval row). A new run starts log.jsonl; --resume keeps the
        rows up to the checkpoint's step (the rest is redone, exactly) and adds a `resume` row."""
        lines = open(self.log_path).readlines() if self.resumed and os.path.exists(self.log_path) else []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a killed run
                continue
            if row.get("step", 0) <= step:
                rows.append(row)
        with open(self.log_path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(self.log_path + ".tmp", self.log_path)
        self.log = open(self.log_path, "a")
        self.record(event="resume" if self.resumed else "start", step=step, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                    argv=argv, **(dict(changed=self.changed, dropped_rows=len(lines) - len(rows)) if self.resumed else {}))
        return self.record, any(r.get("event") == "eval" and r.get("step") == step for r in rows)

    def record(self, **row):
        self.log.write(json.dumps(rounded(row)) + "\n")
        self.log.flush()

    def close(self):
        if self.log:
            self.log.close()
        if os.path.exists(self.lock) and open(self.lock).read() == self.owned:
            os.remove(self.lock)


def rounded(x, digits=6):
    """Floats to `digits` significant digits, in nested dicts too: log.jsonl shows 3.5, not 3.5000000000000004."""
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    return float(f"{x:.{digits}g}") if isinstance(x, float) else x


def write_eval(args, metrics):
    """--eval_only's record: <output_dir>/eval-<time>-<pid>.json, beside (never in) a training run's log."""
    path = os.path.join(args.output_dir, f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(dict(event="eval", **rounded(metrics), args={k: v for k, v in vars(args).items() if k != "kwargs"}), f, indent=1)
    return path


def alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):  # no number (a lock cut short), or no such process
        return False
    except PermissionError:  # another user's process
        pass
    return int(pid) > 0


def resume_command(argv, world, local_world=None):
    """The command that continues a run: its flags without --max_steps and --overwrite, with --resume.
    One machine (local_world, torchrun's LOCAL_WORLD_SIZE, = world): `torchrun --standalone`; several: the
    launcher's flags are the user's."""
    out, it = [], iter(argv)
    for t in it:
        if t == "--max_steps":
            next(it, None)
        elif not t.startswith(("--max_steps=", "--overwrite", "--resume")):
            out.append(t)
    local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    launcher = ("python" if world == 1 else f"torchrun --standalone --nproc_per_node={world}" if local_world == world
                else f"torchrun --nnodes={world // local_world} --nproc_per_node={local_world} <your rendezvous flags>")
    return f"{launcher} train.py {shlex.join(out + ['--resume'])}"


class Stop:
    """SIGINT/SIGTERM. Armed (training): the step finishes, a checkpoint is written, the exit status is 128 + the
    signal (130, 143). A second signal, or one before training, exits at once; the last checkpoint stays."""

    def __init__(self):
        self.signal, self.armed, self.pid = 0, False, os.getpid()
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker, forked with this handler: the main process decides
            return
        name = signal.Signals(signum).name
        if self.signal or not self.armed:
            print(f"\n{name}: stopped{' before training: nothing to save' * (not self.armed)}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signal = signum
        print(f"\n{name}: finishing this step, then writing a checkpoint (again: quit now)", file=sys.stderr, flush=True)

    def reason(self, step, max_steps, device):
        """What stops the run after `step`: a signal on any rank (ranks get it at different steps), --max_steps."""
        flag = torch.tensor(self.signal, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, dist.ReduceOp.MAX)
        return signal.Signals(int(flag)).name if flag else "--max_steps" if step == max_steps else None

    def exit(self, why):
        if why.startswith("SIG"):
            raise SystemExit(128 + signal.Signals[why])

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
