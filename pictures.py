"""pictures.py: pictures of what a model retrieved, drawn with OpenCV on a white page; each clip is a strip of
frames (left to right in time), its score under it.

  retrievals.png  train.py, after every evaluation: PICTURE_ROWS test captions, each with its top PICTURE_TOP
                  clips, the caption's own clip framed in green (in a column of its own when not among them)
  query.png       query.py: the top --top_k videos for one caption
"""
import os
import sys
import unicodedata

import cv2
import numpy as np

import data
import files


PICTURE_ROWS, PICTURE_TOP, PICTURE_FRAMES = 6, 5, 4  # captions shown, clips per caption, frames per clip
THUMB = 64  # px: the height of a frame in a picture (the synthetic set's own size)
FONT, TEXT, SMALL = cv2.FONT_HERSHEY_SIMPLEX, 0.6, 0.5  # font scales of captions and of the labels
MARGIN, GAP, BORDER, LINE, SMALL_LINE = 20, 16, 3, 26, 21  # px
GREEN, BLACK, GREY, LIGHT = (30, 150, 30), (0, 0, 0), (110, 110, 110), (215, 215, 215)  # BGR


def picture_captions(n_captions, rows=PICTURE_ROWS):
    """The test captions retrievals.png shows: evenly spaced over the split, the same in every run."""
    return sorted(set(np.linspace(0, n_captions - 1, min(rows, n_captions)).round().astype(int).tolist()))


def retrieval_rows(split, sim, rows=PICTURE_ROWS, top=PICTURE_TOP):
    """-> one dict per shown caption: caption, top [(video, score)] best first, true (its video), rank of the
    true video (1 + the videos scored above it), true_score."""
    out = []
    for i in picture_captions(len(split.captions), rows):
        s, v = sim[i].float().cpu(), split.caption_video[i]
        scores, videos = s.topk(min(top, len(s)))
        out.append(dict(index=i, caption=split.captions[i], top=list(zip(videos.tolist(), scores.tolist())),
                        true=v, rank=int((s > s[v]).sum()) + 1, true_score=float(s[v])))
    return out


def first_captions(split):
    """video -> its first caption (a folder has none)."""
    return {v: c for c, v in reversed(list(zip(split.captions, split.caption_video)))}


def ascii_text(text):  # cv2.putText draws ASCII only
    return unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()


def wrap(text, width, scale=TEXT, thickness=1):
    """Words -> lines no wider than `width` px (a single longer word is cut)."""
    lines, line = [], ""
    for word in ascii_text(text).split():
        trial = f"{line} {word}".strip()
        if line and cv2.getTextSize(trial, FONT, scale, thickness)[0][0] > width:
            lines.append(line)
            line = word
        else:
            line = trial
        while cv2.getTextSize(line, FONT, scale, thickness)[0][0] > width and len(line) > 1:
            line = line[:-1]
    return lines + [line] if line else lines or [""]


def read_strip_frames(path, max_seconds=None, frames=PICTURE_FRAMES):
    """The segment centres (as evaluation samples them) -> RGB uint8 [t, H, W, 3], or None if unreadable."""
    try:
        return data.read_frames(path, frames, False, max_seconds=max_seconds)
    except data.VideoError:
        return None


def strip(frames, height, width, n=PICTURE_FRAMES):
    """RGB frames -> one BGR image of n boxes of height x width (each frame fitted in, centred), 2 px apart."""
    boxes = []
    for k in range(n):
        box = np.full((height, width, 3), 255 if frames is not None else 160, np.uint8)
        if frames is not None and k < len(frames):
            f = frames[k]
            s = min(height / f.shape[0], width / f.shape[1])
            h, w = max(1, round(f.shape[0] * s)), max(1, round(f.shape[1] * s))
            f = cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
            top, left = (height - h) // 2, (width - w) // 2
            box[top:top + h, left:left + w] = cv2.cvtColor(f, cv2.COLOR_RGB2BGR)
        boxes += [box, np.full((height, 2, 3), 255, np.uint8)]
    return np.hstack(boxes[:-1])


def note_lines(text, width, lines=2):
    """A clip's caption or file name under it, in at most `lines` lines (cut with "...")."""
    out = wrap(text, width, SMALL)
    if len(out) > lines:
        out = out[:lines]
        while out[-1] and cv2.getTextSize(out[-1] + "...", FONT, SMALL, 1)[0][0] > width:
            out[-1] = out[-1][:-1]
        out[-1] += "..."
    return out


def draw_page(title, rows, frames_of, columns):
    """title: a string; rows: dicts of caption (a string) and cells [(column, video, label, note, true)]: the
    label (score) under the clip, the note (its caption, its file) in grey under that; frames_of: video -> RGB
    frames (or None). -> the page, a BGR uint8 image."""
    shapes = [f.shape[1:3] for f in frames_of.values() if f is not None]
    aspect = min(max(float(np.median([w / h for h, w in shapes])) if shapes else 1.0, 0.75), 2.0)
    box_w = round(THUMB * aspect)
    strip_w = PICTURE_FRAMES * box_w + 2 * (PICTURE_FRAMES - 1)
    cell_w, cell_h = strip_w + 2 * BORDER, THUMB + 2 * BORDER
    width = 2 * MARGIN + columns * cell_w + (columns - 1) * GAP
    title_lines = wrap(title, width - 2 * MARGIN, TEXT, 2)
    pieces = [np.full((MARGIN + LINE * len(title_lines), width, 3), 255, np.uint8)]
    for k, line in enumerate(title_lines):
        cv2.putText(pieces[0], line, (MARGIN, MARGIN + LINE * k + 16), FONT, TEXT, BLACK, 2, cv2.LINE_AA)
    for row in rows:
        lines = wrap(row["caption"], width - 2 * MARGIN) if row["caption"] else []
        labels = [[label] + (note_lines(note, cell_w) if note else []) for _, _, label, note, _ in row["cells"]]
        n_labels = max(map(len, labels))
        y_cells = 12 + LINE * len(lines) + 4
        page = np.full((y_cells + cell_h + 4 + SMALL_LINE * n_labels + 12, width, 3), 255, np.uint8)
        page[0, MARGIN:width - MARGIN] = LIGHT  # the separator between rows
        for k, line in enumerate(lines):
            cv2.putText(page, line, (MARGIN, 12 + LINE * k + 17), FONT, TEXT, BLACK, 1, cv2.LINE_AA)
        for (column, video, _, _, true), lines_of_cell in zip(row["cells"], labels):
            x = MARGIN + column * (cell_w + GAP)
            page[y_cells:y_cells + cell_h, x:x + cell_w] = GREEN if true else LIGHT
            page[y_cells + BORDER:y_cells + BORDER + THUMB, x + BORDER:x + BORDER + strip_w] = strip(
                frames_of[video], THUMB, box_w)
            for k, label in enumerate(lines_of_cell):
                cv2.putText(page, ascii_text(label), (x, y_cells + cell_h + 4 + SMALL_LINE * k + 15), FONT, SMALL,
                            GREEN if true else BLACK if k == 0 else GREY, 1, cv2.LINE_AA)
        pieces.append(page)
    pieces.append(np.full((MARGIN - 12, width, 3), 255, np.uint8))
    return np.vstack(pieces)


def write_picture(path, title, rows, videos, max_seconds=None, columns=PICTURE_TOP):
    """Read the few clips shown (PICTURE_FRAMES frames each), draw the page, write it as a PNG."""
    shown = sorted({c[1] for r in rows for c in r["cells"]})
    frames_of = {v: read_strip_frames(videos[v], max_seconds) for v in shown}
    page = draw_page(title, rows, frames_of, columns)
    try:  # a picture is optional: a full disk or a read-only folder must not cost the run's results
        files.atomic_write(path, lambda tmp: cv2.imwrite(tmp, page, [cv2.IMWRITE_PNG_COMPRESSION, 9]), suffix=".png")
    except OSError as e:
        print(f"WARNING: could not write {path} ({e}); the results are in the console and log.jsonl",
              file=sys.stderr, flush=True)
    return page


def write_retrievals(path, split, sim, title):
    """retrievals.png: PICTURE_ROWS test captions, each with its top PICTURE_TOP clips; the caption's own
    clip has a green border, and its own column at the end when it is not among them."""
    rows, described = retrieval_rows(split, sim), first_captions(split)
    for r in rows:
        found = r["rank"] <= len(r["top"])
        r["caption"] = f"caption {r['index']}: \"{r['caption']}\"   (its clip: rank {r['rank']})"
        r["cells"] = [(k, v, f"#{k + 1}  score {s:.2f}" + ("  (true)" if v == r["true"] else ""),
                       described.get(v), v == r["true"]) for k, (v, s) in enumerate(r["top"])]
        if not found:
            r["cells"].append((len(r["top"]), r["true"], f"true clip at rank {r['rank']}, score {r['true_score']:.2f}",
                               None, True))
    columns = PICTURE_TOP + any(r["rank"] > len(r["top"]) for r in rows)
    head = (f"{title}: text-to-video, the top {PICTURE_TOP} of {len(split.videos)} clips for {len(rows)} of "
            f"{len(split.captions)} test captions; {PICTURE_FRAMES} frames per clip, left to right in time; "
            f"green: the clip the caption describes")
    return write_picture(path, head, rows, split.videos, split.max_seconds, columns)


def write_query(path, query, hits, split, title):
    """query.png: the hits [(video index, score)], best first, PICTURE_TOP a row, each with its caption (or its
    file name) under it."""
    described = first_captions(split)
    cells = [(k % PICTURE_TOP, v, f"#{k + 1}  score {s:.2f}", described.get(v, os.path.basename(split.videos[v])), False)
             for k, (v, s) in enumerate(hits)]
    rows = [dict(caption=f"query: \"{query}\"" if k == 0 else "", cells=cells[k:k + PICTURE_TOP])
            for k in range(0, len(cells), PICTURE_TOP)]
    return write_picture(path, title, rows, split.videos, split.max_seconds, min(PICTURE_TOP, len(cells)))
