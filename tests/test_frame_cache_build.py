"""Building the frame cache, with the faults injected: a build stopped half-way (an exception, Ctrl-C in a
subprocess) keeps every finished clip, says so, and the same command resumes it; a build at other settings into
the same folder is refused in one line, touching nothing; a half-built cache is named as one."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data
import data_checks
import frame_cache
from messages import assert_tells, one_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READ_FRAMES = data.read_frames


def make_videos(folder, n=6):
    """n 16x16 clips of 4 frames, each its own grey level."""
    folder.mkdir()
    for k in range(n):
        data.write_video(str(folder / f"video{k}.mp4"), [np.full((16, 16, 3), 30 * k, np.uint8)] * 4)
    return sorted(str(folder / f"video{k}.mp4") for k in range(n))


def entries(cache):
    """{file name: (inode, mtime_ns)} of the folder's clip files; also that no temporary file was left."""
    names = os.listdir(cache)
    assert all(n == data_checks.MANIFEST or n.endswith(".npy") and ".tmp" not in n for n in names), names
    return {n: (os.stat(os.path.join(cache, n)).st_ino, os.stat(os.path.join(cache, n)).st_mtime_ns)
            for n in names if n.endswith(".npy")}


def stop_after(monkeypatch, n):
    """data.read_frames decodes n clips, then the build is stopped (KeyboardInterrupt) -> the list of calls."""
    calls, read = [], READ_FRAMES

    def read_frames(path, *a, **kw):
        calls.append(path)
        if len(calls) > n:
            raise KeyboardInterrupt
        return read(path, *a, **kw)
    monkeypatch.setattr(data, "read_frames", read_frames)
    return calls


def test_a_stopped_build_keeps_its_clips_refuses_other_settings_and_resumes(tmp_path, monkeypatch, capsys):
    videos, cache = make_videos(tmp_path / "videos"), str(tmp_path / "cache")
    stop_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):  # stopped before its first clip: the settings are recorded already
        frame_cache.build_frame_cache(videos, cache, size=16, fps=0, workers=0)
    assert data_checks.read_manifest(cache)["building"] and entries(cache) == {}
    stop_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        frame_cache.build_frame_cache(videos, cache, size=16, fps=0, workers=0)
    manifest, kept = data_checks.read_manifest(cache), entries(cache)
    assert manifest["building"] and len(manifest["clips"]) == len(kept) == 2  # the finished clips, recorded

    split = data.Split("t", videos, ["x"] * 6, list(range(6)))  # a run reads the 2 clips, decodes the others
    ds = data.VideoTextDataset(split, frames=4, words=8, size=16, train=False, mode="videos", frame_cache=cache)
    assert sum(f is not None for f in ds.cached) == 2
    err = capsys.readouterr().err
    assert_tells(err, "4 of 6", cache, "did not finish", "--size 16 --fps 0")  # a half-built cache, and the fix
    assert "older" not in err

    argv = ["--data", "folder", "--video_path", str(tmp_path / "videos"), "--cache", cache, "--workers", "0"]
    with pytest.raises(SystemExit) as e:  # other settings into the same folder: refused, nothing touched
        frame_cache.main(argv + ["--size", "32"])
    assert e.value.code == 2
    one_error(capsys.readouterr().err, cache, "--size 16 --fps 0", "--size 32 --fps 3", "another folder")
    assert entries(cache) == kept and data_checks.read_manifest(cache) == manifest

    dead = subprocess.Popen(["true"])
    dead.wait()  # a decoding process killed while writing leaves its temporary file (files.atomic_write)
    open(os.path.join(cache, f"video5.mp4.0123.npy.tmp{dead.pid}.npy"), "wb").close()
    calls = stop_after(monkeypatch, 99)
    frame_cache.main(argv + ["--size", "16", "--fps", "0"])  # the same command resumes
    assert_tells(capsys.readouterr().out, "cached 6 of 6")
    assert len(calls) == 4 and set(kept) < set(entries(cache))  # the 2 clips kept as they were, 4 decoded
    manifest = data_checks.read_manifest(cache)
    assert not manifest["building"] and len(manifest["clips"]) == 6


def test_clips_of_other_settings_are_never_read_even_without_the_manifest(tmp_path, monkeypatch):
    videos, cache = make_videos(tmp_path / "videos", n=2), str(tmp_path / "cache")
    frame_cache.build_frame_cache(videos, cache, size=16, fps=0, workers=0)
    os.remove(os.path.join(cache, data_checks.MANIFEST))  # deleted by hand: the folder's settings unknown
    calls = stop_after(monkeypatch, 99)
    frame_cache.build_frame_cache(videos, cache, size=32, fps=0, workers=0)
    assert len(calls) == 2 and np.load(data_checks.cache_file(cache, videos[0])).shape == (4, 3, 32, 32)


WRAPPER = """import sys, time
sys.path.insert(0, {root!r})
import data
read, calls = data.read_frames, []

def read_frames(*a, **kw):  # in each decoding process (spawn runs this file there too): 2 clips, then hang
    calls.append(1)
    if len(calls) > 2:
        time.sleep(120)
    return read(*a, **kw)
data.read_frames = read_frames
if __name__ == "__main__":
    import frame_cache
    frame_cache.main()
"""


def stop_build(argv, wrapper, cache, n, sig):
    """Run the slow build in a subprocess, send `sig` to its process group (as Ctrl-C does: decoding processes
    included) once n clips are in the cache -> (exit status, stderr)."""
    run = subprocess.Popen([sys.executable, str(wrapper), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        while not (cache.is_dir() and sum(n.endswith(".npy") and ".tmp" not in n for n in os.listdir(cache)) >= n):
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
        os.killpg(run.pid, sig)
        return run.wait(timeout=60), run.communicate()[1]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


def test_kill_9_then_ctrl_c_during_the_build_keep_every_clip_and_say_how_to_resume(tmp_path, capsys):
    make_videos(tmp_path / "videos")
    cache, wrapper = tmp_path / "cache", tmp_path / "frame_cache_slow.py"
    wrapper.write_text(WRAPPER.format(root=ROOT))
    argv = ["--data", "folder", "--video_path", str(tmp_path / "videos"), "--cache", str(cache), "--size", "16",
            "--fps", "0", "--workers", "1"]
    assert stop_build(argv, wrapper, cache, 2, signal.SIGKILL)[0] == -signal.SIGKILL
    kept = entries(cache)
    assert len(kept) == 2 and data_checks.read_manifest(cache)["building"]  # settings written before any clip
    with pytest.raises(SystemExit) as e:
        frame_cache.main(argv[:-5] + ["32", "--fps", "0"])  # the bug this replaced: two settings, one manifest
    assert e.value.code == 2 and entries(cache) == kept
    one_error(capsys.readouterr().err, "--size 16 --fps 0", "--size 32 --fps 0")

    status, err = stop_build(argv, wrapper, cache, 4, signal.SIGINT)  # the same command: 2 more clips, Ctrl-C
    assert status == 130 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line: what is kept, the command that resumes
    assert_tells(err, "SIGINT", "4 of 6", "kept", cache, "frame_cache.py " + " ".join(argv))
    assert len(json.load(open(cache / data_checks.MANIFEST))["clips"]) == 4
    assert all(entries(cache)[n] == kept[n] for n in kept)
    kept = entries(cache)

    frame_cache.main(argv[:-1] + ["0"])  # the printed command (decoding in this process): the other 2 clips
    assert_tells(capsys.readouterr().out, "cached 6 of 6")
    assert len(entries(cache)) == 6 and all(entries(cache)[n] == kept[n] for n in kept)
