"""One run per --output_dir (docs/faults.md): a folder that holds a run, a live or dead run's lock, a checkpoint
written by another run meanwhile, --resume with changed flags, and a failing evaluation that keeps its epoch."""
import fcntl
import json
import os
import subprocess

import pytest
import torch

import checks
import data
import retrieval
import run_folder
import train
from fault_runs import error, flags, losses, rows, state
from messages import assert_tells

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


def test_one_run_per_folder(setup, tmp_path, capsys):
    train.main(flags(setup, tmp_path, "--max_steps", "2"))
    kept = {f: (tmp_path / f).read_bytes() for f in ("checkpoint.pt", "log.jsonl")}
    line = error(capsys, flags(setup, tmp_path))  # a new run (an ablation, say) into the same default folder
    assert_tells(line, tmp_path / "checkpoint.pt", "--resume", "--overwrite")  # the run there, the two ways on
    assert {f: (tmp_path / f).read_bytes() for f in kept} == kept
    # a lock left by a live process keeps a run out; one of a dead process is taken over
    (tmp_path / "lock").write_text(f"{os.uname().nodename} {os.getpid()}")
    assert_tells(error(capsys, flags(setup, tmp_path, "--resume")), f"pid {os.getpid()}", tmp_path / "lock")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "lock").write_text(f"{os.uname().nodename} {dead.pid}")
    (tmp_path / "checkpoint.pt.tmp12345").write_bytes(b"half a checkpoint")  # a killed checkpoint write
    train.main(flags(setup, tmp_path, "--overwrite"))
    err = capsys.readouterr().err
    assert_tells(err, f"pid {dead.pid}", "died", "checkpoint.pt.tmp12345")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "log.jsonl", "retrievals.png"]  # no lock, no tmp
    assert [r["event"] for r in rows(tmp_path, "start", "resume")] == ["start"]  # the old log was replaced
    # --eval_only writes its own record, never into the training log
    log = (tmp_path / "log.jsonl").read_bytes()
    metrics = train.main(flags(setup, tmp_path, "--eval_only", "--checkpoint", str(tmp_path / "checkpoint.pt")))
    assert (tmp_path / "log.jsonl").read_bytes() == log
    record, = [f for f in os.listdir(tmp_path) if f.startswith("eval-")]
    assert json.load(open(tmp_path / record))["t2v"] == rows(tmp_path, "eval")[-1]["t2v"] == pytest.approx(metrics["t2v"])


def test_a_stale_lock_is_taken_over_by_one_run_only(setup, tmp_path, capsys):
    """Two runs that both find a dead run's lock: the first to take it holds its flock, so the second is refused
    even though the file still names the dead process (the race the old read-check-remove-create sequence lost)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "lock").write_text(f"{os.uname().nodename} {dead.pid}")
    first = os.open(tmp_path / "lock", os.O_RDWR)
    fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other run won the takeover, not yet rewritten
    try:
        assert_tells(error(capsys, flags(setup, tmp_path, "--max_steps", "1")), "in use", tmp_path / "lock")
    finally:
        os.close(first)
    train.main(flags(setup, tmp_path, "--max_steps", "1"))  # once it is gone, the dead run's lock is taken over
    assert "died" in capsys.readouterr().err and not (tmp_path / "lock").exists()


def test_a_checkpoint_written_between_the_checks_and_the_lock_is_not_overwritten(setup, tmp_path):
    folder = run_folder.Folder(train.parse_args(flags(setup, tmp_path))[0], {})  # checks pass: no run there yet
    torch.save({}, tmp_path / "checkpoint.pt")  # meanwhile another run writes its first checkpoint
    with pytest.raises(checks.RunError) as e:
        folder.claim(overwrite=False)
    assert_tells(str(e.value), tmp_path / "checkpoint.pt", "again")  # the fix: run the command again
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # its lock released, the other run's file kept


def test_resume_refuses_changed_flags_and_drops_the_rows_it_redoes(setup, tmp_path, capsys):
    train.main(flags(setup, tmp_path, "--max_steps", "4", "--log_every", "2"))
    line = error(capsys, flags(setup, tmp_path, "--resume", "--lr", "1", "--max_frames", "3"))
    assert_tells(line, "--resume", "--max_frames 3", "--lr 1.0", "0.001", "--epochs")  # what differs, what may
    assert "--batch_size" in error(capsys, flags(setup, tmp_path, "--resume", "--batch_size", "4"))
    with open(tmp_path / "log.jsonl", "a") as f:  # what a run killed after its checkpoint logged, cut mid-line
        f.write(json.dumps(dict(event="train", step=6, loss=1.0)) + "\n" + '{"event": "tra')
    train.main(flags(setup, tmp_path, "--resume", "--epochs", "2", "--log_every", "3"))  # these may change
    resumed, = rows(tmp_path, "resume")
    assert resumed["dropped_rows"] == 2 and resumed["changed"]["epochs"] == [1, 2] and resumed["step"] == 4
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 4, 6, 9, 12, 15, 18]  # step 1: always a row


def test_failed_evaluation_keeps_the_epoch(setup, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise data.VideoError("cannot open video /data/video7.mp4")

    monkeypatch.setattr(retrieval, "evaluate", broken)
    line = error(capsys, flags(setup, tmp_path), status=1)
    assert_tells(line, "epoch 1", "/data/video7.mp4", "kept", "--resume")
    assert (state(tmp_path)["epoch"], state(tmp_path)["batch"], state(tmp_path)["step"]) == (1, 0, 9)
    monkeypatch.undo()
    metrics = train.main(flags(setup, tmp_path, "--resume"))  # evaluates the kept epoch, nothing to train
    assert rows(tmp_path, "eval")[-1]["step"] == 9 and rows(tmp_path, "eval")[-1]["t2v"] == metrics["t2v"]
