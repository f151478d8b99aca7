"""data.py: video-text retrieval data for nanoTVR: benchmark readers, tokenizing, frame decoding, the loaders.

Readers turn each benchmark's annotation files (the files CLIP4Clip @ 508ffa3 and DGL @ 9139fd1 read; MSVD
also as UMP_TVR ships it; docs/data.md) into a `Split`: one path per video, the captions, and caption -> video.
Multi-caption test sets (MSVD, VATEX) are several captions pointing at one video; paragraph sets (DiDeMo,
ActivityNet) join a video's sentences into one caption; WebVid-2M (SimVTP pretraining) is one caption per video.
The synthetic set is written by synthetic.py in MSR-VTT's layout (videos in <data_path>/videos); a test CSV's
optional `twin` column (the id of each clip's time-reversed twin) becomes Split.twin. `VideoTextDataset`
serves any Split:
  pairs  (training)  one item per caption: video uint8 [T,3,S,S], video_mask bool [T], text long [L]
  videos (eval)      one item per video;   texts (eval) one item per caption.
Frames: each method's RECIPE names its release's rule (frames.py: which frames, train and test, and how a short
clip is padded; tests/test_pipelines.py checks each against the release's own loader), and UMP's augmentation
(`augment="crop_flip"`: one RandomResizedCrop and flip per clip in training). Only the chosen frames
are decoded (OpenCV), resized and centre-cropped as CLIP does (clip.resize_crop), or read from a frame cache
(frame_cache.py). Deviations: (1) the releases that read a 3 fps re-encode (DGL, UniPT) are given the same rule
on the source frames; (2) videos leave the loader uint8; train.py normalises them on the GPU.

Bad data raises DataError (data_checks.py loads the annotation files so that each fault names the file, its
line, key or column and its download): listed videos without captions, missing videos (unless
allow_missing), a test split that lists a video twice (it would double-count captions and shift the metrics).
Repeated captions of one video are kept: MSVD's annotators wrote the same sentence 3,730 times in its test
split, and published results count them. Empty captions are dropped with a warning giving their number.
check_videos() names every unreadable video of a split at once. A video that fails to decode in training is
replaced by the next caption's (logged once, counted); in evaluation it is an error.
"""
import multiprocessing as mp
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import clip
from frames import crop_flip, sample_frames
from data_checks import (DataError, bad_file, caption_text, captions_of, check_unique, get_key, load_json,
                         load_pickle, need_file, not_text, read_csv, read_list, text_encoding)
from data_checks import check_frame_cache

DATASETS = ("synthetic", "msrvtt", "msrvtt7k", "msvd", "vatex", "didemo", "activitynet", "lsmdc", "webvid", "folder")


@dataclass
class Split:
    name: str
    videos: list         # absolute video file paths, one per video
    captions: list       # caption strings
    caption_video: list  # caption i describes videos[caption_video[i]]
    max_seconds: float = None  # sample frames from the first max_seconds only (DiDeMo: 31, as CLIP4Clip)
    twin: list = None    # videos[twin[j]] is video j played backwards (None: no twin), from the test CSV's "twin"


# ----------------------------------------------------------------------------------------------------
# Readers: (annotation dir, split, origin) -> ordered video ids, (video id, caption) pairs, the captions' file,
# and {video id: its twin's id} (None where the file has no twin column). `origin`: the download the file
# comes from, for data_checks' messages.

ORIGINS = dict(
    synthetic="synthetic.py (delete the synthetic set's folder and it is generated again)",
    msrvtt="CLIP4Clip's msrvtt_data.zip (README, 'Data sets')",
    msrvtt7k="CLIP4Clip's msrvtt_data.zip (README, 'Data sets')",
    msvd="CLIP4Clip's msvd_data.zip (raw-captions.pkl) or UMP_TVR's data/MSVD (captions_msvd.json) "
         "(README, 'Data sets')",
    vatex="DGL's VATEX annotations (README, 'Data sets')",
    didemo="CLIP4Clip's DiDeMo annotations (README, 'Data sets')",
    activitynet="the ActivityNet Captions annotations (README, 'Data sets')",
    lsmdc="the LSMDC annotations, which the MPII gives out under a signed licence (README, 'Data sets')",
    webvid="the WebVid-2M CSVs (README, 'Data sets')",
)


def _read_msrvtt(root, split, origin, train_csv="9k"):
    if split == "test":  # 1k-A: key,vid_key,video_id,sentence[,twin]; one caption per video
        path = need_file(root, "MSRVTT_JSFUSION_test.csv", origin)
        rows = read_csv(path, ("video_id", "sentence"), origin)
        check_unique([r["video_id"] for _, r in rows], [n for n, _ in rows], path, origin)
        twin = {r["video_id"]: r["twin"].strip() or None for _, r in rows} if "twin" in rows[0][1] else None  # blank: none
        return [r["video_id"] for _, r in rows], [(r["video_id"], r["sentence"]) for _, r in rows], path, twin
    if split != "train":
        raise DataError(f"MSR-VTT has splits train/test, not {split!r}")
    rows = read_csv(need_file(root, f"MSRVTT_train.{train_csv}.csv", origin), ("video_id",), origin)
    ids = [r["video_id"] for _, r in rows]
    path = need_file(root, "MSRVTT_data.json", origin)
    if os.path.getsize(path) == 0:  # UMP_TVR's repository holds a 0-byte placeholder of this name
        raise bad_file(path, "is empty (0 bytes; UMP_TVR's repository holds an empty placeholder of this name)", origin)
    sentences = get_key(load_json(path, origin), "sentences", path, "the top-level object", origin)
    by_video = defaultdict(list)
    for k, s in enumerate(sentences):
        where = f"sentences[{k}]"
        by_video[get_key(s, "video_id", path, where, origin)].append(
            caption_text(get_key(s, "caption", path, where, origin), path, where + "['caption']", origin))
    # every caption of every train video (CLIP4Clip --expand_msrvtt_sentences, DGL): 9k -> 180,000 pairs
    return ids, [(v, c) for v in ids for c in by_video[v]], path, None


def _read_msvd(root, split, origin):
    """{split}_list.txt beside CLIP4Clip's raw-captions.pkl (id -> word lists) or UMP_TVR's captions_msvd.json
    (id -> caption strings, the same captions joined by spaces); the pickle is read when both are there."""
    path = need_file(root, f"{split}_list.txt", origin)
    ids, lines = read_list(path, origin)
    if split == "test":
        check_unique(ids, lines, path, origin)
    pkl, js = os.path.join(root, "raw-captions.pkl"), os.path.join(root, "captions_msvd.json")
    if os.path.isfile(pkl):
        path, table = pkl, load_pickle(pkl, origin)
    elif os.path.isfile(js):
        path, table = js, load_json(js, origin, unique_keys=split == "test")
    else:
        raise DataError(f"neither raw-captions.pkl nor captions_msvd.json is in --data_path {root}: the MSVD "
                        f"captions come from {origin}")
    if not isinstance(table, dict):
        raise bad_file(path, f"holds a {type(table).__name__}, expected a dict of video id -> captions", origin)
    return ids, [(v, c) for v in ids for c in captions_of(table, v, path, origin)], path, None


def _read_vatex(root, split, origin):
    path = need_file(root, f"{'train' if split == 'train' else 'test'}_list.txt", origin)
    ids, lines = read_list(path, origin)
    if split == "test":
        check_unique(ids, lines, path, origin)
    path = need_file(root, "ref_captions.json", origin)
    table = load_json(path, origin, unique_keys=split == "test")  # id -> list of English captions
    if not isinstance(table, dict):
        raise bad_file(path, f"holds a {type(table).__name__}, expected an object of video id -> captions", origin)
    return ids, [(v, c) for v in ids for c in captions_of(table, v, path, origin)], path, None


def _read_didemo(root, split, origin):
    path = need_file(root, f"{split}_list.txt", origin)
    ids, lines = read_list(path, origin)
    if split == "test":
        check_unique(ids, lines, path, origin)
    path = need_file(root, f"{split}_data.json", origin)
    items = load_json(path, origin)  # items {video, description, times: 5-s chunk indices per annotator}
    if not isinstance(items, list):
        raise bad_file(path, f"holds a {type(items).__name__}, expected a list of {{video, description}} items", origin)
    sentences = defaultdict(list)
    for k, item in enumerate(items):
        video, text = (get_key(item, key, path, f"item {k}", origin) for key in ("video", "description"))
        sentences[video].append(caption_text(text, path, f"item {k}['description']", origin).strip())
    ids = [v for v in ids if v in sentences]  # CLIP4Clip keeps listed videos that have descriptions
    return ids, [(v, " ".join(sentences[v])) for v in ids], path, None  # paragraph <-> whole video


def _read_activitynet(root, split, origin):
    path = need_file(root, "train.json" if split == "train" else "val_1.json", origin)  # val_1: every paper's test set
    table = load_json(path, origin, unique_keys=split == "test")  # "v_<id>" -> {duration, timestamps, sentences}
    if not isinstance(table, dict):
        raise bad_file(path, f"holds a {type(table).__name__}, expected an object of video id -> annotations", origin)
    ids = [k[2:] if k.startswith("v_") else k for k in table]  # the file is <id>.mp4
    if split == "test":  # 'v_x' and 'x' are one video
        check_unique(ids, [f"key {k!r}" for k in table], path, origin)
    pairs = []
    for v, (key, d) in zip(ids, table.items()):
        sentences = get_key(d, "sentences", path, f"[{key!r}]", origin)
        if not isinstance(sentences, list):
            raise bad_file(path, f"has [{key!r}]['sentences'] = {type(sentences).__name__}, expected a list", origin)
        pairs.append((v, " ".join(caption_text(s, path, f"[{key!r}]['sentences']", origin).strip() for s in sentences)))
    return ids, pairs, path, None


def _read_lsmdc(root, split, origin):
    name = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
            "test": "LSMDC16_challenge_1000_publictect.csv"}[split]
    path, pairs, lines = need_file(root, name, origin), [], []
    try:
        with open(path, encoding=text_encoding(path)) as f:
            for n, line in enumerate(f, 1):  # clip_id \t 4 timestamps \t sentence; ids repeat in training
                parts = line.rstrip("\r\n").split("\t")
                if line.strip() and len(parts) < 6:
                    raise bad_file(path, f"line {n} has {len(parts)} tab-separated fields, expected 6 (clip id, 4 "
                                   "timestamps, sentence)", origin)
                if line.strip():
                    pairs.append((parts[0], "\t".join(parts[5:])))
                    lines.append(n)
    except UnicodeError:
        raise not_text(path, origin) from None
    if not pairs:
        raise bad_file(path, "is empty", origin)
    if split == "test":  # 1,000 clips, one sentence each
        check_unique([v for v, _ in pairs], lines, path, origin)
    return list(dict.fromkeys(v for v, _ in pairs)), pairs, path, None


def _read_webvid(root, split, origin):
    """WebVid-2M (SimVTP pretraining): results_2M_{train,val}.csv, columns videoid, contentUrl, duration,
    page_dir, name (the caption); videos at <video_path>/<page_dir>/<videoid>.mp4 (Frozen-in-Time's layout)."""
    path = need_file(root, "results_2M_train.csv" if split == "train" else "results_2M_val.csv", origin)
    rows = read_csv(path, ("videoid", "page_dir", "name"), origin)
    pairs = [(f"{r['page_dir']}/{r['videoid']}.mp4", r["name"]) for _, r in rows]
    if split == "test":
        check_unique([v for v, _ in pairs], [n for n, _ in rows], path, origin)
    return [v for v, _ in pairs], pairs, path, None


READERS = dict(synthetic=_read_msrvtt, msrvtt=_read_msrvtt, msrvtt7k=lambda r, s, o: _read_msrvtt(r, s, o, "7k"),
               msvd=_read_msvd, vatex=_read_vatex, didemo=_read_didemo, activitynet=_read_activitynet,
               lsmdc=_read_lsmdc, webvid=_read_webvid)


VIDEO_EXTS = {"mp4", "avi", "mkv", "webm", "mov", "3gp", "mpg", "mpeg", "m4v", "wmv", "flv"}


def _video_index(video_path):
    """file name and name-without-extension -> path, for every file under video_path (any depth/extension:
    LSMDC nests clips per movie, DiDeMo keeps extensions in its ids and some copies add '.mp4')."""
    if not video_path or not os.path.isdir(video_path):
        raise DataError(f"--video_path {video_path} is not a directory of videos")
    index, video_first = {}, lambda n: (n.rsplit(".", 1)[-1].lower() not in VIDEO_EXTS, n)
    for root, _, files in os.walk(video_path):
        for name in sorted(files, key=video_first):  # 'x.mp4' wins 'x' over a stray 'x.json'
            path = os.path.abspath(os.path.join(root, name))
            index.setdefault(name.rsplit(".", 1)[0], path)
            index[name] = path
    return index


def read_folder(video_path):
    """--data folder: every video file under video_path (any depth, an extension of VIDEO_EXTS), sorted by
    path, with no captions: something to search with --query, not to train or evaluate on."""
    if not video_path or not os.path.isdir(video_path):
        raise DataError(f"--video_path {video_path} is not a directory of videos")
    videos = sorted(os.path.abspath(os.path.join(root, name)) for root, _, files in os.walk(video_path)
                    for name in files if name.rsplit(".", 1)[-1].lower() in VIDEO_EXTS)
    if not videos:
        raise DataError(f"--video_path {video_path}: no video files in it (extensions "
                        f"{', '.join(sorted(VIDEO_EXTS))}, any subfolder)")
    return Split(name="folder", videos=videos, captions=[], caption_video=[])


def read_split(data, split, data_path=None, video_path=None, allow_missing=False):
    """Read a benchmark split into a Split; every listed video must exist (or allow_missing=True). Raises
    DataError for missing or malformed annotation files, test videos listed twice and missing videos; empty
    captions are dropped with a warning that gives their number."""
    if data not in DATASETS:
        raise DataError(f"unknown data set {data!r}; choose from {', '.join(DATASETS)}")
    if data == "folder":  # no annotations, no splits: the videos only (the query mode)
        return read_folder(video_path)
    origin = ORIGINS[data]
    if split not in ("train", "val", "test"):
        raise DataError(f"split must be train, val or test, not {split!r}")
    if data == "synthetic":  # synthetic.ensure_synthetic() makes it and returns its folder
        if not data_path:
            raise DataError("the synthetic set needs its directory: synthetic.ensure_synthetic() returns it")
        video_path = video_path or os.path.join(data_path, "videos")
    ids, pairs, caption_file, twin_of = READERS[data](data_path, split, origin)
    if not ids:  # a JSON object or list without entries
        raise bad_file(caption_file, f"lists no {split} videos", origin)
    # an empty caption is a query without words (tokens [SOT, EOT]): dropped, and said (none in the real files)
    empty = sum(not _SPECIAL.sub(" ", c).strip() for _, c in pairs)  # "<|endoftext|>" alone too: sanitize()
    if empty:
        pairs = [(v, c) for v, c in pairs if _SPECIAL.sub(" ", c).strip()]
        print(f"WARNING: {caption_file}: {empty} empty {split} caption{'s' if empty > 1 else ''} dropped; "
              f"{len(pairs)} left", file=sys.stderr, flush=True)
    ids = list(dict.fromkeys(ids))
    strays = sorted({t for t in (twin_of or {}).values() if t} - set(ids))
    if strays:
        raise bad_file(caption_file, f"names twins that are not {split} videos: {', '.join(strays[:5])}", origin)
    selves = [v for v, t in (twin_of or {}).items() if v == t]
    if selves:  # its pair would always tie: 50% whatever the model
        raise bad_file(caption_file, f"names {', '.join(selves[:5])} as {'its' if len(selves) == 1 else 'their'} own "
                       "twin: the twin column names another test clip, or is blank", origin)
    captioned = {v for v, _ in pairs}
    uncaptioned = [v for v in ids if v not in captioned]
    if uncaptioned:
        raise bad_file(caption_file, f"has no{' non-empty' if empty else ''} caption for {len(uncaptioned)} of the "
                       f"{len(ids)} {split} videos, e.g. {', '.join(uncaptioned[:5])}", origin)
    if data == "webvid":  # ids are relative paths; 2.5M files: stat each rather than walk the tree
        if not video_path or not os.path.isdir(video_path):
            raise DataError(f"--video_path {video_path} is not a directory of videos")
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
            raise DataError(msg + ", or pass --allow_missing to use the videos that are present.")
        print(f"WARNING: {msg}. --allow_missing: using the {len(present)} present videos only"
              + ("; test metrics are NOT comparable to published ones" if split != "train" else ""),
              file=sys.stderr, flush=True)
    if not present:
        raise DataError(f"{data} {split}: none of the {len(ids)} videos is under --video_path {video_path}")
    position = {v: i for i, v in enumerate(present)}
    kept = [(position[v], c) for v, c in pairs if v in position]
    # DiDeMo's annotations cover the first 30 s (longer videos were cut for annotation): CLIP4Clip reads 0-31 s
    return Split(name=f"{data}-{split}", videos=[index[v] for v in present], captions=[c for _, c in kept],
                 caption_video=[i for i, _ in kept], max_seconds=31.0 if data == "didemo" else None,
                 twin=[position.get(twin_of[v]) for v in present] if twin_of else None)  # None: its twin is missing


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


def read_clip(path, frames, train, sampling="segments", max_seconds=None):
    """Decode the frames sample_frames picks from the first max_seconds (None: all) -> (uint8 [t, H, W, 3] RGB in
    slot order, valid slots); raises VideoError."""
    return _decode(path, lambda n, rate: sample_frames(n, rate, frames, sampling, train), max_seconds)


def read_frames(path, frames, train, fps=None, max_seconds=None):
    """Decode T frames of nanoTVR's segments (or, with fps, every frame resampled to <= fps; fps=0: every frame)
    of the first max_seconds (None: all) -> uint8 [t, H, W, 3] RGB; raises VideoError."""
    def every(n, rate):
        step = max(rate / fps, 1.0) if fps else 1.0
        idx = sorted({int(round(k * step)) for k in range(int(n / step) + 1)} - {n})
        return idx, len(idx)
    return _decode(path, every if fps is not None else lambda n, rate: sample_frames(n, rate, frames, "segments",
                                                                                     train), max_seconds)[0]


def _decode(path, choose, max_seconds):
    """choose(n, fps) -> (frame indices in slot order, valid slots) -> (those frames, valid); raises VideoError."""
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise VideoError(f"cannot open video {path}")
    n, rate = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS) or 30.0
    if n <= 0:  # some containers store no frame count: count by grabbing
        n = 0
        while cap.grab():
            n += 1
        cap.release()
        cap = cv2.VideoCapture(path)
    n = min(n, int(max_seconds * rate)) if max_seconds else n
    out, wanted = [], []
    for attempt in range(2):
        idx, valid = choose(n, rate)
        wanted = sorted(set(idx))  # each frame decoded once, in file order
        out, known = _grab(cap, wanted) if wanted else ([], 0)
        cap.release()
        if out and len(out) == len(wanted):
            slot = {f: k for k, f in enumerate(wanted)}
            return np.stack(out)[[slot[i] for i in idx]], valid
        if known == 0 or attempt:
            break
        n, cap = known, cv2.VideoCapture(path)  # the header promised more frames than the stream holds
    raise VideoError(f"cannot decode video {path} ({len(out)} of {len(wanted)} frames)")


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

    def __init__(self, split, *, frames, words, size, train, mode="pairs", frame_cache=None, sampling="segments",
                 augment="none"):
        if mode not in ("pairs", "videos", "texts"):
            raise ValueError(f"mode must be pairs, videos or texts, not {mode!r}")
        self.split, self.frames, self.words, self.size, self.train, self.mode = split, frames, words, size, train, mode
        self.sampling, self.augment, self.cached, self.cache_fps = sampling, augment, [None] * len(split.videos), 30.0
        if frame_cache and mode != "texts":  # each video's cache file (or None), the rate its frames are at
            self.cached, self.cache_fps = check_frame_cache(frame_cache, split.videos, size, frames)
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
        if self.cached[v]:
            try:
                cached = np.load(self.cached[v], mmap_mode="r")  # [N, 3, S, S]
            except (OSError, ValueError) as e:
                raise VideoError(f"cannot read frame cache of {path}: {e}") from e
            idx, valid = sample_frames(len(cached), self.cache_fps, self.frames, self.sampling, self.train)
            x = torch.from_numpy(np.ascontiguousarray(cached[idx]))  # [t, 3, S', S'], already centre-cropped
        else:
            x, valid = read_clip(path, self.frames, self.train, self.sampling, self.split.max_seconds)
            x = torch.from_numpy(x).permute(0, 3, 1, 2)  # [t, 3, H, W]
        if self.train and self.augment == "crop_flip":
            x = crop_flip(x, self.size)
        elif x.shape[-2:] != (self.size, self.size):
            x = clip.resize_crop(x, self.size)  # [t, 3, S, S]
        video = torch.zeros(self.frames, 3, self.size, self.size, dtype=torch.uint8)  # pad: zeros, masked
        video[:len(x)] = x
        mask = torch.arange(self.frames) < valid
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
                raise VideoError(f"{e}. Evaluation needs every test video: re-download or re-encode it "
                                 "(`python frame_cache.py --check ...` lists every unreadable one)") from e
            return dict(video=video, video_mask=mask, video_index=i)
        n, j, rng = len(self.split.captions), i, torch.get_rng_state()
        for _ in range(n):  # training: replace an unreadable pair by the next caption whose video reads
            v = self.split.caption_video[j]
            if not self._bad[v]:
                try:  # each try draws as the first: the same frames whether a bad video was tried (and drew) or
                    torch.set_rng_state(rng)  # skipped as known bad (by this worker or another, before a resume)
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


def worker_init(_):
    cv2.setNumThreads(1)  # one decoding thread per worker: workers are the parallelism
    torch.set_num_threads(1)


def make_loader(dataset, *, batch_size, shuffle, num_workers, distributed=False, drop_last=False, seed=0):
    """DataLoader with pinned memory and persistent workers; a DistributedSampler under DDP (the caller
    calls loader.sampler.set_epoch(epoch))."""
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last) if distributed else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, drop_last=drop_last, worker_init_fn=worker_init,
                      generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# The training order (train.py deviation 5): batches, frames and dropout as a function of (seed, epoch,
# position) only, so that 1 or N ranks see the same batches and --resume is exact, mid-epoch too.

# Seeds of the training order: large primes, so that (seed, epoch, item) never collide
EPOCH_STRIDE, SEED_STRIDE, ITEM_STRIDE, RANK_STRIDE = 100_003, 1_000_003, 100_000_007, 1024


class EpochSampler(Sampler):
    """Yields (epoch, item) keys: rank `rank`'s slice of each global batch of this epoch's permutation."""

    def __init__(self, n, rank_batch, batches, rank, world, seed):
        self.n, self.b, self.batches, self.rank, self.world, self.seed = n, rank_batch, batches, rank, world, seed
        self.epoch = self.start = 0

    def set_epoch(self, epoch, start=0):  # start: micro-batches of this epoch already done
        self.epoch, self.start = epoch, start

    def __len__(self):
        return (self.batches - self.start) * self.b

    def __iter__(self):
        seed = (self.seed * EPOCH_STRIDE + self.epoch) % 2 ** 64  # torch's seeds are 64 bits
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        mine = perm[:self.batches * self.world * self.b].view(self.batches, self.world, self.b)[self.start:, self.rank]
        return iter([(self.epoch, int(i)) for i in mine.flatten()])


class SeededItems(Dataset):
    """Item (epoch, i) is read under a torch seed made of (seed, epoch, i): its random frames repeat exactly."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * SEED_STRIDE + key[0]) * ITEM_STRIDE + key[1]) % 2 ** 64)
            return self.dataset[key[1]]


def dropout_seed(seed, epoch, batch, rank):
    """The torch seed of micro-batch `batch` of `epoch` on `rank` (dropout, masks): the same in a resumed run."""
    return (((seed * SEED_STRIDE + epoch) * ITEM_STRIDE + batch) * RANK_STRIDE + rank) % 2 ** 64


def one_caption_per_video(split):
    """Each video once, with its first caption: SimVTP's training annotation maps every video to one caption (its
    JSON is not shipped, so which one is unknown; simvtp.py deviation 8)."""
    seen, first = set(), []
    for c, v in enumerate(split.caption_video):
        if v not in seen:
            seen.add(v)
            first.append(c)
    return replace(split, captions=[split.captions[c] for c in first],
                   caption_video=[split.caption_video[c] for c in first])


def train_loader(split, args, world, rank, pin_memory=False):
    """Global batches of args.batch_size cut from one permutation per epoch, rank r reads slice r of each in
    args.accum micro-batches; args.pairs "video": one caption per video. -> (dataset, loader, sampler, optimizer
    steps per epoch)."""
    split = one_caption_per_video(split) if args.pairs == "video" else split
    ds = VideoTextDataset(split, frames=args.frames, words=args.words, size=args.size, train=True,
                          frame_cache=args.frame_cache, sampling=args.sampling, augment=args.augment)
    steps_per_epoch, rank_batch = len(ds) // args.batch_size, args.batch_size // (world * args.accum)
    if steps_per_epoch == 0:
        raise DataError(f"{len(ds)} training pairs make no batch of {args.batch_size}: lower --batch_size")
    sampler = EpochSampler(len(ds), rank_batch, steps_per_epoch * args.accum, rank, world, args.seed)
    items = SeededItems(ds, args.seed)
    loader = DataLoader(items, batch_size=rank_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=pin_memory, persistent_workers=args.num_workers > 0, worker_init_fn=worker_init)
    if pin_memory and not args.frame_cache and rank == 0:  # a GPU decoding on the fly (items: seeded, no draw)
        start, n = time.perf_counter(), len([items[0, i] for i in range(min(3, len(ds)))])  # timed from start
        print(decode_wait((time.perf_counter() - start) / n, rank_batch * args.accum, args), flush=True)
    return ds, loader, sampler, steps_per_epoch


def decode_wait(seconds, clips, args):
    """A GPU run's start-up line without --frame_cache: a clip's decoding x clips a step / workers, and the fix."""
    paths = "".join(f" --{k} {getattr(args, k)}" for k in ("data_path", "video_path") if getattr(args, k))
    return (f"data: decoding on the fly, {1000 * seconds:.0f} ms a clip here x {clips} clips a step / "
            f"{max(args.num_workers, 1)} workers = {seconds * clips / max(args.num_workers, 1):.2f} s of data wait per "
            f"step unless the GPU's step is longer; a frame cache (docs/data.md) decodes once: python frame_cache.py "
            f"--cache CACHE --data {args.data}{paths}, then --frame_cache CACHE")
