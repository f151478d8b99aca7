"""Flags whose fault is the machine's or the file system's (--device, --output_dir) and CLIP's text context: one
`error:` line before anything is made (docs/faults.md); and --allow_missing keeps each clip's own twin."""
import os
import shutil

import pytest
import torch

import data
import train
from fault_runs import error, flags, state
from messages import assert_tells

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


@pytest.mark.parametrize("device", ["mps", "gpu", "cuda:7", "cuda", "cuda:-1"])
def test_a_device_this_machine_lacks_names_the_ones_it_has(setup, tmp_path, device, capsys):
    if device.startswith("cuda") and device != "cuda:-1" and torch.cuda.device_count() > int(device[5:] or 0):
        pytest.skip(f"this machine has {device}")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    line = error(capsys, flags(setup, tmp_path / "out", "--device", device))
    assert_tells(line, f"--device {device}", "cpu")
    assert not (tmp_path / "out").exists()


def test_max_words_over_clips_context(setup, tmp_path, capsys):
    assert_tells(error(capsys, flags(setup, tmp_path / "out", "--max_words", "78")), "--max_words 78", "77")
    assert not (tmp_path / "out").exists()  # refused before the run folder is made
    assert_tells(error(capsys, ["--method", "ump", "--data", "msrvtt", "--max_words", "100", "--output_dir",
                                str(tmp_path / "out")]), "--max_words 100", "77")  # ViT-B/32's, nothing loaded


def test_output_dir_that_is_a_file_or_read_only(setup, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    for where in (tmp_path / "file", tmp_path / "file" / "run"):
        assert_tells(error(capsys, flags(setup, where)), f"--output_dir {where}", "file", "another --output_dir")
    assert (tmp_path / "file").read_text() == "x"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root writes anyway: a read-only mount as access(2) reports it (EROFS)
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and str(p) != str(locked))
    for where in (locked, locked / "a" / "run"):
        assert_tells(error(capsys, flags(setup, where)), f"--output_dir {where}", str(locked), "not writable")
    assert os.listdir(locked) == []
    locked.chmod(0o755)
    assert_tells(error(capsys, flags(setup, " ")), "--output_dir", "empty")


def test_allow_missing_keeps_each_clips_own_twin(setup, tmp_path, capsys):
    """Two test clips gone: the others keep their own twins (by id, never by position), a lone clip has none."""
    syn = shutil.copytree(setup / "synthetic", tmp_path / "synthetic")
    full = data.read_split("msrvtt", "test", str(syn), str(syn / "videos"))
    gone = [full.videos[0], full.videos[3]]  # one of two pairs each
    for v in gone:
        os.remove(v)
    split = data.read_split("msrvtt", "test", str(syn), str(syn / "videos"), allow_missing=True)
    assert len(split.videos) == len(full.videos) - 2 and "--allow_missing" in capsys.readouterr().err
    name = lambda videos, j: None if j is None else os.path.basename(videos[j])
    for j, v in enumerate(split.videos):
        twin = name(full.videos, full.twin[full.videos.index(v)])
        assert name(split.videos, split.twin[j]) == (None if os.path.join(syn, "videos", twin) in gone else twin)


ODD = [  # (flags, facts) of the fault pass (docs/faults.md): each was a traceback, or a run that did something else
    (["--size", "16"], ["--size 16", "32 px", "--size 32"]),  # the tiny CLIP's 32 px position embedding
    (["--query", " "], ["--query", "empty"]),  # "" trained a run instead of querying
    (["--eval_only", "--checkpoint", "DIR"], ["--checkpoint", "a folder", "checkpoint.pt"]),
]


@pytest.mark.parametrize("extra, facts", ODD, ids=[" ".join(e) for e, _ in ODD])
def test_odd_flags(setup, tmp_path, extra, facts, capsys):
    extra = [str(tmp_path) if x == "DIR" else x for x in extra]
    assert_tells(error(capsys, flags(setup, tmp_path / "out", *extra)), *facts)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # a --clip file: checked once loaded


def test_a_large_seed_trains(setup, tmp_path):  # its training-order seeds passed 2**64: torch refused them
    train.main(flags(setup, tmp_path / "out", "--seed", "1234", "--max_steps", "1", "--num_workers", "1"))
    assert state(tmp_path / "out")["step"] == 1


def test_dangling_output_dir_link_and_a_split_without_videos(setup, tmp_path, capsys):
    os.symlink(tmp_path / "gone", tmp_path / "link")
    assert_tells(error(capsys, flags(setup, tmp_path / "link")), f"--output_dir {tmp_path / 'link'}", "link to nothing")
    syn = shutil.copytree(setup / "synthetic", tmp_path / "synthetic")
    test_csv = os.path.join(syn, "MSRVTT_JSFUSION_test.csv")
    open(test_csv, "w").write("key,vid_key,video_id,sentence\n")
    with pytest.raises(data.DataError) as e:
        data.read_split("msrvtt", "test", syn)
    assert_tells(str(e.value), test_csv, "no rows")


def test_a_caption_of_special_tokens_only_is_an_empty_caption(setup, tmp_path, capsys):
    syn = shutil.copytree(setup / "synthetic", tmp_path / "synthetic")
    test_csv = os.path.join(syn, "MSRVTT_JSFUSION_test.csv")
    text = open(test_csv).read().splitlines()
    open(test_csv, "w").write("\n".join([text[0], text[1].rsplit(",", 2)[0] + ",<|endoftext|> ,video25", *text[2:]]))
    with pytest.raises(data.DataError) as e:  # 1k-A: one caption per video, so its video has none left
        data.read_split("msrvtt", "test", syn)
    assert_tells(str(e.value), test_csv, "no non-empty caption") and "1 empty test caption" in capsys.readouterr().err


@pytest.mark.parametrize("twin, facts", [("", None), ("video24", ["video24", "own twin"])])
def test_a_blank_twin_is_none_and_a_clip_is_not_its_own_twin(setup, tmp_path, twin, facts):
    syn = shutil.copytree(setup / "synthetic", tmp_path / "synthetic")
    test_csv = os.path.join(syn, "MSRVTT_JSFUSION_test.csv")
    text = open(test_csv, newline="").read()
    open(test_csv, "w", newline="").write(text.replace(",video25\r\n", f",{twin}\r\n", 1))  # video24's row
    if facts is None:
        split = data.read_split("msrvtt", "test", syn, os.path.join(syn, "videos"))
        assert split.twin[0] is None and split.twin[2] == 3
    else:
        with pytest.raises(data.DataError) as e:
            data.read_split("msrvtt", "test", syn)
        assert_tells(str(e.value), test_csv, *facts)


def test_cache_dir_that_is_a_file(setup, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = error(capsys, ["--method", "zeroshot", "--data_path", str(setup / "synthetic"), "--cache_dir",
                          str(tmp_path / "file"), "--output_dir", str(tmp_path / "out")])
    assert_tells(line, f"--cache_dir {tmp_path / 'file'}", "not a folder")
