"""Bad files stop the start with one `error:` line (docs/faults.md): an unreadable test video or --clip file, a
truncated or foreign --checkpoint / --init; --init names the keys it leaves out."""
import os
import shutil

import pytest
import torch

import data
import train
from conftest import make_tiny_clip
from fault_runs import error, flags
from messages import assert_tells

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


def test_unreadable_test_video_and_clip_file_stop_the_start(setup, tmp_path, capsys):
    shutil.copytree(setup / "synthetic", tmp_path / "set")
    test_video = sorted(data.read_split("synthetic", "test", str(tmp_path / "set")).videos)[0]
    open(test_video, "wb").close()  # 0 bytes
    argv = flags(setup, tmp_path / "out", "--data_path", str(tmp_path / "set"))
    line = error(capsys, argv)
    assert_tells(line, "1 of 8", test_video, "--allow_missing")  # how many, which, the way on without them
    assert not (tmp_path / "out").exists()  # found before any training step, nothing written
    (tmp_path / "clip.txt").write_text("not a model")
    assert str(tmp_path / "clip.txt") in error(capsys, flags(setup, tmp_path / "out", "--clip", str(tmp_path / "clip.txt")))


@pytest.mark.parametrize("content, facts", [  # facts besides the flag and the file: what it may be, where from
    (lambda good: good[:len(good) // 2], ["truncated", "train.py"]),
    (lambda good: os.urandom(4096), ["truncated", "train.py"]),
    (lambda good: b"", ["0 bytes", "truncated"]),
    (lambda good: b"step,loss\n1,2.0\n", ["truncated"]),
], ids=["cut", "random", "empty", "csv"])
def test_bad_checkpoint_files(setup, tmp_path, capsys, content, facts):
    ck = tmp_path / "ck.pt"
    torch.save(dict(model={"w": torch.zeros(100)}), ck)
    ck.write_bytes(content(ck.read_bytes()))
    for flag in ("--checkpoint", "--init"):
        eval_only = ["--eval_only"] if flag == "--checkpoint" else []
        line = error(capsys, flags(setup, tmp_path / "out", *eval_only, flag, str(ck)))
        assert_tells(line, f"{flag} {ck}", *facts)
        assert "weights_only" not in line  # not torch's advice to unpickle it


def test_checkpoint_files_of_the_wrong_kind(setup, tmp_path, capsys):
    torch.save(make_tiny_clip().state_dict(), tmp_path / "sd.pt")  # a state dict is fine for --init only
    line = error(capsys, flags(setup, tmp_path / "a", "--eval_only", "--checkpoint", str(tmp_path / "sd.pt")))
    assert_tells(line, f"--checkpoint {tmp_path / 'sd.pt'}", "without model", "train.py")  # the key it lacks
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    line = error(capsys, flags(setup, tmp_path / "b", "--init", str(tmp_path / "t.pt")))
    assert_tells(line, f"--init {tmp_path / 't.pt'}", "Tensor")  # what it holds instead
    torch.save({"x.weight": torch.zeros(3)}, tmp_path / "other.pt")
    line = error(capsys, flags(setup, tmp_path / "c", "--init", str(tmp_path / "other.pt")))
    assert_tells(line, f"--init {tmp_path / 'other.pt'}", "x.weight")  # its tensors, none of this model


def test_init_names_the_keys_it_leaves_out(setup, tmp_path, capsys):
    pre = ["--method", "simvtp", "--data_path", str(setup / "synthetic"), "--num_workers", "0", "--max_frames", "2",
           "--batch_size", "24", "--max_steps", "1"]
    train.main(pre + ["--stage", "pretrain", "--output_dir", str(tmp_path / "pre")])
    capsys.readouterr()
    train.main(pre + ["--output_dir", str(tmp_path / "ft"), "--init", str(tmp_path / "pre" / "checkpoint.pt")])
    line, = [x for x in capsys.readouterr().out.splitlines() if x.startswith("--init")]
    assert_tells(line, "loaded", "unused", "pretraining", "decoder.*")  # which are left out, and why
