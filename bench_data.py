"""Start-up check, decode and frame-cache load time per clip and clips/s, one worker thread. Not a test: it times things.

  python bench_data.py                 # MSR-VTT-like clips (320x240, 30 fps, 15 s, mp4v) and synthetic clips

Writes its clips and caches under a temporary directory and deletes them afterwards.
"""
import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import cv2
import numpy as np
import torch

import data
import synthetic


def msrvtt_like_clip(path, seed, seconds=15, fps=30, size=(320, 240)):
    """A textured background with a few moving discs: enough motion and detail for realistic mp4v files."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    centres, speeds = rng.uniform(0, [w, h], (4, 2)), rng.uniform(-4, 4, (4, 2))
    frames = []
    for t in range(seconds * fps):
        frame = np.roll(base, t, axis=1).copy()  # camera pan
        for c, v in zip(centres, speeds):
            x, y = (c + v * t) % [w, h]
            cv2.circle(frame, (int(x), int(y)), 20, (255, 200, 50), -1)
        frames.append(frame)
    data.write_video(path, frames, fps)


def time_per_clip(fn, items, repeats):
    times = []
    for _ in range(repeats):
        for i in items:
            t = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times), 1000 * min(times)


def bench(name, split, size, frames, repeats, tmp):
    cache = os.path.join(tmp, name + "-cache")
    os.makedirs(cache)
    items = range(len(split.videos))
    rows = [("start-up check (data.probe_video: open, first frame)",
             time_per_clip(lambda v: data.probe_video(split.videos[v]), items, repeats))]
    for train in (False, True):
        ds = data.VideoTextDataset(split, frames=frames, words=32, size=size, train=train, mode="videos")
        rows.append((f"decode {frames} frames ({'random' if train else 'centre'} in segments)",
                     time_per_clip(ds.load_video, items, repeats)))
    build = time_per_clip(lambda v: data._cache_one((split.videos[v], data.cache_file(cache, split.videos[v]),
                                                     size, 3.0, None)), items, 1)
    rows.append(("build cache (one-off: <=3 fps, all frames)", build))
    for train in (False, True):
        ds = data.VideoTextDataset(split, frames=frames, words=32, size=size, train=train, mode="videos",
                                   frame_cache=cache)
        rows.append((f"cached load, {frames} frames ({'random' if train else 'centre'})",
                     time_per_clip(ds.load_video, items, repeats)))
    n = np.load(data.cache_file(cache, split.videos[0]), mmap_mode="r").shape[0]
    print(f"\n{name}: {len(split.videos)} clips, output {frames}x3x{size}x{size} uint8; cache {n} frames/clip, "
          f"{os.path.getsize(data.cache_file(cache, split.videos[0])) / 2**20:.1f} MiB/clip")
    print(f"| step | median ms/clip | min ms/clip | clips/s per worker (median) |\n|---|---|---|---|")
    for label, (med, mn) in rows:
        print(f"| {label} | {med:.1f} | {mn:.1f} | {1000 / med:.1f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)  # what one loader worker gets
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"{cpu}, {os.cpu_count()} cores visible, 1 thread; OpenCV {cv2.__version__}, torch {torch.__version__}")
    tmp = tempfile.mkdtemp(prefix="bench_data-")
    try:
        vids = os.path.join(tmp, "msrvtt_like")
        os.makedirs(vids)
        for i in range(args.clips):
            msrvtt_like_clip(os.path.join(vids, f"video{i}.mp4"), i)
        split = data.Split("msrvtt-like", [os.path.join(vids, f"video{i}.mp4") for i in range(args.clips)],
                           ["x"] * args.clips, list(range(args.clips)))
        bench("MSR-VTT-like 320x240 30 fps 15 s mp4v", split, 224, 12, args.repeats, tmp)
        root = synthetic.ensure_synthetic(os.path.join(tmp, "synthetic"), n_train=args.clips * 4, n_test_pairs=1)
        synth = data.read_split("synthetic", "train", root)
        bench("synthetic 64x64 8 fps 16-24 frames mp4v", synth, 64, 12, args.repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
