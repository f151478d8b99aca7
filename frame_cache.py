"""frame_cache.py: prepare a data set's videos before training: decode each once into a frame cache, or find the
unreadable ones. The command line of data.py's readers; data.py reads the cache (data_checks.py checks it).

The cache: each video decoded once to uint8 frames at <= fps (3: DGL's compress_video.py re-encodes to 3 fps,
short side 224), resized and centre-cropped to `size` (the crop every load would do: nothing here crops
randomly), in CACHE/<video file name>.<key>.npy, the key a hash of the video's real path, size and modification
time and of the settings (data_checks.cache_entry); CACHE/manifest.json records the settings and each clip's
file and frames. The manifest is written before the first clip and after the last, each clip atomically: a
stopped build is resumed by the same command, which keeps the clips already done. Later epochs read
memory-mapped .npy files instead of decoding (docs/data.md has the timings).

  python frame_cache.py --cache DIR --data msrvtt --data_path ANN --video_path VIDEOS   # build the cache
  python frame_cache.py --check --data msrvtt --data_path ANN --video_path VIDEOS --split all --out bad_videos.txt
"""
import argparse
import json
import multiprocessing as mp
import os
import re
import shlex
import signal
import sys

import numpy as np
from tqdm import tqdm

import clip
import data
import files
import synthetic
from data_checks import (MANIFEST, DataError, cache_entry, cache_settings, describe, find_unreadable, lookup,
                         read_manifest, write_video_list)


def _cache_one(job):
    """Decode one video into its cache file (atomic: an interrupted run never leaves a cut-off one) -> None, or
    the error message of an unreadable video."""
    video, dest, size, fps, max_seconds = job
    if _frames(dest) is not None:
        return None
    try:
        frames = clip.resize_crop(data.read_frames(video, 0, False, fps, max_seconds), size).numpy()  # [N, 3, S, S]
    except data.VideoError as e:
        return str(e)
    files.atomic_write(dest, lambda tmp: np.save(tmp, frames), suffix=".npy")  # np.save adds .npy to other names
    return None


def _frames(path):
    """-> the number of frames in a cache file (its .npy header), or None if it is missing or damaged."""
    try:
        return int(np.load(path, mmap_mode="r").shape[0])
    except (OSError, ValueError, EOFError, IndexError):
        return None


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it ends the pool)
    data.worker_init(0)


def _write_manifest(cache_dir, settings, clips, building):
    text = json.dumps(dict(settings, building=building, clips=clips))
    files.atomic_write(os.path.join(cache_dir, MANIFEST), lambda tmp: files.write_bytes(tmp, text.encode()))


def _remove_dead_temporaries(cache_dir):
    """Temporary files (files.atomic_write's NAME.tmp<pid>) of a build that was killed."""
    for name in os.listdir(cache_dir):
        pid = re.fullmatch(r".+\.tmp(\d+)(\.npy)?", name)
        if pid:
            try:
                os.kill(int(pid.group(1)), 0)  # signal 0: only asks whether the process exists
            except ProcessLookupError:
                os.remove(os.path.join(cache_dir, name))
            except PermissionError:  # it exists (another user's)
                pass


def build_frame_cache(videos, cache_dir, size=224, fps=3.0, workers=1, max_seconds=None):
    """Decode every video not cached yet into cache_dir (module docstring) and record it in the manifest; returns
    the error messages of unreadable ones. Refuses a folder made at other settings. workers: decoding processes
    (0: this one). Stopped (Ctrl-C, an error), it records the clips done, which the next build keeps."""
    settings = cache_settings(size, fps, max_seconds)
    old = read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
    if old and cache_settings(*(old[k] for k in settings)) != settings:
        raise DataError(f"frame cache {cache_dir} holds frames made at {describe(old)}, not {describe(settings)}: "
                        f"build these into another folder (--cache NEW_DIR), or delete {cache_dir} first")
    os.makedirs(cache_dir, exist_ok=True)
    _remove_dead_temporaries(cache_dir)
    clips = dict(old["clips"]) if old else {}
    _write_manifest(cache_dir, settings, clips, building=True)  # the folder's settings, before any clip
    keys = {v: cache_entry(v, settings) for v in videos}
    errors = [f"cannot read video {v} (not found)" for v, k in keys.items() if k is None]
    jobs = [(v, os.path.join(cache_dir, k[1]), size, fps, max_seconds) for v, k in keys.items() if k]
    bar = dict(total=len(jobs), desc="frame cache", unit="clip", dynamic_ncols=True, disable=not sys.stderr.isatty())
    done, superseded = False, []
    try:
        if workers <= 0:
            errors += [e for e in tqdm(map(_cache_one, jobs), **bar) if e]
        else:
            with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
                errors += [e for e in tqdm(pool.imap_unordered(_cache_one, jobs, chunksize=8), **bar) if e]
        done = True
    finally:  # record the clips done, even when stopped; the .npy header holds the shape: no frame is read here
        for path, name in filter(None, keys.values()):
            frames = _frames(os.path.join(cache_dir, name))
            if frames is not None:
                if path in clips and clips[path]["file"] != name:
                    superseded.append(clips[path]["file"])  # the frames of an earlier version of the video
                clips[path] = dict(file=name, frames=frames)
        _write_manifest(cache_dir, settings, clips, building=not done)
        _remove_dead_temporaries(cache_dir)
    for name in superseded:  # now that the manifest no longer names them
        if os.path.isfile(os.path.join(cache_dir, name)):
            os.remove(os.path.join(cache_dir, name))
    for e in errors:
        print("WARNING:", e, file=sys.stderr)
    return errors


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the frame cache of a data set, or (--check) find its unreadable "
                                "videos. Exit status: 0 done, 1 --check found unreadable videos, 2 bad input.")
    p.add_argument("--cache", help="frame cache folder: built here (pass it to train.py as --frame_cache); with "
                   "--check, the cache files found there are checked instead of their videos, as train.py reads "
                   "them, and videos changed since they were cached are listed")
    p.add_argument("--check", action="store_true", help="open every video of --split (header and first frame) and "
                   "write the unreadable ones to --out")
    p.add_argument("--out", default="bad_videos.txt", help="--check: the list of unreadable videos, one "
                   "'path<TAB>what is wrong' a line (written even when empty)")
    p.add_argument("--split", default="all", choices=("train", "test", "all"))
    p.add_argument("--data", default="synthetic", choices=data.DATASETS)
    p.add_argument("--data_path")
    p.add_argument("--video_path")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--fps", type=float, default=3.0, help="<= this many frames per second; 0: all frames")
    p.add_argument("--workers", type=int, default=1, help="processes decoding or checking videos")
    p.add_argument("--allow_missing", action="store_true")
    a = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops a build (`cmd &` starts it ignored)
    if not (a.check or a.cache):
        p.error("pass --cache DIR to build the frame cache, or --check to find unreadable videos")
    try:
        if a.data == "synthetic":
            a.data_path = synthetic.ensure_synthetic(a.data_path)
        names = ("train", "test") if a.split == "all" else (a.split,)
        splits = [data.read_split(a.data, s, a.data_path, a.video_path, a.allow_missing) for s in names]
        videos = sorted({v for s in splits for v in s.videos})
        if a.check:
            bad = find_unreadable(videos, a.cache, a.workers if a.workers > 1 else 0)
            write_video_list(a.out, bad)
            print(f"{len(bad)} of {len(videos)} {a.data} {'+'.join(names)} videos cannot be read" + (
                f", e.g. {bad[0][0]} {bad[0][1]}; all are listed in {a.out}" if bad else f"; wrote {a.out} (empty)"))
            sys.exit(1 if bad else 0)
        errors = build_frame_cache(videos, a.cache, a.size, a.fps, a.workers, splits[0].max_seconds)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a read-only or full disk, --cache naming a file
        print(f"error: cannot write {e.filename or a.cache} ({e.strerror}): free space or choose a writable folder; "
              f"a build keeps the clips it cached, and the same command goes on from them", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if a.check or not os.path.isdir(a.cache):
            print("SIGINT: stopped; nothing written", file=sys.stderr)
            sys.exit(130)
        manifest = read_manifest(a.cache)  # it records the clips done
        n = sum(lookup(a.cache, manifest, v)[0] is not None for v in videos) if manifest else 0
        command = " ".join(map(shlex.quote, ["python", "frame_cache.py", *(sys.argv[1:] if argv is None else argv)]))
        print(f"SIGINT: stopped; {n} of {len(videos)} videos are cached in {a.cache} and kept; the same command "
              f"resumes: {command}", file=sys.stderr)
        sys.exit(130)
    print(f"cached {len(videos) - len(errors)} of {len(videos)} videos in {a.cache}")


if __name__ == "__main__":
    main()
