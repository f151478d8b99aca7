"""checkpoints.py: train.py's checkpoint.pt, one plain dict that torch.load(weights_only=True) reads: the trainable
tensors ("model"), the optimizer, the GradScaler, the flags ("args", a dict), the data's identity ("data") and the
loop's position (step, epoch, micro-batch, the losses since the last log row). Written whole by
files.atomic_write or not at all (a full disk keeps the previous one), and never with a non-finite tensor; read
back for --resume (exactly), --eval_only/--checkpoint, --init (the tensors whose names match) and query.py."""
import hashlib
import json
import os
import time
import warnings

import torch
import torch.distributed as dist

import files
from checks import RunError

KEYS = ("model", "optimizer", "scaler", "args", "step", "epoch", "batch")  # what train.py's checkpoints hold


def read(path, flag, keys=KEYS):
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


def load_state(method, state, what):
    """method.load_state_dict(state, strict=False) -> (missing, unexpected); a tensor of another shape: RunError."""
    try:
        return method.load_state_dict(state, strict=False)
    except RuntimeError as e:  # torch's size-mismatch list: its last entry says enough
        raise RunError(f"{what} does not fit this model ({str(e).splitlines()[-1].strip(' .')}): same method "
                       f"flags (and nanoTVR version) as the run that wrote it?") from None


def load_trainable(method, ck, path):
    """Strict on the trainable set: the checkpoint must hold exactly the tensors that train here."""
    names, have = set(trainable_state(method)), set(ck["model"])
    if have != names:
        raise RunError(f"{path} does not hold this model's trainable tensors (missing {sorted(names - have)[:4]}, "
                       f"unexpected {sorted(have - names)[:4]}): same --method and method flags as its run?")
    load_state(method, ck["model"], path)


def restore(ck, path, method, opt, scaler):
    """--resume: the checkpoint into the method, the optimizer and the scaler -> the loop's position (a dict)."""
    load_trainable(method, ck, path)
    saved = ck["optimizer"]  # with this run's kernels (fused AdamW in fp16): they also decide where torch puts
    groups = [{**g, **{k: own[k] for k in ("fused", "foreach") if k in own}}  # each step count (a fused step's on
              for g, own in zip(saved["param_groups"], opt.param_groups)]  # the device, else on the host)
    opt.load_state_dict({**saved, "param_groups": groups})
    if scaler.is_enabled() and ck["scaler"]:  # fp16 on: its scale goes on; a run saved in fp32/bf16 starts a new one
        scaler.load_state_dict(ck["scaler"])
    return {k: ck[k] for k in ("step", "epoch", "batch", "window", "last", "skipped") if k in ck}


def short_names(keys):  # a key list in one line: small groups in full, large ones as "decoder.* (17)"
    groups = {}
    for k in keys:
        groups.setdefault(k.split(".")[0], []).append(k)
    return ", ".join(", ".join(g) if len(g) <= 3 else f"{p}.* ({len(g)})" for p, g in groups.items()) or "none"


def load_init(method, path, log):
    """--init: the tensors whose names match (of a checkpoint or a state dict); says which are left out and why."""
    ck = read(path, "--init", keys=())
    state = ck.get("model", ck)
    towers = getattr(method, "towers_from_pretraining", None)  # SimVTP: the pretrained encoder into both towers
    missing, unexpected = load_state(method, towers(state) if towers else state, f"--init {path}")
    if len(unexpected) == len(state):
        raise RunError(f"--init {path}: none of its {len(state)} tensors ({short_names(state)}) is one of this model")
    stage = ck.get("args", {}).get("stage") if "model" in ck else None
    why = "pretraining-only modules, not built for fine-tuning" if stage == "pretrain" else "not in this model"
    log(f"--init {path}: {len(state) - len(unexpected)} tensors loaded; {len(unexpected)} unused ({why}): "
        f"{short_names(unexpected)}; {len(missing)} keep their initialisation (not in the file): {short_names(missing)}")


def data_identity(*splits):
    """What a resumed run must read as its run did: per split, a digest of its captions and their videos (the
    annotation files' content) and of its video file names (--data_path and --video_path may move), with counts."""
    digest = lambda x: hashlib.sha256(json.dumps(x).encode()).hexdigest()[:16]
    out = {}
    for s in filter(None, splits):
        out[f"{s.name} captions"] = [digest([s.captions, s.caption_video]), len(s.captions)]
        out[f"{s.name} videos"] = [digest([os.path.basename(v) for v in s.videos]), len(s.videos)]
    return out


class Checkpoints:
    """checkpoint.pt, written by rank 0: at epoch ends, stops and every --save_every (steps, or minutes). resume:
    the command that continues the run; data: data_identity()."""

    def __init__(self, path, method, opt, scaler, args, resume="--resume", data=None):
        self.path, self.method, self.opt, self.scaler, self.args, self.saved = path, method, opt, scaler, args, time.time()
        self.resume, self.data = resume, data

    def save(self, position):
        """position: the loop's step, epoch, micro-batch, window and last log row (a dict)."""
        if not dist.is_initialized() or dist.get_rank() == 0:
            model = trainable_state(self.method)
            bad = [n for n, t in model.items() if not torch.isfinite(t).all()]
            if bad:
                raise RunError(f"not writing {self.path}: {len(bad)} trainable tensors are not finite ({bad[:3]}); "
                               f"the last checkpoint is kept", status=1)
            ck = dict(model=model, optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(),
                      args=vars(self.args), data=self.data, **position)
            kept = os.path.exists(self.path)
            try:
                files.atomic_write(self.path, lambda tmp: save_to(ck, tmp))
            except OSError as e:
                then = (f"the previous checkpoint {self.path} is kept: free space, then continue with `{self.resume}`"
                        if kept else "no checkpoint was written before: free space, then run again")
                raise RunError(f"could not write {self.path} at step {position['step']} ({e.strerror or e}); {then}",
                               status=1) from None
        self.saved = time.time()

    def due(self, step):  # --save_every N (steps) or Nmin
        every = self.args.save_every
        if every.endswith("min"):
            return float(every[:-3]) > 0 and time.time() - self.saved >= 60 * float(every[:-3])
        return int(every) > 0 and step % int(every) == 0


def save_to(ck, path):
    """torch.save, whose C++ writer reports a failed write (a full disk) as `enforce fail at inline_container.cc`
    only: the write is tried again through a Python file, whose OSError says why."""
    try:
        torch.save(ck, path)
    except RuntimeError as e:
        if "inline_container" not in str(e):
            raise
        with open(path, "wb") as f:
            torch.save(ck, f)
