"""frame_cache.py and data_checks' video checks: every unreadable video named at once (nothing touched), cache
files' headers checked, the cache equal to decoding, `python frame_cache.py --check` writing the full list, the
cache's manifest (one setting per folder, a warning for a cache made with other settings)."""
import ast
import csv
import json
import os

import cv2
import numpy as np
import pytest

import data
import data_checks
import frame_cache
from messages import assert_tells, one_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def videos(tmp_path):
    """good0-2 decode; empty is 0 bytes, junk is not a video, cut is an mp4 whose index (moov, at the end) was cut
    off, zeroed an mp4 whose frames were overwritten with zeros; short.avi is an MJPG file cut at 60%: its header
    says 24 frames, it holds fewer, and it still loads."""
    folder = tmp_path / "videos"
    folder.mkdir()
    frames = [np.full((32, 48, 3), 10 * k, np.uint8) for k in range(24)]
    for k in range(3):
        data.write_video(str(folder / f"good{k}.mp4"), frames)
    whole = (folder / "good0.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(whole[:len(whole) // 2])
    start, end = whole.find(b"mdat") + 4, whole.find(b"moov") - 4  # the frames lie between, the index after
    (folder / "zeroed.mp4").write_bytes(whole[:start] + bytes(end - start) + whole[end:])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "junk.mp4").write_bytes(b"\x00not a video" * 50)
    writer = cv2.VideoWriter(str(folder / "short.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 8, (48, 32))
    for f in frames:
        writer.write(f)
    writer.release()
    whole = (folder / "short.avi").read_bytes()
    (folder / "short.avi").write_bytes(whole[:len(whole) * 6 // 10])
    names = ["good0.mp4", "cut.mp4", "good1.mp4", "empty.mp4", "short.avi", "junk.mp4", "zeroed.mp4", "good2.mp4"]
    return data.Split("fixture-test", [str(folder / n) for n in names], names, list(range(len(names))))


def test_check_videos_names_every_unreadable_video_at_once(videos, tmp_path):
    bad = data_checks.find_unreadable(videos.videos)
    assert [os.path.basename(v) for v, _ in bad] == ["cut.mp4", "empty.mp4", "junk.mp4", "zeroed.mp4"]
    for (_, why), fact in zip(bad, ["does not open", "0 bytes", "does not open", "first frame"]):
        assert_tells(why, fact)  # what is wrong with each
    before = {v: open(v, "rb").read() for v in videos.videos}
    report = tmp_path / "out" / "bad_videos.txt"
    with pytest.raises(data.DataError) as e:
        data_checks.check_videos(videos, report=str(report), show=2)
    msg = str(e.value)  # how many, the first `show` files and what is wrong, where the rest are, the fixes
    assert_tells(msg, "4 of 8", "fixture-test", bad[0][0], "empty.mp4", "0 bytes", report, "--allow_missing")
    assert "junk.mp4" not in msg
    assert report.read_text().splitlines() == [f"{v}\t{why}" for v, why in bad]
    assert {v: open(v, "rb").read() for v in videos.videos} == before  # nothing touched
    with pytest.raises(data.DataError) as e:
        data_checks.check_videos(videos, show=2)
    assert "2 more" in str(e.value) and "python frame_cache.py --check" in str(e.value)  # the command listing all
    good = data.Split("ok", [v for v in videos.videos if "good" in v or "short" in v], ["x"] * 4, [0, 1, 2, 3])
    assert data_checks.check_videos(good, report=str(tmp_path / "none.txt")) is None
    assert not (tmp_path / "none.txt").exists()
    assert len(data.read_frames(videos.videos[4], 12, train=False)) > 0  # short.avi passed, and it does load


def test_check_videos_reads_frame_cache_headers(videos, tmp_path):
    cache, good = str(tmp_path / "cache"), videos.videos[0]
    assert frame_cache.build_frame_cache([good], cache, size=32, fps=0, workers=0) == []
    cached = data_checks.cache_file(cache, good)
    assert data_checks.find_unreadable([good], cache) == []
    whole = open(cached, "rb").read()
    open(cached, "wb").write(whole[:len(whole) // 2])  # a cache file cut off
    [(_, why)] = data_checks.find_unreadable([good], cache)
    assert_tells(why, cached, "damaged", "delete")  # the cache file, what is wrong, the fix
    frame_cache.build_frame_cache([good], cache, size=32, fps=0, workers=0)  # the same build replaces it
    assert data_checks.find_unreadable([good], cache) == []
    np.save(cached, np.zeros((0, 3, 32, 32), np.uint8))
    assert_tells(data_checks.probe_video(good, cached), "[0, 3, 32, 32]", "[frames, 3, size, size]")  # has, should
    why = data_checks.find_unreadable([videos.videos[3], good], cache)[0][1]  # not cached: the video itself
    assert_tells(why, "0 bytes")
    assert cache not in why


def test_check_command_writes_the_list(tmp_path, capsys):
    ann, folder = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir(), folder.mkdir()
    with open(ann / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["key", "vid_key", "video_id", "sentence"]]
                                + [[f"ret{i}", f"msr{i}", f"video{i}", f"caption {i}"] for i in range(3)])
    data.write_video(str(folder / "video0.mp4"), [np.zeros((16, 16, 3), np.uint8)] * 4)
    (folder / "video1.mp4").write_bytes(b"")
    (folder / "video2.mp4").write_bytes(b"garbage" * 30)
    out = tmp_path / "bad.txt"
    flags = ["--check", "--data", "msrvtt", "--split", "test", "--data_path", str(ann), "--video_path", str(folder)]

    def run(*args):  # `python frame_cache.py ARGS` -> its exit status
        with pytest.raises(SystemExit) as e:
            frame_cache.main(list(args))
        return e.value.code
    assert run(*flags, "--out", str(out), "--workers", "2") == 1  # 2 worker processes
    printed = capsys.readouterr().out
    assert_tells(printed, "2 of 3", "msrvtt", out)  # how many, and the list
    assert [line.split("\t")[0] for line in out.read_text().splitlines()] == [str(folder / "video1.mp4"),
                                                                              str(folder / "video2.mp4")]
    os.remove(ann / "MSRVTT_JSFUSION_test.csv")
    assert run(*flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line, nothing else
    one_error(err, "MSRVTT_JSFUSION_test.csv", "--data_path")  # the file missing, the flag to check


def test_frame_cache_manifest_refuses_and_warns(tmp_path, capsys):
    videos = []
    for k, n in enumerate((3, 8)):
        data.write_video(str(tmp_path / f"v{k}.mp4"), [np.full((16, 16, 3), (50, 50, 50), np.uint8)] * n)
        videos.append(str(tmp_path / f"v{k}.mp4"))
    cache = str(tmp_path / "cache")
    assert frame_cache.build_frame_cache(videos, cache, size=16, fps=0) == []
    manifest = json.load(open(os.path.join(cache, data_checks.MANIFEST)))
    assert {k: manifest[k] for k in ("size", "fps", "max_seconds", "building")} == dict(
        size=16, fps=0, max_seconds=None, building=False)
    assert {os.path.basename(v): c["frames"] for v, c in manifest["clips"].items()} == {"v0.mp4": 3, "v1.mp4": 8}
    with pytest.raises(data.DataError) as e:
        frame_cache.build_frame_cache(videos, cache, size=32, fps=0)  # never mix two settings in one folder
    assert_tells(str(e.value), cache, "--size 16", "--size 32")  # the folder, its settings and these
    split = data.Split("t", videos, ["a", "b"], [0, 1])
    with pytest.raises(data.DataError) as e:
        data.VideoTextDataset(split, frames=4, words=8, size=32, train=False, frame_cache=cache)
    assert_tells(str(e.value), cache, "16 px", "32 px", "--size 32", "--size 16")  # the sizes, both fixes
    capsys.readouterr()
    data.VideoTextDataset(split, frames=4, words=8, size=8, train=False, frame_cache=cache)
    err = capsys.readouterr().err
    assert_tells(err, "16 px", "8 px", "--size 8")  # frames larger than the run's: resized, and the fix
    assert_tells(err, "1 of 2", "v0.mp4", "--fps")  # clips with fewer frames than the run's: which, and the fix
    data.VideoTextDataset(split, frames=4, words=8, size=8, train=False, frame_cache=cache)
    assert capsys.readouterr().err == ""  # said once per process
    data.VideoTextDataset(split, frames=2, words=8, size=16, train=False, frame_cache=cache)
    assert capsys.readouterr().err == ""  # the run's settings: nothing to say


def test_data_modules_import_downwards_only():
    """data_checks <- data <- synthetic <- frame_cache, imports inside functions included: no module is loaded
    twice (`python data.py` once imported synthetic, which imported data.py again)."""
    ours = {"data_checks", "data", "synthetic", "frame_cache"}
    layer = {"data_checks": 0, "data": 1, "synthetic": 2, "frame_cache": 3}
    for name in ours:
        tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert all(layer[m] < layer[name] for m in imported & ours), (name, imported & ours)
