"""data.py: video-text retrieval data for nanoTVR: benchmark readers, frame decoding, a synthetic set, loaders.

Readers turn each benchmark's annotation files (the files CLIP4Clip @ 508ffa3 and DGL @ 9139fd1 read;
docs/data.md) into a `Split`: one path per video, the captions, and caption -> video. Multi-caption test
sets (MSVD, VATEX) are several captions pointing at one video; paragraph sets (DiDeMo, ActivityNet) join a
video's sentences into one caption; WebVid-2M (SimVTP pretraining) is one caption per video. `VideoTextDataset`
serves any Split:
  pairs  (training)  one item per caption: video uint8 [T,3,S,S], video_mask bool [T], text long [L]
  videos (eval)      one item per video;   texts (eval) one item per caption.
Frames: T equal segments over the clip, the centre frame of each at eval, a random frame inside each for
training (DGL's sampling); only those frames are decoded (OpenCV), resized and centre-cropped as CLIP does
(clip.resize_crop). Clips with fewer than T frames keep all of them, zero-padded, video_mask False there.
Deviations: (1) CLIP4Clip samples 1 frame/s then `linspace`s 12 of them; we sample segments of all frames.
(2) Clips shorter than T are zero-padded and masked (CLIP4Clip); DGL repeats the last frame. (3) Videos
leave the loader uint8; train.py normalises them on the GPU (the method's normalize_pixels).

  python data.py --cache DIR --data msrvtt --data_path ANN --video_path VIDEOS   # optional frame cache
"""
import csv
import json
import os
import pickle
import re
import sys
import multiprocessing as mp
from collections import defaultdict
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import clip

DATASETS = ("synthetic", "msrvtt", "msrvtt7k", "msvd", "vatex", "didemo", "activitynet", "lsmdc", "webvid")


@dataclass
class Split:
    name: str
    videos: list         # absolute video file paths, one per video
    captions: list       # caption strings
    caption_video: list  # caption i describes videos[caption_video[i]]
    max_seconds: float = None  # sample frames from the first max_seconds only (DiDeMo: 31, as CLIP4Clip)


# ----------------------------------------------------------------------------------------------------
# Readers: (annotation dir, split) -> ordered video ids and (video id, caption) pairs

def _need(root, name, hint):
    path = os.path.join(root or "", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} not found in --data_path {root!r}. {hint}")
    return path


def _lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _read_msrvtt(root, split, train_csv="9k"):
    hint = "Get CLIP4Clip's msrvtt_data.zip (see README, 'Data sets')."
    if split in ("test", "still"):  # 1k-A: key,vid_key,video_id,sentence; one caption per video
        name = "MSRVTT_JSFUSION_test.csv" if split == "test" else "synthetic_still.csv"
        with open(_need(root, name, hint), newline="") as f:
            rows = list(csv.DictReader(f))
        return [r["video_id"] for r in rows], [(r["video_id"], r["sentence"]) for r in rows]
    if split != "train":
        raise ValueError(f"MSR-VTT has splits train/test, not {split!r}")
    with open(_need(root, f"MSRVTT_train.{train_csv}.csv", hint), newline="") as f:
        ids = [r["video_id"] for r in csv.DictReader(f)]
    with open(_need(root, "MSRVTT_data.json", hint)) as f:
        by_video = defaultdict(list)
        for s in json.load(f)["sentences"]:
            by_video[s["video_id"]].append(s["caption"])
    # every caption of every train video (CLIP4Clip --expand_msrvtt_sentences, DGL): 9k -> 180,000 pairs
    return ids, [(v, c) for v in ids for c in by_video[v]]


def _read_msvd(root, split):
    ids = _lines(_need(root, f"{split}_list.txt", "Get CLIP4Clip's msvd_data.zip."))
    with open(_need(root, "raw-captions.pkl", "Get CLIP4Clip's msvd_data.zip."), "rb") as f:
        caps = pickle.load(f)  # id -> list of token lists, e.g. [["a", "man", "is", "cooking"], ...]
    return ids, [(v, t if isinstance(t, str) else " ".join(t)) for v in ids for t in caps[v]]


def _read_vatex(root, split):
    ids = _lines(_need(root, f"{'train' if split == 'train' else 'test'}_list.txt", "Get DGL's VATEX files."))
    with open(_need(root, "ref_captions.json", "Get DGL's VATEX files.")) as f:
        caps = json.load(f)  # id -> list of English captions
    return ids, [(v, c) for v in ids for c in caps[v]]


def _read_didemo(root, split):
    ids = _lines(_need(root, f"{split}_list.txt", "Get CLIP4Clip's DiDeMo annotations."))
    with open(_need(root, f"{split}_data.json", "Get CLIP4Clip's DiDeMo annotations.")) as f:
        sentences = defaultdict(list)  # items {video, description, times: 5-s chunk indices per annotator}
        for item in json.load(f):
            sentences[item["video"]].append(item["description"].strip())
    ids = [v for v in ids if v in sentences]  # CLIP4Clip keeps listed videos that have descriptions
    return ids, [(v, " ".join(sentences[v])) for v in ids]  # paragraph <-> whole video


def _read_activitynet(root, split):
    name = "train.json" if split == "train" else "val_1.json"  # val_1 is the test set of every paper
    with open(_need(root, name, "Get the ActivityNet Captions annotations (see README).")) as f:
        data = json.load(f)  # "v_<youtube id>" -> {duration, timestamps, sentences}; file is <id>.mp4
    ids = [k[2:] if k.startswith("v_") else k for k in data]
    return ids, [(v, " ".join(s.strip() for s in d["sentences"])) for v, d in zip(ids, data.values())]


def _read_lsmdc(root, split):
    name = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
            "test": "LSMDC16_challenge_1000_publictect.csv"}[split]
    pairs = []
    with open(_need(root, name, "LSMDC needs a signed licence from the MPII (see README)."), newline="") as f:
        for n, line in enumerate(f, 1):  # clip_id \t 4 timestamps \t sentence; ids repeat in training
            parts = line.rstrip("\r\n").split("\t")
            if line.strip() and len(parts) < 6:
                raise ValueError(f"{name}:{n}: expected 6 tab-separated fields, got {len(parts)}")
            if line.strip():
                pairs.append((parts[0], "\t".join(parts[5:])))
    return list(dict.fromkeys(v for v, _ in pairs)), pairs


def _read_webvid(root, split):
    """WebVid-2M (SimVTP pretraining): results_2M_{train,val}.csv, columns videoid, contentUrl, duration,
    page_dir, name (the caption); videos at <video_path>/<page_dir>/<videoid>.mp4 (Frozen-in-Time's layout)."""
    name = "results_2M_train.csv" if split == "train" else "results_2M_val.csv"
    with open(_need(root, name, "Get the WebVid-2M CSVs (see README)."), newline="") as f:
        pairs = [(f"{r['page_dir']}/{r['videoid']}.mp4", r["name"]) for r in csv.DictReader(f)]
    return [v for v, _ in pairs], pairs


READERS = dict(msrvtt=_read_msrvtt, msrvtt7k=lambda r, s: _read_msrvtt(r, s, "7k"), msvd=_read_msvd,
               vatex=_read_vatex, didemo=_read_didemo, activitynet=_read_activitynet, lsmdc=_read_lsmdc,
               webvid=_read_webvid)


VIDEO_EXTS = {"mp4", "avi", "mkv", "webm", "mov", "3gp", "mpg", "mpeg", "m4v", "wmv", "flv"}


def _video_index(video_path):
    """file name and name-without-extension -> path, for every file under video_path (any depth/extension:
    LSMDC nests clips per movie, DiDeMo keeps extensions in its ids and some copies add '.mp4')."""
    if not video_path or not os.path.isdir(video_path):
        raise FileNotFoundError(f"--video_path {video_path!r} is not a directory of videos")
    index, video_first = {}, lambda n: (n.rsplit(".", 1)[-1].lower() not in VIDEO_EXTS, n)
    for root, _, files in os.walk(video_path):
        for name in sorted(files, key=video_first):  # 'x.mp4' wins 'x' over a stray 'x.json'
            path = os.path.abspath(os.path.join(root, name))
            index.setdefault(name.rsplit(".", 1)[0], path)
            index[name] = path
    return index


def read_split(data, split, data_path=None, video_path=None, allow_missing=False):
    """Read a benchmark split into a Split; every listed video must exist (or allow_missing=True)."""
    if data not in DATASETS:
        raise ValueError(f"unknown data set {data!r}; choose from {', '.join(DATASETS)}")
    if data == "synthetic":  # MSR-VTT's layout plus a "still" split; synthetic.ensure_synthetic() makes it
        if not data_path:
            raise ValueError("the synthetic set needs its directory: synthetic.ensure_synthetic() returns it")
        video_path = video_path or os.path.join(data_path, "videos")
        ids, pairs = _read_msrvtt(data_path, split)
    else:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test ('still' only for synthetic), not {split!r}")
        ids, pairs = READERS[data](data_path, split)
    ids = list(dict.fromkeys(ids))
    if data == "webvid":  # ids are relative paths; 2.5M files: stat each rather than walk the tree
        if not video_path or not os.path.isdir(video_path):
            raise FileNotFoundError(f"--video_path {video_path!r} is not a directory of videos")
        index = {v: os.path.abspath(os.path.join(video_path, v)) for v in ids
                 if os.path.isfile(os.path.join(video_path, v))}
    else:
        index = _video_index(video_path)
    present = [v for v in ids if v in index]
    if len(present) < len(ids):
        missing = [v for v in ids if v not in index]
        msg = (f"{len(missing)} of {len(ids)} {data} {split} videos are missing under --video_path "
               f"{video_path}, e.g. {', '.join(missing[:5])}. Check --video_path (files are matched by name "
               f"with any extension, in any subfolder) and the download (README, 'Data sets')")
        if not allow_missing:
            raise FileNotFoundError(msg + ", or pass --allow_missing to use the videos that are present.")
        print(f"WARNING: {msg}. --allow_missing: using the {len(present)} present videos only"
              + ("; test metrics are NOT comparable to published ones" if split != "train" else ""),
              file=sys.stderr, flush=True)
    position = {v: i for i, v in enumerate(present)}
    kept = [(position[v], c) for v, c in pairs if v in position]
    if not kept:
        raise ValueError(f"{data} {split}: no captions left for the videos found")
    uncaptioned = len(present) - len({i for i, _ in kept})
    if uncaptioned:
        raise ValueError(f"{data} {split}: {uncaptioned} listed videos have no caption in the annotations")
    # DiDeMo's annotations cover the first 30 s (longer videos were cut for annotation): CLIP4Clip reads 0-31 s
    return Split(name=f"{data}-{split}", videos=[index[v] for v in present], captions=[c for _, c in kept],
                 caption_video=[i for i, _ in kept], max_seconds=31.0 if data == "didemo" else None)


# ----------------------------------------------------------------------------------------------------
# Text

_SPECIAL = re.compile(r"<\|(startoftext|endoftext)\|>", re.IGNORECASE)


def sanitize(caption):
    """Remove literal <|startoftext|>/<|endoftext|> from a caption: the tokenizer would turn them into the
    special ids, and EOT pooling (argmax) would stop there. Clean as the tokenizer does first (ftfy, HTML
    unescaping can create them) and repeat until nothing changes."""
    previous = None
    while caption != previous:
        previous, caption = caption, _SPECIAL.sub(" ", clip._clean(caption))
    return caption


def tokenize(caption, words):
    """caption -> long [words]: [SOT] ids [EOT] zero-padded, truncated keeping EOT (= CLIP4Clip's max_words)."""
    return clip.tokenize(sanitize(caption), context_length=words, truncate=True)[0].long()


# ----------------------------------------------------------------------------------------------------
# Frames

class VideoError(RuntimeError):
    pass


SEEK_GAP = 32  # frames: seek instead of grabbing when the next wanted frame is further than this


def sample_indices(n, frames, train):
    """T equal segments over n frames: the centre of each (eval) or a random frame inside it (training).
    Fewer than T frames: all of them (the caller masks the rest)."""
    if n <= frames:
        return list(range(n))
    edges = [k * n / frames for k in range(frames + 1)]
    if not train:
        return [int((edges[k] + edges[k + 1]) / 2) for k in range(frames)]
    lo = [int(e) for e in edges[:-1]]
    hi = [int(e) for e in edges[1:]]  # segment k is [lo_k, hi_k); n >= T makes it non-empty
    return [a + int(torch.randint(b - a, ())) for a, b in zip(lo, hi)]


def _grab(cap, indices):
    """Read the frames at sorted `indices` -> (RGB frames, number of frames known to exist)."""
    out, pos, known = [], 0, 0
    for i in indices:
        if i - pos > SEEK_GAP:
            cap.set(cv2.CAP_PROP_POS_FRAMES, i)
            pos = i
        while pos < i and cap.grab():
            pos = known = pos + 1
        ok, frame = cap.read() if pos == i else (False, None)
        if not ok:
            return out, known
        out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        pos = known = pos + 1
    return out, known


def read_frames(path, frames, train, fps=None, max_seconds=None):
    """Decode T sampled frames (or, with fps, every frame resampled to <= fps; fps=0: every frame) of the
    first max_seconds (None: all) -> uint8 [t, H, W, 3] RGB; raises VideoError."""
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise VideoError(f"cannot open video {path}")
    n, rate = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS) or 30.0
    step = max(rate / fps, 1.0) if fps else 1.0
    if n <= 0:  # some containers store no frame count: count by grabbing
        n = 0
        while cap.grab():
            n += 1
        cap.release()
        cap = cv2.VideoCapture(path)
    n = min(n, int(max_seconds * rate)) if max_seconds else n
    out, idx = [], []
    for attempt in range(2):
        if fps is None:
            idx = sample_indices(n, frames, train)
        else:
            idx = sorted({int(round(k * step)) for k in range(int(n / step) + 1)} - {n})
        out, known = _grab(cap, idx) if idx else ([], 0)
        cap.release()
        if out and len(out) == len(idx):
            return np.stack(out)
        if known == 0 or attempt:
            break
        n, cap = known, cv2.VideoCapture(path)  # the header promised more frames than the stream holds
    raise VideoError(f"cannot decode video {path} ({len(out)} of {len(idx)} frames)")


def cache_file(cache_dir, video):
    return os.path.join(cache_dir, os.path.basename(video) + ".npy")


def write_video(path, frames, fps=8):
    """BGR uint8 frames -> an mp4v file (the synthetic set, the tests' fixtures)."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, frames[0].shape[1::-1])
    if not writer.isOpened():
        raise RuntimeError(f"this OpenCV cannot write mp4v video ({path})")
    for frame in frames:
        writer.write(frame)
    writer.release()


# ----------------------------------------------------------------------------------------------------
# Dataset and loaders

class VideoTextDataset(Dataset):
    """One Split served as training pairs, eval videos or eval texts (module docstring)."""

    def __init__(self, split, *, frames, words, size, train, mode="pairs", frame_cache=None):
        if mode not in ("pairs", "videos", "texts"):
            raise ValueError(f"mode must be pairs, videos or texts, not {mode!r}")
        self.split, self.frames, self.words, self.size, self.train, self.mode = split, frames, words, size, train, mode
        self.frame_cache = frame_cache
        if frame_cache and mode != "texts":
            missing = [v for v in split.videos if not os.path.isfile(cache_file(frame_cache, v))]
            if missing:
                msg = (f"{len(missing)} of {len(split.videos)} videos have no frame cache in {frame_cache}, e.g. "
                       f"{cache_file(frame_cache, missing[0])}. Build it with `python data.py --cache "
                       f"{frame_cache} --data ... --data_path ... --video_path ...`")
                if len(missing) == len(split.videos):
                    raise FileNotFoundError(msg + ", or drop frame_cache.")
                print(f"WARNING: {msg}; decoding those from the video files.", file=sys.stderr, flush=True)
        # shared with worker processes: one flag per video (log each bad video once) and a substitution count
        self._bad = mp.Array("b", len(split.videos))
        self._substituted = mp.Value("l", 0)

    def __len__(self):
        return len(self.split.videos) if self.mode == "videos" else len(self.split.captions)

    @property
    def corrupt_videos(self):
        """Paths of the videos found unreadable so far (in any worker)."""
        return [v for v, bad in zip(self.split.videos, self._bad[:]) if bad]

    @property
    def substitutions(self):
        """How many training items were replaced because their video could not be read."""
        return self._substituted.value

    def load_video(self, v):
        """-> uint8 [T, 3, size, size], bool [T]; raises VideoError."""
        path = self.split.videos[v]
        if self.frame_cache and os.path.isfile(cache_file(self.frame_cache, path)):
            try:
                cached = np.load(cache_file(self.frame_cache, path), mmap_mode="r")  # [N, 3, S, S]
            except (OSError, ValueError) as e:
                raise VideoError(f"cannot read frame cache of {path}: {e}") from e
            x = torch.from_numpy(np.ascontiguousarray(cached[sample_indices(len(cached), self.frames, self.train)]))
            x = clip.resize_crop(x, self.size) if x.shape[-1] != self.size else x
        else:
            x = read_frames(path, self.frames, self.train, max_seconds=self.split.max_seconds)
            x = clip.resize_crop(x, self.size)  # [t, 3, S, S]
        video = torch.zeros(self.frames, 3, self.size, self.size, dtype=torch.uint8)  # pad: zeros, masked
        video[:len(x)] = x
        mask = torch.arange(self.frames) < len(x)
        return video, mask

    def _mark_bad(self, v, error):
        with self._bad.get_lock():
            first = not self._bad[v]
            self._bad[v] = 1
        if first:
            print(f"WARNING: skipping unreadable video ({error}); substituting the next caption's video",
                  file=sys.stderr, flush=True)

    def __getitem__(self, i):
        if self.mode == "texts":
            return dict(text=tokenize(self.split.captions[i], self.words), caption_index=i)
        if self.mode == "videos":
            try:
                video, mask = self.load_video(i)
            except VideoError as e:  # a missing test video would silently change the metrics
                raise VideoError(f"{e}. Evaluation needs every test video: re-download or re-encode it") from e
            return dict(video=video, video_mask=mask, video_index=i)
        n, j = len(self.split.captions), i
        for _ in range(n):  # training: replace an unreadable pair by the next caption whose video reads
            v = self.split.caption_video[j]
            if not self._bad[v]:
                try:
                    video, mask = self.load_video(v)
                    break
                except VideoError as e:
                    if not self.train:
                        raise
                    self._mark_bad(v, e)
            j = (j + 1) % n
        else:
            raise VideoError(f"no readable video in {self.split.name}")
        if j != i:
            with self._substituted.get_lock():
                self._substituted.value += 1
        return dict(video=video, video_mask=mask, text=tokenize(self.split.captions[j], self.words),
                    video_index=v, caption_index=j)


def _worker_init(_):
    cv2.setNumThreads(1)  # one decoding thread per worker: workers are the parallelism
    torch.set_num_threads(1)


def make_loader(dataset, *, batch_size, shuffle, num_workers, distributed=False, drop_last=False, seed=0):
    """DataLoader with pinned memory and persistent workers; a DistributedSampler under DDP (the caller
    calls loader.sampler.set_epoch(epoch))."""
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last) if distributed else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, drop_last=drop_last, worker_init_fn=_worker_init,
                      generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# Optional frame cache: decode each video once to uint8 frames at <= 3 fps, short side `size`,
# centre-cropped (DGL's compress_video.py re-encodes to 3 fps / short side 224; the crop is the one every
# load would do, as nothing here crops randomly). Later epochs read a memory-mapped .npy instead of decoding.

def _cache_one(job):
    video, dest, size, fps, max_seconds = job
    if os.path.isfile(dest):
        return None
    try:
        frames = clip.resize_crop(read_frames(video, 0, False, fps, max_seconds), size).numpy()  # [N, 3, S, S]
    except VideoError as e:
        return str(e)
    tmp = dest + f".{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, frames)
    os.replace(tmp, dest)  # atomic: an interrupted run never leaves a truncated cache file
    return None


def build_frame_cache(videos, cache_dir, size=224, fps=3.0, workers=1, max_seconds=None):
    """Decode every video once into cache_dir/<file name>.npy; returns the error messages of unreadable ones."""
    os.makedirs(cache_dir, exist_ok=True)
    jobs = [(v, cache_file(cache_dir, v), size, fps, max_seconds) for v in videos]
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(0,)) as pool:
        errors = [e for e in pool.imap_unordered(_cache_one, jobs, chunksize=8) if e]
    for e in errors:
        print("WARNING:", e, file=sys.stderr)
    return errors


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Build the frame cache of a data set (train and test videos).")
    p.add_argument("--cache", required=True, help="output directory; pass it to train.py as --frame_cache")
    p.add_argument("--data", default="synthetic", choices=DATASETS)
    p.add_argument("--data_path")
    p.add_argument("--video_path")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--fps", type=float, default=3.0, help="<= this many frames per second; 0: all frames")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--allow_missing", action="store_true")
    a = p.parse_args()
    if a.data == "synthetic":
        import synthetic  # imports data.py: here, once data.py is loaded
        a.data_path = synthetic.ensure_synthetic(a.data_path)
    splits = [read_split(a.data, s, a.data_path, a.video_path, a.allow_missing) for s in ("train", "test")]
    videos = sorted({v for s in splits for v in s.videos})
    errors = build_frame_cache(videos, a.cache, a.size, a.fps, a.workers, splits[0].max_seconds)
    print(f"cached {len(videos) - len(errors)} of {len(videos)} videos in {a.cache}")
