"""frames.py: which frames of a clip a method sees, and how they are cropped in training, as each method's release
does it (data.py decodes them). `sample_frames` holds the releases' rules, chosen by the method's RECIPE
(`--sampling`); `crop_flip` is UMP's training augmentation (`--augment crop_flip`). tests/test_pipelines.py checks
both against what the releases' own loaders returned on frame-ID clips; docs/data.md tabulates them."""
import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

SAMPLING = ("segments", "clip4clip", "dgl", "uniform", "window")
AUGMENT = ("none", "crop_flip")


def sample_frames(n, fps, frames, sampling="segments", train=False, stride=4):
    """Which of a clip's n frames (at fps) fill the T = `frames` slots, by each release's rule -> (indices, one per
    filled slot, in order, repeats allowed; valid: the slots video_mask keeps). Random draws use torch's generator,
    which SeededItems seeds per (epoch, item). Slots past len(indices) are zero-padded."""
    if sampling == "segments":  # nanoTVR's own (the synthetic set): T equal segments, centre (eval) or random
        if n <= frames:
            return list(range(n)), n
        edges = [k * n / frames for k in range(frames + 1)]
        if not train:
            return [int((edges[k] + edges[k + 1]) / 2) for k in range(frames)], frames
        lo, hi = [int(e) for e in edges[:-1]], [int(e) for e in edges[1:]]  # [lo_k, hi_k) is never empty
        return [a + int(torch.randint(b - a, ())) for a, b in zip(lo, hi)], frames
    if sampling == "clip4clip":  # RawVideoExtractorCV2 at 1 fps (int(fps): 29.97 steps by 29), slice_framepos 2
        idx = list(range(0, n, max(int(fps), 1)))  # the same frames in training and test, every epoch
        if len(idx) > frames:
            idx = [idx[k] for k in np.linspace(0, len(idx) - 1, frames).astype(int)]
        return idx, len(idx)  # a 10 s clip: 10 frames, 2 masked slots
    if sampling == "uniform":  # X-Pool's VideoCapture 'uniform' (UMP), training and test; no mask, last repeated
        edges = np.linspace(0, n, min(frames, n) + 1).astype(int)
        idx = [(a + b - 1) // 2 for a, b in zip(edges[:-1], edges[1:])]
        return idx + idx[-1:] * (frames - len(idx)), frames
    if sampling == "dgl":  # DGL's multi_segments_sampling / uniform_sampling
        if n < frames:  # the last frame repeated, masked
            return list(range(n)) + [n - 1] * (frames - n), n
        if train:  # segments of n // T frames: the last n mod T frames are never drawn, as in the release
            avg = n // frames
            return [k * avg + int(torch.randint(avg, ())) for k in range(frames)], frames
        tick = n / frames
        return [int(tick / 2.0 + tick * x) for x in range(frames)], frames  # in this order: 19.999.. -> 19
    if sampling == "window":  # SimVTP's loadvideo_decord: T frames at `stride` from one random window
        if train and n > frames * stride:
            end = int(torch.randint(frames * stride, n, ()))
            start = end - frames * stride
            return np.clip(np.linspace(start, end, frames), start, end - 1).astype(int).tolist(), frames
        if train:  # a short clip: linspace over it, the end repeated
            idx = np.clip(np.linspace(0, n, n // stride).tolist() + [n] * (frames - n // stride), 0, n - 1)
            return idx.astype(int).tolist(), frames
        every = list(range(0, n, stride))  # test: every stride-th frame, the middle of the release's 3 windows
        every += every[-1:] * max(frames - len(every), 0)
        start = int((len(every) - frames) / 2)
        return every[start:start + frames], frames
    raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, not {sampling!r}")


def crop_flip(x, size):
    """UMP's training augmentation (X-Pool's model_transforms.py): one RandomResizedCrop (scale 0.5-1, aspect
    3/4-4/3, bilinear, antialiased) and one horizontal flip at p 0.5, drawn once and applied to every frame of
    the clip. uint8 [t, 3, H, W] -> [t, 3, size, size]; torch's generator (seeded per item)."""
    top, left, h, w = T.RandomResizedCrop.get_params(x, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
    x = TF.resized_crop(x, top, left, h, w, [size, size], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    return x.flip(-1) if torch.rand(()) < 0.5 else x
