"""data_checks.py: what can be wrong with a data set's files, found early and said plainly. data.py reads
through it; nothing here knows a benchmark.

DataError is the one error a user fixes: its message names the file (and its line, key or column), says what
is wrong and where the file comes from. Annotation files (id lists, CSV, JSON, caption pickles) are loaded here
so that a missing, empty, cut-off or malformed one raises it, and a test split that lists a video twice too.
Video files are probed cheaply (header and first frame; a frame-cache file's header) so that check_videos()
names every unreadable one at once, before training, rather than one per crashed evaluation. A frame cache
(frame_cache.py builds it: CACHE/<video file name>.<key>.npy plus CACHE/manifest.json) is checked against the
run that reads it: refused when its manifest is missing or damaged, its entries stale or its frames smaller
than the run's, warned about when it cannot serve as is.
"""
import codecs
import csv
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import sys
from collections import defaultdict

import cv2
import numpy as np

import files


class DataError(ValueError):
    """A problem with the data that the user can fix (a missing, damaged or malformed file, unreadable videos);
    the message says which file, what is wrong and how to fix it. train.py prints it as one `error:` line."""


# ----------------------------------------------------------------------------------------------------
# Annotation files: each loader takes `origin`, the download the file comes from, for its messages.

def bad_file(path, what, origin):
    return DataError(f"{path} {what}: this file comes from {origin}")


def need_file(root, name, origin):
    if not root:
        raise DataError(f"--data_path is not set: it is the folder holding {name}, from {origin}")
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise DataError(f"{name} not found in --data_path {root}: check --data_path; the file comes from {origin}")
    return path


def text_encoding(path):
    """How an annotation file is decoded: UTF-8, or what its byte-order mark says (a spreadsheet's UTF-8 mark is
    dropped, Windows' UTF-16 is read as such). Windows line ends are read as line ends by every reader."""
    with open(path, "rb") as f:
        head = f.read(2)
    return "utf-16" if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"


def not_text(path, origin):
    """The DataError of a file that does not decode (text_encoding): where its first bad byte is, and the fix."""
    with open(path, "rb") as f:
        raw = f.read()
    encoding = text_encoding(path)
    try:
        raw.decode(encoding)
        return bad_file(path, "changed while it was read", origin)
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.end]
        line = raw.count(b"\n", 0, e.start) + 1
        guess = f", {bad.decode('cp1252', 'replace')!r} in Latin-1/cp1252" if encoding != "utf-16" else ""
        return bad_file(path, f"is not {'UTF-16' if encoding == 'utf-16' else 'UTF-8'} text: line {line}, byte offset {e.start} is "
                        f"{bad[:4].hex(' ')}{guess}. Re-save it as UTF-8 (e.g. iconv -f cp1252 -t utf-8 FILE > "
                        f"FILE.utf8, then use FILE.utf8 under the original name)", origin)


def read_list(path, origin):
    """A list file, one video id a line -> (ids, their line numbers); blank lines are skipped."""
    try:
        with open(path, encoding=text_encoding(path)) as f:
            entries = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeError:
        raise not_text(path, origin) from None
    if not entries:
        raise bad_file(path, "is empty (no video ids)", origin)
    return [v for _, v in entries], [n for n, _ in entries]


def read_csv(path, columns, origin):
    """-> [(line number, row dict)]; every named column must exist and every row have the header's fields."""
    with open(path, newline="", encoding=text_encoding(path)) as f:  # a byte-order mark is no column
        reader = csv.DictReader(f, strict=True)  # strict: a quote left open (a file cut off) is an error
        try:
            header = reader.fieldnames
            if not header:
                raise bad_file(path, "is empty (no header line)", origin)
            missing = [c for c in columns if c not in header]
            if missing:
                raise bad_file(path, f"has no {missing[0]!r} column (columns: {', '.join(header)})", origin)
            rows = []
            for row in reader:
                n = len(header) + len(row.get(None, ())) - sum(v is None for v in row.values())
                if n != len(header):
                    raise bad_file(path, f"line {reader.line_num} has {n} fields, the header has {len(header)}" + (
                        " (a comma in an unquoted caption?)" if n > len(header) else " (cut off?)"), origin)
                rows.append((reader.line_num, row))
        except csv.Error as e:
            raise bad_file(path, f"is not valid CSV at line {reader.reader.line_num} ({e}; cut off?)", origin) from e
        except UnicodeError:
            raise not_text(path, origin) from None
    if not rows:
        raise bad_file(path, "has a header line but no rows (cut off?)", origin)
    return rows


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise _RepeatedKey(sorted({k for k in keys if keys.count(k) > 1}))
    return dict(pairs)


def load_json(path, origin, unique_keys=False):
    """json.load with errors that name the file; unique_keys: a key given twice is an error (json keeps the last)."""
    if os.path.getsize(path) == 0:
        raise bad_file(path, "is empty (0 bytes)", origin)
    try:
        with open(path, encoding=text_encoding(path)) as f:
            return json.load(f, object_pairs_hook=_unique_keys if unique_keys else None)
    except UnicodeError:
        raise not_text(path, origin) from None
    except json.JSONDecodeError as e:
        cut = " where the file ends (cut off?)" if e.pos >= len(e.doc.rstrip()) else ""
        raise bad_file(path, f"is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}{cut}", origin) from e
    except _RepeatedKey as e:
        keys = e.args[0]
        raise bad_file(path, f"gives the key{'s' if len(keys) > 1 else ''} {', '.join(map(repr, keys[:5]))} twice "
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


def load_pickle(path, origin):
    if os.path.getsize(path) == 0:
        raise bad_file(path, "is empty (0 bytes)", origin)
    try:
        with open(path, "rb") as f:
            return _CaptionUnpickler(f).load()
    except _Refused as e:
        raise bad_file(path, f"asks to load {e} when unpickled, which a caption file does not contain (refused: "
                       "unpickling can run code)", origin) from None
    except Exception as e:  # EOFError, UnpicklingError, ...: whatever a damaged pickle raises
        raise bad_file(path, f"cannot be unpickled ({type(e).__name__}: {e}; cut off or damaged?)", origin) from e


def get_key(item, key, path, where, origin):
    """item[key] for a JSON object, or a DataError naming the file, the item and the keys it has."""
    if not isinstance(item, dict):
        raise bad_file(path, f"has {where} = {type(item).__name__}, expected an object with the key {key!r}", origin)
    if key not in item:
        keys = ", ".join(map(str, list(item)[:8])) + (", ..." if len(item) > 8 else "")
        raise bad_file(path, f"has no {key!r} key in {where} (keys: {keys})", origin)
    return item[key]


def caption_text(caption, path, where, origin):
    """A caption: a string, or a list of words (CLIP4Clip's MSVD pickle) joined by spaces."""
    if isinstance(caption, (list, tuple)) and all(isinstance(w, str) for w in caption):
        return " ".join(caption)
    if not isinstance(caption, str):
        raise bad_file(path, f"has {where} = {type(caption).__name__}, expected a caption string", origin)
    return caption


def captions_of(table, v, path, origin):
    """{video id: [captions]} -> the captions of v ([] if it has none: read_split reports that)."""
    caps = table.get(v, [])
    if not isinstance(caps, (list, tuple)):
        raise bad_file(path, f"has [{v!r}] = {type(caps).__name__}, expected a list of captions", origin)
    return [caption_text(c, path, f"[{v!r}][{k}]", origin) for k, c in enumerate(caps)]


def check_unique(ids, lines, path, origin):
    """Test splits list each video once: a second listing counts its captions twice and shifts the metrics."""
    where = defaultdict(list)
    for v, n in zip(ids, lines):
        where[v].append(n)
    repeated = {v: ns for v, ns in where.items() if len(ns) > 1}
    if repeated:
        shown = "; ".join(f"{v} at " + ", ".join(n if isinstance(n, str) else f"line {n}" for n in ns)
                          for v, ns in list(repeated.items())[:5])
        raise bad_file(path, f"lists {len(repeated)} test video{'s' if len(repeated) > 1 else ''} more than once "
                       f"({shown}{'; ...' if len(repeated) > 5 else ''}): a video listed twice counts its captions "
                       "twice and shifts the metrics; delete the repeated lines", origin)


# ----------------------------------------------------------------------------------------------------
# The frame cache as a run reads it: its layout, its manifest, whether it fits the run. An entry's file name
# holds a key of its video's identity (real path, size, modification time) and of the settings its frames were
# made at, so that two data sets' video0.mp4, a re-downloaded video and another --size never share one.

MANIFEST = "manifest.json"  # in the cache folder: its settings, whether a build is unfinished, and its clips
SETTINGS = ("size", "fps", "max_seconds")  # what changes the stored frames


def cache_settings(size, fps, max_seconds):
    return dict(size=int(size), fps=float(fps), max_seconds=None if max_seconds is None else float(max_seconds))


def describe(settings):
    """The settings as frame_cache.py's flags: '--size 64 --fps 0' (+ the data set's time limit)."""
    s = f"--size {settings['size']} --fps {settings['fps']:g}"
    return s + (f" (first {settings['max_seconds']:g} s)" if settings["max_seconds"] is not None else "")


def cache_entry(video, settings):
    """-> (the video's real path, the file name of its frames at `settings`), or None if it cannot be stat'ed."""
    try:
        path = os.path.realpath(video)
        st = os.stat(path)
    except OSError:
        return None
    key = json.dumps([path, st.st_size, st.st_mtime_ns, cache_settings(*(settings[k] for k in SETTINGS))])
    return path, f"{os.path.basename(path)}.{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


def lookup(cache_dir, manifest, video):
    """-> (the cache file of `video` or None, whether its entry was made from an earlier version of the file)."""
    key = cache_entry(video, manifest)
    entry = manifest["clips"].get(key[0] if key else os.path.realpath(video))
    if entry and key and entry["file"] == key[1]:
        return os.path.join(cache_dir, key[1]), False
    return None, entry is not None


def read_manifest(cache_dir):
    """-> {"size", "fps", "max_seconds", "building": a build has not finished, "clips": {video real path: {"file",
    "frames"}}}, or None if there is none; DataError if it is damaged or from the format keyed by name only."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    fix = f"delete {cache_dir} and build it again (python frame_cache.py --cache {cache_dir} ...) or use another one"
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"frame cache manifest {path} is damaged ({type(e).__name__}: {e}): {fix}") from e
    if isinstance(m, dict) and "frames" in m and "clips" not in m:
        raise DataError(f"frame cache {cache_dir} was made by a frame_cache.py that keyed clips by file name only "
                        f"(two data sets or a changed video could share one): {fix}")
    ok = (isinstance(m, dict) and type(m.get("size")) is int and isinstance(m.get("fps"), (int, float))
          and isinstance(m.get("max_seconds"), (int, float, type(None))) and isinstance(m.get("building"), bool)
          and isinstance(m.get("clips"), dict) and all(isinstance(c, dict) and isinstance(c.get("file"), str)
                                                       and type(c.get("frames")) is int for c in m["clips"].values()))
    if not ok:
        raise DataError(f"frame cache manifest {path} is damaged (not the settings and clips frame_cache.py "
                        f"writes): {fix}")
    return m


def cache_files(cache_dir, videos):
    """-> (manifest, the cache file of each video or None, the videos whose entry was made from an earlier
    version of their file). Refuses a folder without a manifest and one that holds none of `videos`; warns
    about the videos it lacks (decoded instead)."""
    manifest = read_manifest(cache_dir)
    build = f"python frame_cache.py --cache {cache_dir} {{}}--data ... --data_path ... --video_path ..."
    if manifest is None:
        raise DataError(f"{os.path.join(cache_dir, MANIFEST)} not found: {cache_dir} is not a frame cache "
                        f"frame_cache.py built. Build it with `{build.format('')}`, or drop --frame_cache")
    found = [lookup(cache_dir, manifest, v) for v in videos]
    files, stale = [f for f, _ in found], [v for v, (_, old) in zip(videos, found) if old]
    missing = [v for v, (f, old) in zip(videos, found) if f is None and not old]
    if missing:
        why = " (its last build did not finish)" if manifest["building"] else ""
        msg = (f"{len(missing)} of {len(videos)} videos are not in frame cache {cache_dir}{why}, e.g. {missing[0]}. "
               f"Build or finish it with `{build.format(describe(manifest) + ' ')}`")
        if len(missing) == len(videos):
            raise DataError(msg + ", or drop --frame_cache")
        _warn(f"{msg}; decoding those from the video files.")
    return manifest, files, stale


def stale_problem(cache_dir, manifest):
    """What is wrong with a video changed since it was cached, and the fix."""
    return (f"changed (size or time) since frame cache {cache_dir} was built from it: update the cache with "
            f"`python frame_cache.py --cache {cache_dir} {describe(manifest)} --data ...` (it decodes the changed "
            f"videos only)")


_WARNED = set()  # frame-cache warnings already printed by this process (a dataset is made every evaluation)


def _warn(w):
    if w not in _WARNED:
        _WARNED.add(w)
        print("WARNING:", w, file=sys.stderr, flush=True)


def check_frame_cache(cache_dir, videos, size, frames):
    """-> (the cache file of each video or None, the frame rate of the cached frames). Refuse a cache without a
    manifest or with a damaged one, one that holds none of `videos`, stale entries (the video changed since),
    and smaller frames than the run's (they would be upscaled); warn about videos it lacks (decoded instead),
    larger frames (every load resizes), and clips with fewer cached frames than the run samples (padded, where
    decoding would give all `frames`)."""
    manifest, files, stale = cache_files(cache_dir, videos)
    if stale:
        raise DataError(f"{len(stale)} of {len(videos)} videos, e.g. {stale[0]}, {stale_problem(cache_dir, manifest)}")
    if size and manifest["size"] < size:  # size None: not known yet (a --clip file), checked once it is
        raise DataError(f"frame cache {cache_dir} holds {manifest['size']} px frames, this run uses {size} px: "
                        f"they would be upscaled. Build one at this size (python frame_cache.py --cache NEW_DIR "
                        f"--size {size} ...) or pass --size {manifest['size']}")
    if size and manifest["size"] > size:
        _warn(f"frame cache {cache_dir} holds {manifest['size']} px frames, this run uses {size} px: "
              f"every load resizes them (slower); a cache made with --size {size} is read as is")
    counts = {os.path.join(cache_dir, c["file"]): c["frames"] for c in manifest["clips"].values()}
    short = [(v, counts[f]) for v, f in zip(videos, files) if f and counts[f] < frames]
    if short:
        _warn(f"{len(short)} of {len(videos)} clips in frame cache {cache_dir} hold fewer than {frames} frames (made "
              f"at --fps {manifest['fps']:g}; e.g. {os.path.basename(short[0][0])}: {short[0][1]}): they are "
              f"padded and masked where decoding would give {frames}. Rebuild with a higher --fps (0: every frame) "
              f"into another folder")
    return files, manifest["fps"] or 30.0


def cache_file(cache_dir, video):
    """The file holding `video`'s frames in cache_dir (uint8 [frames, 3, size, size] .npy), or None."""
    manifest = read_manifest(cache_dir)
    return manifest and lookup(cache_dir, manifest, video)[0]


# ----------------------------------------------------------------------------------------------------
# Start-up check of the videos: open each one as cheaply as possible (its header and first frame, or its frame
# cache's header) so that unreadable files are all named before training, not one per crashed evaluation.

def probe_video(path, cached=None):
    """None if the video (or `cached`, its frame-cache file, when there is one) would load; else what is wrong
    with it. Cheap: a video is opened and its first frame decoded (a file whose header promises more frames than
    it holds still loads: read_frames keeps the frames there are); a cache file's header is read (memory-mapped)."""
    if cached:
        try:
            x = np.load(cached, mmap_mode="r")
        except FileNotFoundError:
            return f"has lost its frame cache file {cached}: run the frame_cache.py --cache command again"
        except Exception as e:  # ValueError (cut off, not .npy), EOFError (empty), OSError
            return (f"has a damaged frame cache {cached} ({type(e).__name__}: {e}): delete it, or run the "
                    f"frame_cache.py --cache command again, which replaces it")
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
    """-> [(video path, what is wrong)] for every video in `videos` that would not load (probe_video; from the
    frame cache when one holds it, where a stale entry is wrong too), in order; workers > 0 spreads the work over
    that many processes. Raises DataError for a frame cache that cannot serve (cache_files)."""
    manifest, cached, stale = cache_files(frame_cache, videos) if frame_cache else (None, [None] * len(videos), [])
    stale = set(stale)
    jobs = [(v, f) for v, f in zip(videos, cached) if v not in stale]
    if workers <= 0:
        bad = [r for r in map(_probe_job, jobs) if r]
    else:
        with mp.get_context("spawn").Pool(workers, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
            bad = [r for r in pool.imap(_probe_job, jobs, chunksize=16) if r]
    bad += [(v, stale_problem(frame_cache, manifest)) for v in stale]
    order = {v: i for i, v in enumerate(videos)}
    return sorted(bad, key=lambda r: order[r[0]])


def write_video_list(path, bad):
    """The list of bad videos, one `path<TAB>what is wrong` a line, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = "".join(f"{v}\t{why}\n" for v, why in bad)
    files.atomic_write(path, lambda tmp: files.write_bytes(tmp, text.encode()))


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
            f" (and {len(bad) - show} more: `python frame_cache.py --check --out bad_videos.txt ...` lists them all)"
            if len(bad) > show else "")
    raise DataError(f"{len(bad)} of {len(split.videos)} {split.name} videos cannot be read: {shown}{rest}. "
                    "Re-download or re-encode them, or move them out of --video_path" +
                    (" and pass --allow_missing to use the others" if split.name != "folder" else ""))
