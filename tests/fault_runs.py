"""The fault tests' run (test_faults_*.py): ump on conftest's tiny synthetic set, and what it leaves behind."""
import json

import pytest
import torch

import train
from messages import one_error


def flags(setup, out, *extra, method="ump"):
    """ump (dropout) on the tiny set: 9 steps of 8 pairs per epoch, 2 frames."""
    return ["--method", method, "--data_path", str(setup / "synthetic"), "--clip", str(setup / "clip.pt"),
            "--output_dir", str(out), "--num_workers", "0", "--max_frames", "2", "--batch_size", "8",
            "--epochs", "1", "--save_every", "0", *extra]


def error(capsys, argv, status=2):
    """Run train.main(argv), expect it to exit with `status`: -> its one `error:` line (no traceback)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == status
    return one_error(capsys.readouterr().err)


def rows(out, *events):
    return [r for r in map(json.loads, open(out / "log.jsonl")) if r["event"] in events]


def losses(out):
    return [(r["step"], r["loss"]) for r in rows(out, "train")]


def state(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)
