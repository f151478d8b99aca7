"""Runs that stop part-way, each with the message the user sees and what is kept (docs/faults.md): SIGTERM and
SIGINT mid-epoch (the step finishes, a checkpoint, the printed command resumes exactly), a huge lr (stopped at the
first non-finite step), non-finite weights (never saved)."""
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import checks
import run_folder
import train
from fault_runs import error, flags, losses, rows, state
from messages import assert_tells

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


def test_sigterm_mid_epoch_saves_and_the_printed_command_resumes_exactly(setup, tmp_path, capsys):
    """SIGTERM (a scheduler's pre-emption) in a subprocess with worker processes: the step finishes, the
    checkpoint is written, exit 143 with the command that resumes; a second run meanwhile is kept out."""
    out = tmp_path / "cut"
    argv = flags(setup, out, "--num_workers", "2", "--log_every", "1", "--batch_size", "4")  # 18 steps
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (out / "log.jsonl").exists() or not rows(out, "train"):  # its first step is done
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        line = error(capsys, flags(setup, out))  # meanwhile, a second run into the same folder
        assert_tells(line, out)  # the folder, whichever check saw the run first
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert_tells(stderr, "SIGTERM", "checkpoint")
    ck = state(out)
    assert ck["epoch"] == 0 and 0 < ck["batch"] < 18 and ck["step"] == ck["batch"]  # mid-epoch
    command, = [x.strip() for x in stdout.splitlines() if x.strip().startswith("python train.py")]
    assert command.endswith("--resume")
    train.main(shlex.split(command)[2:])  # the command as printed
    train.main(flags(setup, tmp_path / "whole", "--log_every", "1", "--batch_size", "4"))
    assert losses(out) == losses(tmp_path / "whole")  # no row twice, none lost, all equal
    for name, w in state(tmp_path / "whole")["model"].items():
        assert torch.equal(w, state(out)["model"][name]), name
    assert not (out / "lock").exists()


def test_sigint_finishes_the_step_and_a_second_quits(setup, tmp_path, capsys, monkeypatch):
    record, handler = run_folder.Folder.record, signal.getsignal(signal.SIGINT)

    def interrupting(times, at):  # Ctrl-C `times` times as step `at` is logged, before the run checks for a stop
        def f(self, **row):
            for _ in range(times if row.get("event") == "train" and row["step"] == at else 0):
                os.kill(os.getpid(), signal.SIGINT)
            return record(self, **row)
        return f

    monkeypatch.setattr(run_folder.Folder, "record", interrupting(1, at=3))
    with pytest.raises(SystemExit) as e:
        train.main(flags(setup, tmp_path, "--log_every", "1"))
    out, err = capsys.readouterr()
    assert e.value.code == 130 and "KeyboardInterrupt" not in err
    assert_tells(err, "SIGINT", "checkpoint")  # the step finishes, then a checkpoint
    assert (state(tmp_path)["step"], state(tmp_path)["batch"]) == (3, 3)
    assert_tells(out, "SIGINT", "step 3", "--resume")
    monkeypatch.setattr(run_folder.Folder, "record", interrupting(2, at=6))
    with pytest.raises(SystemExit) as e:
        train.main(flags(setup, tmp_path, "--resume", "--log_every", "1"))
    assert e.value.code == 130
    assert_tells(capsys.readouterr().err, "SIGINT", "stopped")
    assert state(tmp_path)["step"] == 3 and not (tmp_path / "lock").exists()  # the last checkpoint stays
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_resume_command():
    argv = ["--method", "ump", "--max_steps", "4", "--overwrite", "--max_steps=5", "--output_dir", "out dir"]
    assert run_folder.resume_command(argv, 1) == "python train.py --method ump --output_dir 'out dir' --resume"
    assert run_folder.resume_command(["--resume"], 4) == "torchrun --standalone --nproc_per_node=4 train.py --resume"
    multi_node = run_folder.resume_command([], 8, 4)  # the user adds the rendezvous flags
    assert multi_node.startswith("torchrun --nnodes=2 --nproc_per_node=4 ") and multi_node.endswith(" train.py --resume")
    assert_tells(multi_node, "rendezvous")


def test_huge_lr_stops_at_the_first_non_finite_step(setup, tmp_path, capsys):
    line = error(capsys, flags(setup, tmp_path, "--lr", "1e6", "--save_every", "1"), status=1)
    step = int(re.search(r"step (\d+)", assert_tells(line, "non-finite", "--lr"))[1])  # the fix: a lower --lr
    ck = state(tmp_path)  # the checkpoint of the step before, finite
    assert ck["step"] == step - 1 and all(torch.isfinite(t).all() for t in ck["model"].values())
    assert not rows(tmp_path, "eval")


def test_non_finite_weights_are_never_saved(setup, tmp_path):
    method = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(method.parameters())
    args = train.parse_args(flags(setup, tmp_path))[0]
    saver = checkpoints.Checkpoints(str(tmp_path / "checkpoint.pt"), method, opt, torch.amp.GradScaler("cpu", enabled=False), args)
    saver.save(dict(step=1))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    method.weight.data[0, 0] = float("nan")
    with pytest.raises(checks.RunError) as e:
        saver.save(dict(step=2))
    assert_tells(str(e.value), tmp_path / "checkpoint.pt", "'weight'", "not finite")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
