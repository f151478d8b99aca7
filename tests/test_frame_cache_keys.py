"""What a frame cache serves, with the faults injected: two data sets whose clips share file names never share an
entry; a video changed after it was cached (re-encoded, or only touched) is never served its old frames; a
garbage, cut-off, foreign or missing manifest stops train.py at start-up and `frame_cache.py --check` in one
`error:` line, before any model is loaded, and nothing is written."""
import json
import os

import numpy as np
import pytest

import data
import data_checks
import frame_cache
import train
from fault_runs import error, flags
from messages import assert_tells, one_error


def grey_videos(folder, level, n=2):
    """folder/video0.mp4 ... : n 16x16 clips of 4 frames, clip k at grey `level + 30 k`."""
    folder.mkdir(exist_ok=True)
    for k in range(n):
        data.write_video(str(folder / f"video{k}.mp4"), [np.full((16, 16, 3), level + 30 * k, np.uint8)] * 4)
    return data.Split(folder.name, [str(folder / f"video{k}.mp4") for k in range(n)], ["x"] * n, list(range(n)))


def served(split, cache=None):
    """The mean grey level of each clip as a run reads it: from the cache (every clip must be there), or decoded."""
    ds = data.VideoTextDataset(split, frames=4, words=8, size=16, train=False, mode="videos", frame_cache=cache)
    assert all(ds.cached) or not cache
    return [round(ds[v]["video"].float().mean().item()) for v in range(len(split.videos))]


def test_two_data_sets_with_the_same_file_names_never_share_an_entry(tmp_path):
    a, b = grey_videos(tmp_path / "synthetic", 40), grey_videos(tmp_path / "msrvtt", 200)
    for va, vb in zip(a.videos, b.videos):  # copies whose times were kept (cp -p, rsync -a), of equal size
        assert os.path.getsize(va) == os.path.getsize(vb)
        os.utime(vb, ns=(os.stat(va).st_atime_ns, os.stat(va).st_mtime_ns))
    cache = str(tmp_path / "cache")
    frame_cache.build_frame_cache(a.videos, cache, size=16, fps=0, workers=0)
    with pytest.raises(data.DataError) as e:  # b's video0.mp4 is not a's
        data.VideoTextDataset(b, frames=4, words=8, size=16, train=False, frame_cache=cache)
    assert_tells(str(e.value), "2 of 2", b.videos[0], cache, "--size 16 --fps 0")
    frame_cache.build_frame_cache(b.videos, cache, size=16, fps=0, workers=0)  # both sets in one folder
    assert served(a, cache) == served(a) and served(b, cache) == served(b) != served(a)
    assert len(os.listdir(cache)) == 5  # 4 clips and the manifest


def test_a_changed_video_is_never_served_its_old_frames(tmp_path, capsys):
    split, cache = grey_videos(tmp_path / "videos", 40, n=3), str(tmp_path / "cache")
    frame_cache.build_frame_cache(split.videos, cache, size=16, fps=0, workers=0)
    before = served(split, cache)
    old = data_checks.cache_file(cache, split.videos[1])
    grey_videos(tmp_path / "videos", 100, n=2)  # re-downloaded: video0 and video1 re-encoded, other grey levels
    st = os.stat(split.videos[2])
    os.utime(split.videos[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # video2 only touched
    with pytest.raises(data.DataError) as e:  # a run: refused at start-up
        data.VideoTextDataset(split, frames=4, words=8, size=16, train=False, frame_cache=cache)
    assert_tells(str(e.value), "3 of 3", split.videos[0], "changed", cache, "--size 16 --fps 0")
    bad = data_checks.find_unreadable(split.videos, cache)  # the start-up check and --check: each one listed
    assert [v for v, _ in bad] == split.videos and all("changed" in why for _, why in bad)

    frame_cache.build_frame_cache(split.videos, cache, size=16, fps=0, workers=0)  # the same command updates it
    assert served(split)[:2] != before[:2]
    assert served(split, cache) == served(split) and not os.path.exists(old)  # the old frames deleted
    assert len(os.listdir(cache)) == 4
    capsys.readouterr()


@pytest.mark.parametrize("damage", ["garbage", "cut", "list", "no clips", "old format", "missing"])
def test_a_damaged_manifest_stops_training_and_check_at_start_up(setup, tmp_path, capsys, damage):
    cache, out = tmp_path / "cache", tmp_path / "run"
    split = data.read_split("synthetic", "test", str(setup / "synthetic"))
    frame_cache.build_frame_cache(split.videos, str(cache), size=32, fps=0, workers=0)
    manifest = cache / data_checks.MANIFEST
    whole = manifest.read_bytes()
    manifest.write_bytes({"garbage": os.urandom(200), "cut": whole[:len(whole) // 2], "list": b"[1, 2]",
                          "no clips": json.dumps(dict(size=32, fps=0, max_seconds=None, building=False)).encode(),
                          "old format": json.dumps(dict(size=32, fps=0, max_seconds=None, frames={})).encode(),
                          "missing": b""}[damage])
    if damage == "missing":
        manifest.unlink()
    before = sorted(os.listdir(cache))
    fact = "not found" if damage == "missing" else "file name only" if damage == "old format" else "damaged"
    line = error(capsys, flags(setup, out, "--frame_cache", str(cache)))  # train.py: before any model is loaded
    assert_tells(line, str(manifest) if damage != "old format" else str(cache), fact, "frame_cache.py --cache")
    assert not (out / "checkpoint.pt").exists() and sorted(os.listdir(cache)) == before  # nothing written

    with pytest.raises(SystemExit) as e:  # --check: the same line, no list
        frame_cache.main(["--check", "--cache", str(cache), "--data_path", str(setup / "synthetic"), "--split",
                          "test", "--out", str(tmp_path / "bad.txt")])
    assert e.value.code == 2 and not (tmp_path / "bad.txt").exists()
    one_error(capsys.readouterr().err, fact, "frame_cache.py --cache")


def test_a_changed_training_video_stops_training_before_its_folder_is_made(setup, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    train, test = (data.read_split("synthetic", s, str(setup / "synthetic")) for s in ("train", "test"))
    frame_cache.build_frame_cache(sorted(set(train.videos + test.videos)), str(cache), size=32, fps=0, workers=0)
    changed = next(v for v in train.videos if v not in test.videos)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    try:
        line = error(capsys, flags(setup, out, "--frame_cache", str(cache)))
    finally:
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))  # the session's set, as it was
    assert_tells(line, changed, "changed", str(cache))
    assert not out.exists()  # refused before the run folder (and any CLIP) was made


def test_a_cache_of_smaller_frames_is_refused_without_a_false_warning(setup, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    splits = [data.read_split("synthetic", s, str(setup / "synthetic")) for s in ("train", "test")]
    videos = sorted({v for s in splits for v in s.videos})
    frame_cache.build_frame_cache(videos, str(cache), size=16, fps=0, workers=0)
    with pytest.raises(SystemExit):  # no --size: the CLIP file's 32 px, known once it is loaded
        train.main(flags(setup, out, "--frame_cache", str(cache)))
    err = capsys.readouterr().err  # refused once the file is loaded; it said "this run uses 0 px" before
    assert_tells(one_error(err), "16 px", "32 px")
    assert "WARNING" not in err and not (out / "checkpoint.pt").exists()
