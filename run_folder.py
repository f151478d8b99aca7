"""run_folder.py: a training run's --output_dir and how a run stops and continues. Rank 0 owns the folder:

  <output_dir>/lock            one run at a time: "host pid", created exclusively; a dead process's is taken over
  <output_dir>/checkpoint.pt   checkpoints.py's dict
  <output_dir>/log.jsonl       a JSON row per event (start, resume, train, eval); a resume drops the rows after
                               its checkpoint's step, which the resumed run writes again, equal
An evaluation-only run (--eval_only, zeroshot) owns no folder and replaces no file: eval_paths. A new training
run refuses a folder that holds a checkpoint (--resume continues it, --overwrite replaces it); --resume refuses
what would make it inexact: flags that differ from the checkpoint's run (except RESUME_MAY_CHANGE), other data
(checkpoints.data_identity), a log.jsonl with damaged or missing rows (read_log); with nothing left to do it says
so (finished). Stop turns SIGINT/SIGTERM into a checkpoint after the current step; resume_command is the command
printed to continue. docs/faults.md lists every fault, what it prints and what is kept.
"""
import fcntl
import json
import os
import math
import shlex
import signal
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import files
import retrieval
from checks import RunError

# What --resume may change: how long, how often, where, how fast. Every other flag must equal the checkpoint's.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "save_every", "log_every", "num_workers", "batch_size_val", "device",
                     "precision", "dist_timeout", "dsl", "output_dir", "data_path", "video_path", "frame_cache",
                     "cache_dir", "resume", "grad_checkpointing", "compile")


class Folder:
    """A training run's --output_dir (rank 0 only): the checks of a new or resumed run (no side effect), then
    claim(): the folder and its lock, then open_log()."""

    def __init__(self, args, flag_names):  # flag_names: dest -> flag, for the settings named otherwise
        self.dir, self.log, self.owned, self.lock_fd = args.output_dir, None, None, None
        self.ckpt, self.log_path, self.lock = (os.path.join(self.dir, f) for f in ("checkpoint.pt", "log.jsonl", "lock"))
        if os.path.exists(self.ckpt) and not (args.resume or args.overwrite):
            raise RunError(f"{self.dir} holds a run ({self.ckpt}); pass --resume to continue it or --overwrite to "
                           f"replace it (or another --output_dir)")
        if args.resume and not os.path.isfile(self.ckpt):
            raise RunError(f"--resume: no checkpoint at {self.ckpt}; start without --resume")
        self.resumed = checkpoints.read(self.ckpt, "--resume") if args.resume else None
        self.stamp = os.path.exists(self.ckpt) and os.stat(self.ckpt).st_mtime_ns  # as these checks saw it
        saved, now = (self.resumed or {}).get("args", {}), vars(args)  # size None: the CLIP file's, known later
        self.changed = {k: [saved[k], now[k]] for k in sorted(saved.keys() & now.keys() - {"kwargs"})
                        if saved[k] != now[k] and not (k == "size" and now[k] is None)}
        refused = [f"{flag_names.get(k, '--' + k)} {b} (checkpoint: {a})" for k, (a, b) in self.changed.items()
                   if k not in RESUME_MAY_CHANGE]
        if refused:
            raise RunError(f"--resume with flags that differ from the checkpoint's run: {', '.join(refused)}; pass "
                           f"the run's values (only --{', --'.join(RESUME_MAY_CHANGE[:-1])} may change)")
        self.rows, self.lines = read_log(self.log_path, self.resumed, args.accum) if args.resume else ([], 0)
        if args.resume:
            finished(self, args)

    def check_data(self, data):
        """--resume: the data must be the run's (checkpoints.data_identity), else it would not be exact."""
        self.data, saved = data, (self.resumed or {}).get("data") or data or {}  # older checkpoints: none
        changed = [f"the {k} differ ({data.get(k, [0, 0])[1]} now, {n} in the run)" for k, (h, n) in saved.items()
                   if data and data.get(k, [0])[0] != h]
        if changed:
            raise RunError(f"--resume on other data than the run's: {'; '.join(changed)}; pass the run's --data_path "
                           f"and --video_path (or restore their files), or train anew in another --output_dir")

    def claim(self, overwrite, data=None, log=print):
        """Once the data are found (data: checkpoints.data_identity, which --resume checks): the folder, its lock; a
        killed checkpoint write removed, --overwrite's run too."""
        self.check_data(data)
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
        log(f"run folder {self.dir}: checkpoint {self.ckpt}, log {self.log_path}")

    def take_lock(self):
        """<dir>/lock holds "host pid" under an exclusive flock for the run's life. The flock makes taking a dead
        run's lock over atomic (of two runs that find it stale, one wins; the kernel drops a killed run's flock);
        a lock whose process lives on this host (or on another host) keeps a run out either way."""
        while True:
            fd = os.open(self.lock, os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                held = False
            try:
                current = os.stat(self.lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current or not held:
                break
            os.close(fd)  # the file was removed (its run ended) between our open and our flock: open the new one
        host, _, pid = os.pread(fd, 200, 0).decode(errors="replace").partition(" ")
        if not held or pid and (host != socket.gethostname() or alive(pid)):  # a run this one cannot see end
            os.close(fd)
            raise RunError(f"{self.dir} is in use by another run (pid {pid or '?'} on {host or '?'}): wait for it, "
                           f"choose another --output_dir, or delete {self.lock} if no run is active")
        if pid:
            print(f"WARNING: {self.lock}: its run (pid {pid}) died; taking the folder over", file=sys.stderr)
        me = f"{socket.gethostname()} {os.getpid()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self.lock_fd = fd  # held (with its flock) until close()
        return me

    def open_log(self, step, argv):
        """-> (record(**row), whether `step` has its eval row). A new run starts log.jsonl; --resume keeps the
        rows up to the checkpoint's step (the rest is redone, exactly) and adds a `resume` row."""
        rows = [r for r in self.rows if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        files.atomic_write(self.log_path, lambda tmp: files.write_bytes(tmp, text.encode()))
        self.log = open(self.log_path, "a")
        resumed = dict(changed=self.changed, dropped_rows=self.lines - len(rows)) if self.resumed else {}
        self.record(event="resume" if self.resumed else "start", step=step, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                    argv=argv, **resumed)
        return self.record, any(r.get("event") == "eval" and r.get("step") == step for r in rows)

    def record(self, **row):
        self.log.write(json.dumps(rounded(row)) + "\n")
        self.log.flush()

    def close(self):
        if self.log:
            self.log.close()
        if os.path.exists(self.lock) and open(self.lock).read() == self.owned:
            os.remove(self.lock)  # before the flock goes, so that no run takes a lock file that is being removed
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def rounded(x, digits=6):
    """Floats to `digits` significant digits, in nested dicts too: log.jsonl shows 3.5, not 3.5000000000000004."""
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    return float(f"{x:.{digits}g}") if isinstance(x, float) else x


def read_log(path, ck, accum):
    """--resume: log.jsonl -> (its rows, its lines), refused where the rows that the checkpoint covers are damaged
    or missing, which the resumed log would hide. A last line without its newline is the row a killed run was
    writing: dropped, as the rows after the checkpoint's step are (they are redone, equal)."""
    if not os.path.exists(path):
        print(f"WARNING: --resume: no {path}; a new log starts at step {ck['step']} without the rows before it",
              file=sys.stderr, flush=True)
        return [], 0
    lines, rows, bad, covered = open(path, "rb").read().split(b"\n"), [], [], 0
    for n, line in enumerate(lines[:-1], 1):
        try:
            row = json.loads(line)  # bytes: non-UTF-8 ones are a ValueError too
        except ValueError:
            row = None
        if not isinstance(row, dict):
            bad.append(n)
            continue
        rows.append(row)
        if row.get("step", 0) <= ck["step"]:
            covered = n  # the last line of a row that the resumed log keeps
    last = max([r["step"] for r in rows if r.get("event") == "train" and r.get("step", 0) <= ck["step"]] or [0])
    due = ck["step"] - len(ck["window"]) // accum if "window" in ck else last  # the step of the checkpoint's last row
    fix = f"restore it, or move it aside (mv {path} {path}.damaged) to start a new log at step {ck['step']}; " \
          f"the checkpoint is fine"
    if [n for n in bad if n < covered]:
        raise RunError(f"--resume: {path} line {bad[0]} is not a JSON row (non-UTF-8 bytes, or cut short)"
                       f"{f', nor are {len(bad) - 1} more' if len(bad) > 1 else ''}; {fix}")
    if last != due:
        held = f"has training rows up to step {last}" if last else "has no training row"
        raise RunError(f"--resume: {path} {held}, but the checkpoint's last one is of step {due}: rows are missing "
                       f"(the file was cut short or edited); {fix}")
    return rows, len(lines) - (lines[-1] == b"")


def finished(folder, args):
    """--resume with nothing left to do (its epochs and their evaluations done, or --max_steps reached): say so,
    where the results are and how to train on, and exit 0 before anything is read or written."""
    ck, rows = folder.resumed, folder.rows
    evaluated = ck["args"].get("stage") == "pretrain" or any(r.get("event") == "eval" and r.get("step") == ck["step"]
                                                             for r in rows)
    if ck["epoch"] >= args.epochs and (ck["batch"] or evaluated):
        why, more = "finished", f"pass --epochs above {args.epochs}"
    elif args.max_steps and ck["step"] >= args.max_steps:
        why, more = f"at --max_steps {args.max_steps}", "leave out --max_steps or raise it"
    else:
        return
    last = ([f"its last evaluation (after epoch {r['epoch']}): t2v R@1 {r['t2v']['R@1']:.1f}" for r in rows
             if r.get("event") == "eval" and "t2v" in r] or ["no evaluation"])[-1]
    where = [f for f in (folder.log_path, os.path.join(folder.dir, "retrievals.png"), folder.ckpt) if os.path.exists(f)]
    print(f"nothing to do: the run in {folder.dir} is {why} (step {ck['step']}, {ck['epoch']} of {args.epochs} "
          f"epochs done); {last}; its results: {', '.join(where)}; to train on, {more}", flush=True)
    raise SystemExit(0)


def eval_paths(args, asked):
    """Where an evaluation-only run (--eval_only, zeroshot) writes: eval-<stamp>.json and retrievals-<stamp>.png
    (stamp: time and pid; they never replace a file) in --output_dir when asked, else in out/<method>-<data>, or in
    its eval/ subfolder when that folder is a training run's (holds a checkpoint.pt) -> (record, picture)."""
    out = args.output_dir
    if args.overwrite:
        print("WARNING: --overwrite has no effect on an evaluation-only run: it replaces no file", file=sys.stderr)
    if not asked and os.path.exists(os.path.join(out, "checkpoint.pt")):
        out = os.path.join(out, "eval")
    stamp, n = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", 1
    while True:  # -2, -3, ...: another evaluation in the same second by the same process
        tail = stamp + (f"-{n}" if n > 1 else "")
        record, picture = os.path.join(out, f"eval-{tail}.json"), os.path.join(out, f"retrievals-{tail}.png")
        if not (os.path.exists(record) or os.path.exists(picture)):
            return record, picture
        n += 1


def write_eval(path, args, metrics):
    """An evaluation-only run's record (eval_paths) -> its path, or None after a WARNING when it cannot be written
    (full disk, read-only folder): the caller has printed the metrics already."""
    record = dict(event="eval", **rounded(metrics), args={k: v for k, v in vars(args).items() if k != "kwargs"})
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.atomic_write(path, lambda tmp: files.write_bytes(tmp, json.dumps(record, indent=1).encode()))
    except OSError as e:
        print(f"WARNING: could not write the record {path} ({e}); the metrics printed above are the evaluation's",
              file=sys.stderr, flush=True)
        return None
    return path


def summary(args, train_ds, metrics, evaluated):
    """A run's last lines: the last evaluation (none is picked on the test split), where its files are."""
    ckpt, log_path, picture = (os.path.join(args.output_dir, f) for f in ("checkpoint.pt", "log.jsonl", "retrievals.png"))
    lines = [f"WARNING: {train_ds.substitutions} training items replaced an unreadable video: "
             f"{train_ds.corrupt_videos[:5]}"] if train_ds.substitutions else []
    if metrics:
        lines += [f"final: {args.method} on {args.data} test after epoch {evaluated} of {args.epochs} (the last "
                  f"evaluated; nothing is selected on the test split)", retrieval.table(metrics),
                  f"retrieved clips: {picture}"]
    if args.stage == "pretrain":
        lines.append(f"{args.method} pretraining checkpoint: {ckpt}; fine-tune from it with --init {ckpt}")
    return "\n".join(lines + [f"run folder {args.output_dir}: checkpoint {ckpt}, log {log_path}"])


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
    signal (130, 143). A second signal, or one before training, exits at once; the last checkpoint stays. Under
    torchrun, the ranks agree on stopping (reason) and wait for rank 0's evaluation (wait_for_rank_0)."""

    def __init__(self, minutes=30.0):  # the training collectives' timeout (--dist_timeout)
        self.signal, self.armed, self.pid, self.waiting, self.agreeing = 0, False, os.getpid(), None, None
        self.timeout = timedelta(minutes=minutes)
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

    def reason(self, step, max_steps):
        """What stops the run after `step`: a signal on any rank (ranks get it at different steps), --max_steps.
        The ranks agree on the host, over gloo within the training timeout (reading a device all-reduce back
        would wait for the step's kernels)."""
        flag = self.signal
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.agreeing = self.agreeing or dist.new_group(backend="gloo", timeout=self.timeout)
            flag = torch.tensor(flag)
            dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.agreeing)
            flag = int(flag)
        return signal.Signals(flag).name if flag else "--max_steps" if step == max_steps else None

    def follow_rank_0(self, make):
        """-> make() (rank 0's run folder, None elsewhere). Rank 0's verdict is every rank's: where it stops (a
        finished run exits 0, a refusal 2), the others exit 0 instead of waiting in a collective for it."""
        go = False
        try:
            folder, go = make(), True
        finally:
            if dist.is_initialized() and dist.get_world_size() > 1:
                self.agreeing = self.agreeing or dist.new_group(backend="gloo", timeout=self.timeout)
                flag = torch.tensor(int(go))
                dist.broadcast(flag, 0, group=self.agreeing)
                go = bool(flag)
        if not go:
            raise SystemExit(0)  # rank 0 said why
        return folder

    def wait_for_rank_0(self):
        """The other ranks wait here while rank 0 evaluates, in a gloo group of their own without a practical
        timeout: training's collectives keep --dist_timeout (NCCL's 10 minutes would end a long evaluation)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.waiting = self.waiting or dist.new_group(backend="gloo", timeout=timedelta(days=7))
            dist.barrier(group=self.waiting)

    def exit(self, why):
        if why.startswith("SIG"):
            raise SystemExit(128 + signal.Signals[why])

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def divergence(what, step, opt, path):
    """The line for a non-finite step, read at a log row or before a checkpoint: steps may have run after it."""
    lrs = ", ".join(sorted({f"{g['lr']:.3g}" for g in opt.param_groups}))
    kept = f"{path} is from before it" if os.path.exists(path) else "no checkpoint was written"
    return (f"non-finite {what} at step {step} (lr now {lrs}): try a lower --lr (or --clip_lr), a longer "
            f"--warmup_proportion or --grad_clip 1.0; nothing from step {step} on was saved ({kept})")


def data_failure(e, step, ckpt, resume, rank):
    """The line for a DataLoader failure in training, once rank 0 has checkpointed the steps done."""
    why = (str(e).strip() or type(e).__name__).splitlines()[-1]  # a worker's error: its last line
    kept = f"the {step} finished steps are kept in {ckpt}" if rank == 0 else f"the last checkpoint {ckpt} is kept"
    return (f"the training data loader failed in step {step + 1} ({why}; a worker killed by the OOM killer or a "
            f"crash shows as a dead worker or a broken connection); {kept}: continue with `{resume}`")


class Progress:
    """An epoch's progress on rank 0: a bar on a terminal, a console line per train row where no bar is drawn
    (output into a file); and the timings of the rows: time per step, clips/s, the share spent waiting for data."""

    def __init__(self, epoch, steps, done, total, master):
        tty, self.total = sys.stderr.isatty(), total
        self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}", disable=not (master and tty),
                        leave=False, dynamic_ncols=True)
        self.lines = master and not (tty and sys.stdout.isatty())
        self.update, self.close = self.bar.update, self.bar.close
        self.start, self.wait, self.clips, self.micro = time.time(), 0.0, 0, 0
        self.fetching()

    def fetching(self):  # the loop asks for the next batch
        self.asked = time.time()

    def fetched(self):
        self.wait += time.time() - self.asked

    def trained(self, clips):  # a micro-batch of `clips` (all ranks)
        self.clips, self.micro = self.clips + clips, self.micro + 1
        self.fetching()

    def timings(self, accum, device):
        """The timings since the last row (read after the device's) and a GPU's peak memory: -> dict for the row;
        starts the next."""
        dt = time.time() - self.start
        row = dict(step_time=dt * accum / self.micro, clips_per_s=self.clips / dt, data_wait=self.wait / dt)
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        self.start, self.wait, self.clips, self.micro = time.time(), 0.0, 0, 0
        return row

    def show(self, row):
        wait = f"{100 * row['data_wait']:.0f}%"
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", clips_s=f"{row['clips_per_s']:.0f}",
                             wait=wait)
        if self.lines:
            print(f"epoch {math.ceil(row['epoch'])} step {row['step']}/{self.total}: loss {row['loss']:.4f}, lr "
                  f"{row['lr']:.2e}, {row['clips_per_s']:.0f} clips/s, data wait {wait}", flush=True)


def batches(loader, failed):
    """The loader's batches; a DataLoader failure (a worker killed by the OOM killer or a decoder crash) goes to
    failed(error) here, between steps: DataLoader's own SIGCHLD handler would raise it mid-step."""
    it, chld = iter(loader), signal.getsignal(signal.SIGCHLD)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # not SIG_IGN, which reaps the workers next() checks on
    try:
        yield from it
    except Exception as e:
        failed(e)
    finally:
        signal.signal(signal.SIGCHLD, chld)
