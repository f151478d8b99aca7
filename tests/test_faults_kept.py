"""A training run's files are never lost to another command (docs/faults.md): an evaluation-only run (zeroshot,
--eval_only) beside it, even with --overwrite; a full disk at a checkpoint write; a checkpoint whose parameter
shapes the method no longer has (--resume, --eval_only). Each ends in one line that says what to do."""
import os
import shlex

import pytest
import torch

import run_folder
import train
from fault_runs import error, flags, losses, state
from messages import assert_tells

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


def files_in(out):
    return {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file()}


def test_evaluation_only_runs_never_replace_a_training_run(setup, tmp_path, capsys, monkeypatch):
    run = tmp_path / "out" / "ump-synthetic"
    train.main(flags(setup, run, "--max_steps", "2"))
    before = files_in(run)
    # zero-shot with a --clip file (it trains nothing: known once built) into the run's folder, --overwrite too
    for extra in ([], ["--overwrite"]):
        assert train.main(flags(setup, run, *extra, method="zeroshot"))["t2v"]
    assert_tells(capsys.readouterr().err, "WARNING: --overwrite has no effect", "replaces no file")
    after = files_in(run)
    assert {f: after[f] for f in before} == before  # checkpoint.pt, log.jsonl as they were
    new = sorted(set(after) - set(before))
    assert len(new) == 4 and [f[:5] for f in new] == ["eval-", "eval-", "retri", "retri"]  # a record, a picture each
    # --eval_only of the run with the default --output_dir, the run's own: its records go to eval/ in it
    monkeypatch.chdir(tmp_path)
    argv = flags(setup, run, "--eval_only", "--checkpoint", str(run / "checkpoint.pt"))
    del argv[argv.index("--output_dir"):argv.index("--output_dir") + 2]
    train.main(argv)
    assert files_in(run) == after
    assert sorted(f[:5] for f in os.listdir(run / "eval")) == ["eval-", "retri"]


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(setup, tmp_path, capsys, monkeypatch):
    """The disk fills as step 2 is logged: the checkpoint write after it fails with ENOSPC (its temporary file is
    /dev/full). One line says so, the step 1 checkpoint stays, and the printed command resumes exactly."""
    out, record = tmp_path / "run", run_folder.Folder.record

    def filling(self, **row):
        if row.get("event") == "train" and row["step"] == 2:
            os.symlink("/dev/full", out / f"checkpoint.pt.tmp{os.getpid()}")
        return record(self, **row)

    monkeypatch.setattr(run_folder.Folder, "record", filling)
    argv = flags(setup, out, "--save_every", "1", "--log_every", "1")
    line = error(capsys, argv, status=1)
    monkeypatch.undo()
    assert_tells(line, out / "checkpoint.pt", "step 2", "No space left on device", "kept", "free space", "--resume")
    assert state(out)["step"] == 1 and sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl"]  # no tmp left
    assert [s for s, _ in losses(out)] == [1, 2]
    command = line.split("`")[1]
    train.main(shlex.split(command)[2:])
    train.main(flags(setup, tmp_path / "whole", "--log_every", "1"))
    assert losses(out) == losses(tmp_path / "whole")
    assert all(w.equal(state(out)["model"][n]) for n, w in state(tmp_path / "whole")["model"].items())
    # no checkpoint yet: nothing to resume, say so
    monkeypatch.setattr(run_folder.Folder, "record", filling)
    out = tmp_path / "first"
    line = error(capsys, flags(setup, out, "--save_every", "2", "--log_every", "1"), status=1)
    assert_tells(line, "No space left on device", "no checkpoint was written", "run again")


def test_a_checkpoint_of_other_parameter_shapes(setup, tmp_path, capsys):
    """A method whose parameter shapes changed (another version) meets an older checkpoint: torch's
    size-mismatch traceback becomes the line --init gives, and the run's files stay."""
    train.main(flags(setup, tmp_path, "--max_steps", "2"))
    ck = state(tmp_path)
    name = sorted(ck["model"])[0]
    ck["model"][name] = torch.cat([ck["model"][name]] * 2)  # the same name, another shape
    torch.save(ck, tmp_path / "checkpoint.pt")
    before = files_in(tmp_path)
    line = error(capsys, flags(setup, tmp_path, "--resume"))
    assert_tells(line, tmp_path / "checkpoint.pt", "does not fit", f"size mismatch for {name}", "method flags")
    line = error(capsys, flags(setup, tmp_path / "ev", "--eval_only", "--checkpoint", str(tmp_path / "checkpoint.pt")))
    assert_tells(line, tmp_path / "checkpoint.pt", "does not fit", f"size mismatch for {name}")
    assert files_in(tmp_path) == before
