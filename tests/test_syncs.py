"""No host-device sync inside a training step between log rows (each one idles a GPU until its queue drains): a
tiny CPU run of 4 steps with --log_every beyond them, every Tensor method that reads a value back counting its
calls. train.settle, the loop's one read (a log row, a checkpoint), is left out, and so is what stays on the host
on a GPU too: the optimizer's step counters (torch/optim) and the data pipeline (in the main process here). A
sync inside C++ (nonzero, boolean-mask indexing) is not seen on a CPU. Then what the deferred reads keep: a
non-finite step still stops the run before any checkpoint, an fp16 scale below 1 still stops it."""
import argparse
import traceback
from contextlib import nullcontext

import pytest
import torch

import checkpoints
import clip
import data
import simvtp
import train
from fault_runs import error, flags
from messages import assert_tells

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
HOST = ("/torch/optim/", "/torch/utils/data/", "/data.py", "/frames.py")  # on the host on a GPU too
CASES = [(m, p) for m in ("full", "ump", "unipt") for p in ("fp32", "bf16", "fp16")] + [
    (m, "bf16") for m in ("dgl", "adapter", "simvtp", "simvtp-pretrain")]


def syncs_per_step(monkeypatch, setup, out, method, precision, steps=4):
    """-> {"read file:line": calls} of the steps of a --max_steps run, but train.settle's, and the step count."""
    seen, state = {}, dict(on=False, settle=False)

    def counting(read):
        def f(*a, **k):
            caller = traceback.extract_stack(limit=2)[0]
            if state["on"] and not state["settle"] and not any(h in caller.filename for h in HOST):
                where = f"{read.__name__} {caller.filename.split('/')[-1]}:{caller.lineno}"
                seen[where] = seen.get(where, 0) + 1
            return read(*a, **k)
        return f

    def wrap(f, before, after=None):
        def g(*a, **k):
            state.update(before)
            try:
                return f(*a, **k)
            finally:
                state.update(after or {})
        return g

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    monkeypatch.setattr(clip, "value_checks", lambda t: False)  # as on a GPU: the methods' value checks skipped
    monkeypatch.setattr(train, "forward_backward", wrap(train.forward_backward, dict(on=True)))
    monkeypatch.setattr(train, "settle", wrap(train.settle, dict(settle=True), dict(settle=False)))
    monkeypatch.setattr(checkpoints.Checkpoints, "save", wrap(checkpoints.Checkpoints.save, dict(on=False)))
    argv = flags(setup, out, "--max_steps", str(steps), "--log_every", "100", "--precision", precision,
                 method=method.split("-")[0])  # the max_steps checkpoint ends the count
    argv += ["--stage", "pretrain"] * method.endswith("pretrain") + ["--clip_lr", "1e-4"] * (method == "full")
    train.main(argv)
    return seen


@pytest.mark.parametrize("method, precision", CASES)
def test_no_sync_inside_a_step(setup, tmp_path, monkeypatch, method, precision):
    assert syncs_per_step(monkeypatch, setup, tmp_path, method, precision) == {}


def test_pixel_statistics_are_made_once_per_device(monkeypatch):
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    first = clip.normalize_pixels(x), simvtp.normalize_pixels(x)
    monkeypatch.setattr(torch, "tensor", None)  # a new constant would need it (and a host-to-device copy)
    assert all(torch.equal(a, b) for a, b in zip(first, (clip.normalize_pixels(x), simvtp.normalize_pixels(x))))
    mean, std = torch.as_tensor(clip.MEAN).view(3, 1, 1), torch.as_tensor(clip.STD).view(3, 1, 1)
    assert torch.equal(first[0], (x.float() / 255.0 - mean) / std)


def test_a_non_finite_step_read_late_still_reaches_no_checkpoint(setup, tmp_path, capsys):
    """A huge lr with one read, at the --max_steps checkpoint: the run stops there, naming the first bad step."""
    line = error(capsys, flags(setup, tmp_path, "--lr", "1e6", "--log_every", "100", "--max_steps", "6"), status=1)
    assert_tells(line, "non-finite", "at step 2", "--lr", "no checkpoint was written")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_an_fp16_scale_below_1_stops_at_the_read(tmp_path, capsys):
    scaler = torch.amp.GradScaler("cpu", init_scale=0.5)  # its gradient overflows fp16 even unscaled
    env = train.Env(torch.device("cpu"), 1, 0, nullcontext(), torch.float16, scaler, None)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    pos = train.Position(step=7, window=[dict(loss=torch.tensor(1.0))], skipped=torch.tensor(16))
    saver = checkpoints.Checkpoints(str(tmp_path / "checkpoint.pt"), None, opt, scaler, None)
    with pytest.raises(SystemExit):
        train.settle(pos, env, opt, saver)
    assert_tells(capsys.readouterr().err, "non-finite fp16 gradient", "step 7")
    assert pos.skipped == 16 and pos.window == [dict(loss=1.0)]  # read back as numbers


def test_a_gpu_run_without_a_frame_cache_says_its_data_wait_and_the_fix(setup, capsys):
    args = train.parse_args(flags(setup, "out", "--num_workers", "4", "--batch_size", "8"))[0]
    line = data.decode_wait(0.185, 128, args)  # MSR-VTT's 185 ms a clip (docs/data.md), 128 clips a step
    assert_tells(line, "185 ms", "128 clips", "4 workers", "5.92 s", "python frame_cache.py --cache",
                 f"--data synthetic --data_path {setup / 'synthetic'}", "--frame_cache", "docs/data.md")
    split = data.read_split("synthetic", "train", str(setup / "synthetic"), None)
    for pinned in (False, True):  # printed only where pinned: on a GPU
        data.train_loader(split, argparse.Namespace(**{**vars(args), "num_workers": 0, "size": 32}), 1, 0, pinned)
        assert ("data: decoding on the fly" in capsys.readouterr().out) == pinned
