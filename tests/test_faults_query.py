"""The query mode's faults: the video feature cache unwritable (results first, one WARNING), damaged (said,
rebuilt), a checkpoint of another method (one `error:` line naming it)."""
import errno
import os
from contextlib import nullcontext

import pytest
import torch

import data
import files
import query
from fault_runs import error
from messages import assert_tells
from test_query import ColourToy, colour_folder, query_args  # noqa: F401 (colour_folder: a fixture)


def search(tmp_path, folder, capsys, text="a green one", log=print):
    """One query with the colour toy -> (the best clip's name, video encodings it made, stdout, stderr)."""
    method = ColourToy(2)
    hits = query.search(method, text, data.read_folder(str(folder)), query_args(tmp_path, tmp_path / "checkpoint.pt"),
                        "cpu", nullcontext(), log=log)
    out = capsys.readouterr()
    return os.path.basename(hits[0][0]), method.video_calls, out.out, out.err


def caches(tmp_path):
    return [f for f in os.listdir(tmp_path) if f.startswith("checkpoint.pt.videos-")]


def test_unwritable_cache_prints_the_results_then_one_warning(colour_folder, tmp_path, capsys, monkeypatch):
    torch.save(dict(model=dict(gain=torch.ones(()))), tmp_path / "checkpoint.pt")

    said = []

    def read_only(path, write, suffix=""):
        assert any("green.MP4" in line for line in said), "the cache is written before the results are printed"
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(files, "atomic_write", read_only)
    best, calls, out, err = search(tmp_path, colour_folder, capsys, log=said.append)
    assert best == "green.MP4" and calls == 2 and "Traceback" not in err
    warnings = [l for l in err.splitlines() if l.startswith("WARNING")]
    assert len(warnings) == 1 and caches(tmp_path) == []
    assert_tells(warnings[0], "not cached", "Read-only file system", "encodes the 3 videos again")
    monkeypatch.undo()
    assert search(tmp_path, colour_folder, capsys)[1] == 2 and len(caches(tmp_path)) == 1  # writable again


@pytest.mark.parametrize("damage", ["cut", "empty", "garbage", "other dict"])
def test_damaged_cache_is_said_and_rebuilt(colour_folder, tmp_path, capsys, damage):
    torch.save(dict(model=dict(gain=torch.ones(()))), tmp_path / "checkpoint.pt")
    search(tmp_path, colour_folder, capsys)
    path = tmp_path / caches(tmp_path)[0]
    whole = path.read_bytes()
    if damage == "other dict":
        torch.save(dict(video=torch.zeros(1), mask=[], videos=data.read_folder(str(colour_folder)).videos), path)
    else:
        path.write_bytes(dict(cut=whole[:len(whole) // 2], empty=b"", garbage=os.urandom(200))[damage])
    for k in range(2):  # the damaged file is said and replaced; the next query reads the new one
        best, calls, out, err = search(tmp_path, colour_folder, capsys, "something blue")
        assert best == "blue.avi" and "Traceback" not in err
        assert calls == (2 if k == 0 else 0) and ("damaged" in err) == (k == 0), err
        assert_tells(err, *[path] * (k == 0))
    assert path.read_bytes() != b"" and len(caches(tmp_path)) == 1


def test_a_checkpoint_of_another_method_or_method_flags_is_named(setup, colour_folder, tmp_path, capsys):
    ck = tmp_path / "ump.pt"
    torch.save(dict(model={}, args=dict(method="ump", data="synthetic", data_path=None, clip=str(setup / "clip.pt"),
                                        frames=2, words=16, size=32, kwargs=dict(K_d=1))), ck)
    for where in (["--data", "folder", "--video_path", str(colour_folder)], ["--data_path", str(setup / "synthetic")]):
        line = error(capsys, ["--method", "dgl", *where, "--checkpoint", str(ck), "--query", "a red one",
                              "--output_dir", str(tmp_path / "out"), "--clip", str(setup / "clip.pt")])
        assert_tells(line, f"--checkpoint {ck}", "ump", "--method ump")
        line = error(capsys, ["--method", "ump", "--K_d", "2", *where, "--checkpoint", str(ck), "--query", "a red one",
                              "--output_dir", str(tmp_path / "out"), "--clip", str(setup / "clip.pt")])
        assert_tells(line, f"--checkpoint {ck}", "--K_d 1", "--K_d 2")  # another model than the one it trained
    assert not (tmp_path / "out").exists()
