"""A DataLoader worker killed mid-epoch (the OOM killer, a decoder's segfault: SIGKILL, injected here) never
costs finished training: the steps done are checkpointed at the last optimizer step, one `error:` line says so and
gives the command that resumes, exit 1; that command's run ends equal to the uninterrupted one (docs/faults.md)."""
import os
import shlex
import signal
import subprocess

import pytest
import torch

import data
import run_folder
import train
from fault_runs import error, flags, losses, state
from messages import assert_tells

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too
LOADED = []  # the items a worker process has read (each forked worker has its own copy)


def dying_at(n):
    """SeededItems.__getitem__ whose DataLoader worker kills itself at the n-th item it reads."""
    read = data.SeededItems.__getitem__

    def f(self, key):
        info = torch.utils.data.get_worker_info()
        if info is not None:
            LOADED.append(key)
            if len(LOADED) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return read(self, key)
    return f


def test_a_killed_worker_keeps_the_finished_steps_and_the_printed_command_resumes_exactly(setup, tmp_path, capsys,
                                                                                         monkeypatch):
    # 8 pairs per step in 2 micro-batches of 4, one worker, which dies as it starts micro-batch 6 (step 4). The
    # batches it made and the main process has not taken (prefetched: 5, maybe 4) die with it: the failure shows
    # in step 3, where micro-batch 4 (if it came) is dropped, or in step 4
    out = tmp_path / "cut"
    argv = flags(setup, out, "--num_workers", "1", "--gradient_accumulation_steps", "2", "--log_every", "3")
    with monkeypatch.context() as m:
        m.setattr(data.SeededItems, "__getitem__", dying_at(6 * 4 + 1))
        line = error(capsys, argv, status=1)
    ck = state(out)
    assert ck["step"] in (2, 3) and (ck["epoch"], ck["batch"]) == (0, 2 * ck["step"])  # at an optimizer step
    assert len(ck["window"]) == 2 * (ck["step"] - 1)  # since the row of step 1
    assert_tells(line, "data loader failed", "worker", f"step {ck['step'] + 1}",
                 f"{ck['step']} finished steps", out / "checkpoint.pt")
    command = line.split("`")[1]
    assert command.startswith("python train.py") and command.endswith("--resume")
    train.main(shlex.split(command)[2:])  # the command as printed
    train.main(flags(setup, tmp_path / "whole", "--num_workers", "0", "--gradient_accumulation_steps", "2",
                     "--log_every", "3"))
    assert losses(out) == losses(tmp_path / "whole")  # no row twice, none lost, all equal
    for name, w in state(tmp_path / "whole")["model"].items():
        assert torch.equal(w, state(out)["model"][name]), name
    assert not (out / "lock").exists()


def test_a_worker_death_reaches_the_loop_between_steps_only():
    """DataLoader's SIGCHLD handler raises wherever the main process is; run_folder.batches holds it off during a step
    (a step cut half-way could not be checkpointed) and gives a failure of the loader to its callback."""
    def raising(signum, frame):
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed.")

    class Loader:  # as DataLoader's iter(): a handler for its workers' deaths, then batches, then a failure
        def __iter__(self):
            signal.signal(signal.SIGCHLD, raising)
            return self.batches()

        def batches(self):
            yield from range(2)
            raise OSError("read error")

    before, failures, seen = signal.getsignal(signal.SIGCHLD), [], []
    try:
        for x in run_folder.batches(Loader(), failures.append):
            subprocess.run(["true"])  # a child process ends mid-step: SIGCHLD
            seen.append(x)
        assert seen == [0, 1] and [str(e) for e in failures] == ["read error"]
        assert signal.getsignal(signal.SIGCHLD) is raising  # the loader's handler is back after the epoch
    finally:
        signal.signal(signal.SIGCHLD, before)
