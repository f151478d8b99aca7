"""data.py: video-text retrieval data for nanoTVR: benchmark readers, frame decoding, a synthetic set, loaders.

Readers turn each benchmark's annotation files (the files CLIP4Clip @ 508ffa3 and DGL @ 9139fd1 read; MSVD
also as UMP_TVR ships it; docs/data.md) into a `Split`: one path per video, the captions, and caption -> video. Multi-caption
test sets (MSVD, VATEX) are several captions pointing at one video; paragraph sets (DiDeMo, ActivityNet) join a
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

Bad data raises DataError (a ValueError) with a message naming the file, its line, key or column, what is
wrong and which download the file comes from: missing, empty, cut-off or malformed annotation files, listed
videos without captions, missing videos (unless allow_missing), and a test split that lists a video twice (an
error rather than a silent fix: it double-counts captions and shifts the metrics, and no real test file does
it). Repeated captions of one video are kept: MSVD's annotators wrote the same sentence 3,730 times in its test
split, and published results count them. Empty captions are dropped with a warning giving their number.
check_videos() opens every video of a split cheaply and names all unreadable ones at once. A video that fails
to decode in training is replaced by the next caption's (logged once, counted); in evaluation it is an error.

  python data.py --cache DIR --data msrvtt --data_path ANN --video_path VIDEOS   # optional frame cache
  python data.py --check --data msrvtt --data_path ANN --video_path VIDEOS --split all --out bad_videos.txt
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
from tqdm import tqdm

import clip

DATASETS = ("synthetic", "msrvtt", "msrvtt7k", "msvd", "vatex", "didemo", "activitynet", "lsmdc", "webvid", "folder")


@dataclass
class Split:
    name: str
    videos: list         # absolute video file paths, one per video
    captions: list       # caption strings
    caption_video: list  # caption i describes videos[caption_video[i]]
    max_seconds: float = None  # sample frames from the first max_seconds only (DiDeMo: 31, as CLIP4Clip)


# ----------------------------------------------------------------------------------------------------
# Readers: (annotation dir, split, origin) -> ordered video ids, (video id, caption) pairs, the captions' file.
# Every problem with an annotation file is a DataError that names the file (and line, key or column), says what
# is wrong and which download the file comes from (`origin`).

class DataError(ValueError):
    """A problem with the data that the user can fix (a missing, damaged or malformed file, unreadable videos);
    the message says which file, what is wrong and how to fix it. train.py prints it as one `error:` line."""


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


def _bad(path, what, origin):
    return DataError(f"{path} {what}: this file comes from {origin}")


def _need(root, name, origin):
    if not root:
        raise DataError(f"--data_path is not set: it is the folder holding {name}, from {origin}")
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise DataError(f"{name} not found in --data_path {root}: check --data_path; the file comes from {origin}")
    return path


def _read_list(path, origin):
    """A list file, one video id a line -> (ids, their line numbers); blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise _bad(path, f"is not UTF-8 text (byte {e.start})", origin) from e
    if not entries:
        raise _bad(path, "is empty (no video ids)", origin)
    return [v for _, v in entries], [n for n, _ in entries]


def _read_csv(path, columns, origin):
    """-> [(line number, row dict)]; every named column must exist and every row have the header's fields."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is no column
        reader = csv.DictReader(f, strict=True)  # strict: a quote left open (a file cut off) is an error
        try:
            header = reader.fieldnames
            if not header:
                raise _bad(path, "is empty (no header line)", origin)
            missing = [c for c in columns if c not in header]
            if missing:
                raise _bad(path, f"has no {missing[0]!r} column (columns: {', '.join(header)})", origin)
            rows = []
            for row in reader:
                n = len(header) + len(row.get(None, ())) - sum(v is None for v in row.values())
                if n != len(header):
                    raise _bad(path, f"line {reader.line_num} has {n} fields, the header has {len(header)}"
                               + (" (a comma in an unquoted caption?)" if n > len(header) else " (cut off?)"), origin)
                rows.append((reader.line_num, row))
        except csv.Error as e:
            raise _bad(path, f"is not valid CSV at line {reader.reader.line_num} ({e}; cut off?)", origin) from e
        except UnicodeDecodeError as e:
            raise _bad(path, f"is not UTF-8 text (byte {e.start})", origin) from e
    return rows


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise _RepeatedKey(sorted({k for k in keys if keys.count(k) > 1}))
    return dict(pairs)


def _load_json(path, origin, unique_keys=False):
    """json.load with errors that name the file; unique_keys: a key given twice is an error (json keeps the last)."""
    if os.path.getsize(path) == 0:
        raise _bad(path, "is empty (0 bytes)", origin)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_unique_keys if unique_keys else None)
    except UnicodeDecodeError as e:
        raise _bad(path, f"is not UTF-8 text (byte {e.start})", origin) from e
    except json.JSONDecodeError as e:
        cut = " where the file ends (cut off?)" if e.pos >= len(e.doc.rstrip()) else ""
        raise _bad(path, f"is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}{cut}", origin) from e
    except _RepeatedKey as e:
        keys = e.args[0]
        raise _bad(path, f"gives the key{'s' if len(keys) > 1 else ''} {', '.join(map(repr, keys[:5]))} twice "
                   "(a test video listed twice would count its captions twice)", origin) from None


class _Refused(Exception):
    """A pickle that names a callable outside _CaptionUnpickler.ALLOWED."""


class _CaptionUnpickler(pickle.Unpickler):
    """Containers and strings only: unpickling can run any code a file names, and a caption file needs none."""
    ALLOWED = {("builtins", "dict"), ("builtins", "list"), ("builtins", "str"), ("builtins", "tuple"),
               ("collections", "defaultdict"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path, origin):
    if os.path.getsize(path) == 0:
        raise _bad(path, "is empty (0 bytes)", origin)
    try:
        with open(path, "rb") as f:
            return _CaptionUnpickler(f).load()
    except _Refused as e:
        raise _bad(path, f"asks to load {e} when unpickled, which a caption file does not contain (refused: "
                   "unpickling can run code)", origin) from None
    except Exception as e:  # EOFError, UnpicklingError, ...: whatever a damaged pickle raises
        raise _bad(path, f"cannot be unpickled ({type(e).__name__}: {e}; cut off or damaged?)", origin) from e


def _get(item, key, path, where, origin):
    """item[key] for a JSON object, or a DataError naming the file, the item and the keys it has."""
    if not isinstance(item, dict):
        raise _bad(path, f"has {where} = {type(item).__name__}, expected an object with the key {key!r}", origin)
    if key not in item:
        keys = ", ".join(map(str, list(item)[:8])) + (", ..." if len(item) > 8 else "")
        raise _bad(path, f"has no {key!r} key in {where} (keys: {keys})", origin)
    return item[key]


def _text(caption, path, where, origin):
    """A caption: a string, or a list of words (CLIP4Clip's MSVD pickle) joined by spaces."""
    if isinstance(caption, (list, tuple)) and all(isinstance(w, str) for w in caption):
        return " ".join(caption)
    if not isinstance(caption, str):
        raise _bad(path, f"has {where} = {type(caption).__name__}, expected a caption string", origin)
    return caption


def _captions_of(table, v, path, origin):
    """{video id: [captions]} -> the captions of v ([] if it has none: read_split reports that)."""
    caps = table.get(v, [])
    if not isinstance(caps, (list, tuple)):
        raise _bad(path, f"has [{v!r}] = {type(caps).__name__}, expected a list of captions", origin)
    return [_text(c, path, f"[{v!r}][{k}]", origin) for k, c in enumerate(caps)]


def _check_unique(ids, lines, path, origin):
    """Test splits list each video once: a second listing counts its captions twice and shifts the metrics."""
    where = defaultdict(list)
    for v, n in zip(ids, lines):
        where[v].append(n)
    repeated = {v: ns for v, ns in where.items() if len(ns) > 1}
    if repeated:
        shown = "; ".join(f"{v} at " + ", ".join(n if isinstance(n, str) else f"line {n}" for n in ns)
                          for v, ns in list(repeated.items())[:5])
        raise _bad(path, f"lists {len(repeated)} test video{'s' if len(repeated) > 1 else ''} more than once "
                   f"({shown}{'; ...' if len(repeated) > 5 else ''}): a video listed twice counts its captions "
                   "twice and shifts the metrics; delete the repeated lines", origin)


def _read_msrvtt(root, split, origin, train_csv="9k"):
    if split in ("test", "still"):  # 1k-A: key,vid_key,video_id,sentence; one caption per video
        path = _need(root, "MSRVTT_JSFUSION_test.csv" if split == "test" else "synthetic_still.csv", origin)
        rows = _read_csv(path, ("video_id", "sentence"), origin)
        if split == "test":
            _check_unique([r["video_id"] for _, r in rows], [n for n, _ in rows], path, origin)
        return [r["video_id"] for _, r in rows], [(r["video_id"], r["sentence"]) for _, r in rows], path
    if split != "train":
        raise DataError(f"MSR-VTT has splits train/test, not {split!r}")
    rows = _read_csv(_need(root, f"MSRVTT_train.{train_csv}.csv", origin), ("video_id",), origin)
    ids = [r["video_id"] for _, r in rows]
    path = _need(root, "MSRVTT_data.json", origin)
    if os.path.getsize(path) == 0:  # UMP_TVR's repository holds a 0-byte placeholder of this name
        raise _bad(path, "is empty (0 bytes; UMP_TVR's repository holds an empty placeholder of this name)", origin)
    sentences = _get(_load_json(path, origin), "sentences", path, "the top-level object", origin)
    by_video = defaultdict(list)
    for k, s in enumerate(sentences):
        where = f"sentences[{k}]"
        by_video[_get(s, "video_id", path, where, origin)].append(
            _text(_get(s, "caption", path, where, origin), path, where + "['caption']", origin))
    # every caption of every train video (CLIP4Clip --expand_msrvtt_sentences, DGL): 9k -> 180,000 pairs
    return ids, [(v, c) for v in ids for c in by_video[v]], path


def _read_msvd(root, split, origin):
    """{split}_list.txt beside CLIP4Clip's raw-captions.pkl (id -> word lists) or UMP_TVR's captions_msvd.json
    (id -> caption strings, the same captions joined by spaces); the pickle is read when both are there."""
    path = _need(root, f"{split}_list.txt", origin)
    ids, lines = _read_list(path, origin)
    if split == "test":
        _check_unique(ids, lines, path, origin)
    pkl, js = os.path.join(root, "raw-captions.pkl"), os.path.join(root, "captions_msvd.json")
    if os.path.isfile(pkl):
        path, table = pkl, _load_pickle(pkl, origin)
    elif os.path.isfile(js):
        path, table = js, _load_json(js, origin, unique_keys=split == "test")
    else:
        raise DataError(f"neither raw-captions.pkl nor captions_msvd.json is in --data_path {root}: the MSVD "
                        f"captions come from {origin}")
    if not isinstance(table, dict):
        raise _bad(path, f"holds a {type(table).__name__}, expected a dict of video id -> captions", origin)
    return ids, [(v, c) for v in ids for c in _captions_of(table, v, path, origin)], path


def _read_vatex(root, split, origin):
    path = _need(root, f"{'train' if split == 'train' else 'test'}_list.txt", origin)
    ids, lines = _read_list(path, origin)
    if split == "test":
        _check_unique(ids, lines, path, origin)
    path = _need(root, "ref_captions.json", origin)
    table = _load_json(path, origin, unique_keys=split == "test")  # id -> list of English captions
    if not isinstance(table, dict):
        raise _bad(path, f"holds a {type(table).__name__}, expected an object of video id -> captions", origin)
    return ids, [(v, c) for v in ids for c in _captions_of(table, v, path, origin)], path


def _read_didemo(root, split, origin):
    path = _need(root, f"{split}_list.txt", origin)
    ids, lines = _read_list(path, origin)
    if split == "test":
        _check_unique(ids, lines, path, origin)
    path = _need(root, f"{split}_data.json", origin)
    items = _load_json(path, origin)  # items {video, description, times: 5-s chunk indices per annotator}
    if not isinstance(items, list):
        raise _bad(path, f"holds a {type(items).__name__}, expected a list of {{video, description}} items", origin)
    sentences = defaultdict(list)
    for k, item in enumerate(items):
        video, text = (_get(item, key, path, f"item {k}", origin) for key in ("video", "description"))
        sentences[video].append(_text(text, path, f"item {k}['description']", origin).strip())
    ids = [v for v in ids if v in sentences]  # CLIP4Clip keeps listed videos that have descriptions
    return ids, [(v, " ".join(sentences[v])) for v in ids], path  # paragraph <-> whole video


def _read_activitynet(root, split, origin):
    path = _need(root, "train.json" if split == "train" else "val_1.json", origin)  # val_1: every paper's test set
    table = _load_json(path, origin, unique_keys=split == "test")  # "v_<id>" -> {duration, timestamps, sentences}
    if not isinstance(table, dict):
        raise _bad(path, f"holds a {type(table).__name__}, expected an object of video id -> annotations", origin)
    ids = [k[2:] if k.startswith("v_") else k for k in table]  # the file is <id>.mp4
    if split == "test":  # 'v_x' and 'x' are one video
        _check_unique(ids, [f"key {k!r}" for k in table], path, origin)
    pairs = []
    for v, (key, d) in zip(ids, table.items()):
        sentences = _get(d, "sentences", path, f"[{key!r}]", origin)
        if not isinstance(sentences, list):
            raise _bad(path, f"has [{key!r}]['sentences'] = {type(sentences).__name__}, expected a list", origin)
        pairs.append((v, " ".join(_text(s, path, f"[{key!r}]['sentences']", origin).strip() for s in sentences)))
    return ids, pairs, path


def _read_lsmdc(root, split, origin):
    name = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
            "test": "LSMDC16_challenge_1000_publictect.csv"}[split]
    path, pairs, lines = _need(root, name, origin), [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):  # clip_id \t 4 timestamps \t sentence; ids repeat in training
            parts = line.rstrip("\r\n").split("\t")
            if line.strip() and len(parts) < 6:
                raise _bad(path, f"line {n} has {len(parts)} tab-separated fields, expected 6 (clip id, 4 "
                           "timestamps, sentence)", origin)
            if line.strip():
                pairs.append((parts[0], "\t".join(parts[5:])))
                lines.append(n)
    if not pairs:
        raise _bad(path, "is empty", origin)
    if split == "test":  # 1,000 clips, one sentence each
        _check_unique([v for v, _ in pairs], lines, path, origin)
    return list(dict.fromkeys(v for v, _ in pairs)), pairs, path


def _read_webvid(root, split, origin):
    """WebVid-2M (SimVTP pretraining): results_2M_{train,val}.csv, columns videoid, contentUrl, duration,
    page_dir, name (the caption); videos at <video_path>/<page_dir>/<videoid>.mp4 (Frozen-in-Time's layout)."""
    path = _need(root, "results_2M_train.csv" if split == "train" else "results_2M_val.csv", origin)
    rows = _read_csv(path, ("videoid", "page_dir", "name"), origin)
    pairs = [(f"{r['page_dir']}/{r['videoid']}.mp4", r["name"]) for _, r in rows]
    if split == "test":
        _check_unique([v for v, _ in pairs], [n for n, _ in rows], path, origin)
    return [v for v, _ in pairs], pairs, path


READERS = dict(msrvtt=_read_msrvtt, msrvtt7k=lambda r, s, o: _read_msrvtt(r, s, o, "7k"), msvd=_read_msvd,
               vatex=_read_vatex, didemo=_read_didemo, activitynet=_read_activitynet, lsmdc=_read_lsmdc,
               webvid=_read_webvid)


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
    if data == "synthetic":  # MSR-VTT's layout plus a "still" split; synthetic.ensure_synthetic() makes it
        if not data_path:
            raise DataError("the synthetic set needs its directory: synthetic.ensure_synthetic() returns it")
        video_path = video_path or os.path.join(data_path, "videos")
        ids, pairs, caption_file = _read_msrvtt(data_path, split, origin)
    else:
        if split not in ("train", "val", "test"):
            raise DataError(f"split must be train, val or test ('still' only for synthetic), not {split!r}")
        ids, pairs, caption_file = READERS[data](data_path, split, origin)
    # an empty caption is a query without words (tokens [SOT, EOT]): dropped, and said (none in the real files)
    empty = sum(not c.strip() for _, c in pairs)
    if empty:
        pairs = [(v, c) for v, c in pairs if c.strip()]
        print(f"WARNING: {caption_file}: {empty} empty {split} caption{'s' if empty > 1 else ''} dropped; "
              f"{len(pairs)} left", file=sys.stderr, flush=True)
    ids = list(dict.fromkeys(ids))
    captioned = {v for v, _ in pairs}
    uncaptioned = [v for v in ids if v not in captioned]
    if uncaptioned:
        raise _bad(caption_file, f"has no{' non-empty' if empty else ''} caption for {len(uncaptioned)} of the "
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
# Start-up check of the videos: open each one as cheaply as possible (its header and first frame, or its frame
# cache's header) so that unreadable files are all named before training, not one per crashed evaluation.

def probe_video(path, frame_cache=None):
    """None if the video (or, when there is one, its frame-cache file) would load; else what is wrong with it.
    Cheap: a video is opened and its first frame decoded (a file whose header promises more frames than it
    holds still loads: read_frames keeps the frames there are); a cache file's header is read (memory-mapped)."""
    cached = cache_file(frame_cache, path) if frame_cache else None
    if cached and os.path.isfile(cached):
        try:
            x = np.load(cached, mmap_mode="r")
        except Exception as e:  # ValueError (cut off, not .npy), EOFError (empty), OSError
            return f"has a damaged frame cache {cached} ({type(e).__name__}: {e}): delete it and build it again"
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
            return f"has a frame cache {cached} holding {x.dtype} {list(x.shape)}, not uint8 [frames, 3, size, size]"
        return None
    try:
        if os.path.getsize(path) == 0:
            return "is empty (0 bytes)"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            return "does not open as a video (cut off, damaged, or not a video)"
        ok, frame = cap.read()  # some containers give no frame count (read_frames counts those): not checked
        if not ok or frame is None:
            return "opens, but its first frame does not decode"
    finally:
        cap.release()
    return None


def _probe_job(job):
    why = probe_video(*job)
    return (job[0], why) if why else None


def find_unreadable(videos, frame_cache=None, workers=0):
    """-> [(video path, what is wrong)] for every video in `videos` that would not load (probe_video), in order;
    workers > 0 spreads the work over that many processes."""
    jobs = [(v, frame_cache) for v in videos]
    if workers <= 0:
        return [r for r in map(_probe_job, jobs) if r]
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(0,)) as pool:
        return [r for r in pool.imap(_probe_job, jobs, chunksize=16) if r]


def write_video_list(path, bad):
    """The list of bad videos, one `path<TAB>what is wrong` a line, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(f"{v}\t{why}\n" for v, why in bad)
    os.replace(tmp, path)


def check_videos(split, frame_cache=None, workers=0, report=None, show=5):
    """Open every video of `split` cheaply (probe_video) and raise one DataError naming all unreadable ones: their
    number, the first `show` with what is wrong, and `report`, where the full list is written (only when some
    are bad). Run it on the test split before training: an unreadable test video fails every evaluation."""
    bad = find_unreadable(split.videos, frame_cache, workers)
    if not bad:
        return
    if report:
        write_video_list(report, bad)
    shown = "; ".join(f"{v} {why}" for v, why in bad[:show])
    rest = (f" (all {len(bad)} listed in {report})" if report else
            f" (and {len(bad) - show} more: `python data.py --check --out bad_videos.txt ...` lists them all)"
            if len(bad) > show else "")
    raise DataError(f"{len(bad)} of {len(split.videos)} {split.name} videos cannot be read: {shown}{rest}. "
                    "Re-download or re-encode them, or move them out of --video_path and pass --allow_missing "
                    "to use the others")


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
                    raise DataError(msg + ", or drop frame_cache.")
                print(f"WARNING: {msg}; decoding those from the video files.", file=sys.stderr, flush=True)
            check_frame_cache(frame_cache, split.videos, size, frames)
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
                raise VideoError(f"{e}. Evaluation needs every test video: re-download or re-encode it "
                                 "(`python data.py --check ...` lists every unreadable one)") from e
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


MANIFEST = "manifest.json"  # in the cache folder: the settings it was made with, and frames per clip


def read_manifest(cache_dir):
    """-> {"size", "fps", "max_seconds", "frames": {file name: cached frames}}, or None (a cache made without one)."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def build_frame_cache(videos, cache_dir, size=224, fps=3.0, workers=1, max_seconds=None):
    """Decode every video once into cache_dir/<file name>.npy, and write cache_dir/manifest.json (the settings,
    the frames of each clip); returns the error messages of unreadable ones. Refuses to add to a cache made
    with other settings."""
    settings = dict(size=size, fps=fps, max_seconds=max_seconds)
    old = read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
    if old and {k: old.get(k) for k in settings} != settings:
        raise DataError(f"frame cache {cache_dir} was made with {({k: old.get(k) for k in settings})}, not "
                        f"{settings}: use another folder, or delete this one")
    os.makedirs(cache_dir, exist_ok=True)
    jobs = [(v, cache_file(cache_dir, v), size, fps, max_seconds) for v in videos]
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(0,)) as pool:
        results = pool.imap_unordered(_cache_one, jobs, chunksize=8)
        errors = [e for e in tqdm(results, total=len(jobs), desc="frame cache", unit="clip", dynamic_ncols=True,
                                  disable=not sys.stderr.isatty()) if e]
    for e in errors:
        print("WARNING:", e, file=sys.stderr)
    frames = dict((old or {}).get("frames", {}))
    for v in videos:  # the .npy header holds the shape: no frame is read here
        if os.path.isfile(cache_file(cache_dir, v)):
            frames[os.path.basename(v)] = int(np.load(cache_file(cache_dir, v), mmap_mode="r").shape[0])
    tmp = os.path.join(cache_dir, f"{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(dict(settings, frames=frames), f)
    os.replace(tmp, os.path.join(cache_dir, MANIFEST))
    return errors


_WARNED = set()  # frame-cache warnings already printed by this process (a dataset is made every evaluation)


def check_frame_cache(cache_dir, videos, size, frames):
    """Refuse a cache of smaller frames than the run's (they would be upscaled); warn about larger ones (every
    load resizes), clips with fewer cached frames than the run samples (padded, where decoding would give all
    `frames`), and a cache without a manifest (nothing can be checked)."""
    manifest, warnings = read_manifest(cache_dir), []
    if manifest is None:
        warnings.append(f"frame cache {cache_dir} has no {MANIFEST} (made by an older data.py?): its frame "
                        f"size and rate are unchecked; rebuild it with python data.py --cache to check them")
    else:
        if manifest["size"] < size:
            raise DataError(f"frame cache {cache_dir} holds {manifest['size']} px frames, this run uses {size} px: "
                            f"they would be upscaled. Build one at this size (python data.py --cache NEW_DIR "
                            f"--size {size} ...) or pass --size {manifest['size']}")
        if manifest["size"] > size:
            warnings.append(f"frame cache {cache_dir} holds {manifest['size']} px frames, this run uses {size} px: "
                            f"every load resizes them (slower); a cache made with --size {size} is read as is")
        counts = manifest.get("frames", {})
        short = [v for v in videos if counts.get(os.path.basename(v), frames) < frames]
        if short:
            warnings.append(f"{len(short)} of {len(videos)} clips in frame cache {cache_dir} hold fewer than {frames} "
                            f"frames (made at --fps {manifest['fps']}; e.g. {os.path.basename(short[0])}: "
                            f"{counts[os.path.basename(short[0])]}): they are padded and masked where decoding "
                            f"would give {frames}. Rebuild with a higher --fps (0: every frame) into an empty folder")
    for w in warnings:
        if w not in _WARNED:
            _WARNED.add(w)
            print("WARNING:", w, file=sys.stderr, flush=True)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Build the frame cache of a data set, or (--check) find its unreadable "
                                "videos. Exit status: 0 done, 1 --check found unreadable videos, 2 bad input.")
    p.add_argument("--cache", help="frame cache folder: built here (pass it to train.py as --frame_cache); with "
                   "--check, the cache files found there are checked instead of their videos, as train.py reads them")
    p.add_argument("--check", action="store_true", help="open every video of --split (header and first frame) and "
                   "write the unreadable ones to --out")
    p.add_argument("--out", default="bad_videos.txt", help="--check: the list of unreadable videos, one "
                   "'path<TAB>what is wrong' a line (written even when empty)")
    p.add_argument("--split", default="all", choices=("train", "test", "all"))
    p.add_argument("--data", default="synthetic", choices=DATASETS)
    p.add_argument("--data_path")
    p.add_argument("--video_path")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--fps", type=float, default=3.0, help="<= this many frames per second; 0: all frames")
    p.add_argument("--workers", type=int, default=1, help="processes decoding or checking videos")
    p.add_argument("--allow_missing", action="store_true")
    a = p.parse_args()
    if not (a.check or a.cache):
        p.error("pass --cache DIR to build the frame cache, or --check to find unreadable videos")
    try:
        if a.data == "synthetic":
            import synthetic  # imports data.py: here, once data.py is loaded
            a.data_path = synthetic.ensure_synthetic(a.data_path)
        names = ("train", "test") if a.split == "all" else (a.split,)
        splits = [read_split(a.data, s, a.data_path, a.video_path, a.allow_missing) for s in names]
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


# ----------------------------------------------------------------------------------------------------
# The training order (train.py deviation 5): batches, frames and dropout as a function of (seed, epoch,
# position) only, so that 1 or N ranks see the same batches and --resume is exact, mid-epoch too.

from torch.utils.data import Sampler  # noqa: E402 (this block is appended as one piece)

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
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + self.epoch))
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
            torch.manual_seed((self.seed * SEED_STRIDE + key[0]) * ITEM_STRIDE + key[1])
            return self.dataset[key[1]]


def dropout_seed(seed, epoch, batch, rank):
    """The torch seed of micro-batch `batch` of `epoch` on `rank` (dropout, masks): the same in a resumed run."""
    return ((seed * SEED_STRIDE + epoch) * ITEM_STRIDE + batch) * RANK_STRIDE + rank


def train_loader(split, args, world, rank, pin_memory=False):
    """Global batches of args.batch_size cut from one permutation per epoch, rank r reads slice r of each in
    args.accum micro-batches. -> (dataset, loader, sampler, optimizer steps per epoch)."""
    ds = VideoTextDataset(split, frames=args.frames, words=args.words, size=args.size, train=True,
                          frame_cache=args.frame_cache)
    steps_per_epoch, rank_batch = len(ds) // args.batch_size, args.batch_size // (world * args.accum)
    if steps_per_epoch == 0:
        raise DataError(f"{len(ds)} training pairs make no batch of {args.batch_size}: lower --batch_size")
    sampler = EpochSampler(len(ds), rank_batch, steps_per_epoch * args.accum, rank, world, args.seed)
    loader = DataLoader(SeededItems(ds, args.seed), batch_size=rank_batch, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=pin_memory,
                        persistent_workers=args.num_workers > 0, worker_init_fn=_worker_init)
    return ds, loader, sampler, steps_per_epoch
