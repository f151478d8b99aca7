"""frame_cache.py: prepare a data set's videos before training: decode each once into a frame cache, or find the
unreadable ones. The command line of data.py's readers; data.py reads the cache (data_checks.py checks it).

The cache: each video decoded once to uint8 frames at <= fps (3: DGL's compress_video.py re-encodes to 3 fps,
short side 224), resized and centre-cropped to `size` (the crop every load would do: nothing here crops
randomly), in CACHE/<video file name>.npy; CACHE/manifest.json records the settings and the frames of each
clip. Later epochs read memory-mapped .npy files instead of decoding (docs/data.md has the timings).

  python frame_cache.py --cache DIR --data msrvtt --data_path ANN --video_path VIDEOS   # build the cache
  python frame_cache.py --check --data msrvtt --data_path ANN --video_path VIDEOS --split all --out bad_videos.txt
"""
import argparse
import json
import multiprocessing as mp
import os
import sys

import numpy as np
from tqdm import tqdm

import clip
import data
import files
import synthetic
from data_checks import MANIFEST, DataError, cache_file, find_unreadable, read_manifest, write_video_list


def _cache_one(job):
    """Decode one video into its cache file (atomic: an interrupted run never leaves a cut-off one) -> None, or
    the error message of an unreadable video."""
    video, dest, size, fps, max_seconds = job
    if os.path.isfile(dest):
        return None
    try:
        frames = clip.resize_crop(data.read_frames(video, 0, False, fps, max_seconds), size).numpy()  # [N, 3, S, S]
    except data.VideoError as e:
        return str(e)
    files.atomic_write(dest, lambda tmp: np.save(tmp, frames), suffix=".npy")  # np.save adds .npy to other names
    return None


def build_frame_cache(videos, cache_dir, size=224, fps=3.0, workers=1, max_seconds=None):
    """Decode every video once into cache_dir/<file name>.npy, and write cache_dir/manifest.json (the settings,
    the frames of each clip); returns the error messages of unreadable ones. Refuses to add to a cache made
    with other settings. workers: decoding processes (0: this one)."""
    settings = dict(size=size, fps=fps, max_seconds=max_seconds)
    old = read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
    if old and {k: old.get(k) for k in settings} != settings:
        raise DataError(f"frame cache {cache_dir} was made with {({k: old.get(k) for k in settings})}, not "
                        f"{settings}: use another folder, or delete this one")
    os.makedirs(cache_dir, exist_ok=True)
    jobs = [(v, cache_file(cache_dir, v), size, fps, max_seconds) for v in videos]
    bar = dict(total=len(jobs), desc="frame cache", unit="clip", dynamic_ncols=True, disable=not sys.stderr.isatty())
    if workers <= 0:
        errors = [e for e in tqdm(map(_cache_one, jobs), **bar) if e]
    else:
        with mp.get_context("spawn").Pool(workers, initializer=data.worker_init, initargs=(0,)) as pool:
            errors = [e for e in tqdm(pool.imap_unordered(_cache_one, jobs, chunksize=8), **bar) if e]
    for e in errors:
        print("WARNING:", e, file=sys.stderr)
    frames = dict((old or {}).get("frames", {}))
    for v in videos:  # the .npy header holds the shape: no frame is read here
        if os.path.isfile(cache_file(cache_dir, v)):
            frames[os.path.basename(v)] = int(np.load(cache_file(cache_dir, v), mmap_mode="r").shape[0])

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(dict(settings, frames=frames), f)
    files.atomic_write(os.path.join(cache_dir, MANIFEST), write)
    return errors


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the frame cache of a data set, or (--check) find its unreadable "
                                "videos. Exit status: 0 done, 1 --check found unreadable videos, 2 bad input.")
    p.add_argument("--cache", help="frame cache folder: built here (pass it to train.py as --frame_cache); with "
                   "--check, the cache files found there are checked instead of their videos, as train.py reads them")
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
    if not (a.check or a.cache):
        p.error("pass --cache DIR to build the frame cache, or --check to find unreadable videos")
    try:
        if a.data == "synthetic":
            a.data_path = synthetic.ensure_synthetic(a.data_path)
        names = ("train", "test") if a.split == "all" else (a.split,)
        splits = [data.read_split(a.data, s, a.data_path, a.video_path, a.allow_missing) for s in names]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    videos = sorted({v for s in splits for v in s.videos})
    if a.check:
        bad = find_unreadable(videos, a.cache, a.workers if a.workers > 1 else 0)
        write_video_list(a.out, bad)
        print(f"{len(bad)} of {len(videos)} {a.data} {'+'.join(names)} videos cannot be read"
              + (f", e.g. {bad[0][0]} {bad[0][1]}; all are listed in {a.out}" if bad else f"; wrote {a.out} (empty)"))
        sys.exit(1 if bad else 0)
    errors = build_frame_cache(videos, a.cache, a.size, a.fps, a.workers, splits[0].max_seconds)
    print(f"cached {len(videos) - len(errors)} of {len(videos)} videos in {a.cache}")


if __name__ == "__main__":
    main()
