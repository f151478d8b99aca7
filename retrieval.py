"""retrieval.py: evaluation of a trained method: encode the test set once, score every caption against every
video, and the metrics of the field (recall@k, median and mean rank) as CLIP4Clip's metrics.py computes them.

  t2v  each caption ranks every video; its rank is the position of the video it describes
  v2t  each video ranks the caption groups (one group per video: multi-caption sets have several), each group
       scored by its best caption
Ties and medians follow CLIP4Clip's metrics.py, function by function, as its eval_epoch calls them: the
published numbers of CLIP4Clip and of the methods built on its evaluation (MSR-VTT, MSVD, VATEX, ...) came from
these functions, and a number is comparable only when it is computed the same way. Two rules, by case:
  one caption per video, both directions; and v2t of every set (compute_metrics)
       a k-way tie with the ground truth at ranks r..r+k-1 adds all k ranks to the list every metric is taken
       over, so a constant similarity matrix scores at chance, not at R@1 = 100; the median of an even count
       is the mean of the two middle ranks (numpy.median).
  t2v when some video has several captions, e.g. MSVD, VATEX (tensor_text_to_video_metrics)
       one rank per caption, its position in the caption's sorted videos; the median of an even count is
       the lower middle rank (torch.median). Tied videos: in index order (the ground truth after the tied
       videos listed before it). CLIP4Clip orders them as torch.argsort's unstable sort happens to, which
       depends on the row length and the build (torch 2.14.1 keeps index order in rows of 12, not of 20):
       no rule reproduces that, so nanoTVR takes the same function with a stable sort.
Real similarity matrices almost never tie, so the tie rules matter for degenerate scores only (the fixture's
200 x 20 matrix of round(3x) scores, t2v R@1: 1.8 under the k-entry rule, 4.0 in index order, 3.5 under
CLIP4Clip's unstable sort); the median rule can move MdR by 0.5. tests/fixtures/clip4clip_metrics.pt holds
CLIP4Clip's outputs on such matrices (tests/oracles/make_metrics_fixture.py); tests/test_metrics.py checks them.
"""
import glob
import hashlib
import json
import math
import os
import sys
import time
import unicodedata

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import synthetic

SIM_BLOCK_ELEMENTS = 2 ** 26  # a method's own similarity() sees [texts, videos, T, D] blocks of at most this


def similarity(method, text, video, video_mask):
    """[Nt, D], [Nv, D] (or [Nv, T, D] with method.similarity) -> [Nt, Nv] logits in fp32."""
    if method.similarity is not None:
        return method.similarity(text, video, video_mask).float()
    t, v = F.normalize(text.float(), dim=-1), F.normalize(video.float(), dim=-1)
    return method.logit_scale.exp().float() * t @ v.T


def ranks_of(sim, gt):
    """sim [Nq, Nc], gt [Nq] -> 1-based ranks; a k-way tie with the ground truth adds k entries r..r+k-1."""
    score = sim[torch.arange(len(sim)), gt].unsqueeze(1)
    above, tied = (sim > score).sum(1), (sim == score).sum(1)
    return torch.cat([torch.arange(a + 1, a + t + 1) for a, t in zip(above.tolist(), tied.tolist())]).double()


def index_order_ranks(sim, gt):
    """sim [Nq, Nc], gt [Nq] -> one 1-based rank per query; tied candidates rank in index order."""
    score, gt = sim[torch.arange(len(sim)), gt].unsqueeze(1), gt.unsqueeze(1)
    before = (sim > score) | ((sim == score) & (torch.arange(sim.shape[1]) < gt))
    return before.sum(1).double() + 1


def summarize(r, lower_median=False):
    median = r.median().item() if lower_median else float(np.median(r.numpy()))
    return {"R@1": 100 * (r <= 1).double().mean().item(), "R@5": 100 * (r <= 5).double().mean().item(),
            "R@10": 100 * (r <= 10).double().mean().item(), "MdR": median, "MnR": r.mean().item()}


def retrieval_metrics(sim, caption_video, dsl=False):
    """sim [Nt, Nv] (caption i describes video caption_video[i]) -> {"t2v": ..., "v2t": ...}.
    v2t ranks, for video j, each video's caption group by its best caption's score (multi-caption rule);
    t2v takes CLIP4Clip's multi-caption rules when there are more captions than videos (module docstring)."""
    sim, cv = sim.double().cpu(), torch.as_tensor(caption_video)
    t2v_sim = v2t_sim = sim
    if dsl:  # CAMoE's dual softmax: reweight by a softmax over the query axis (transductive, off by default)
        t2v_sim, v2t_sim = sim * sim.softmax(0) * len(sim), sim * sim.softmax(1) * sim.shape[1]
    groups = torch.full((sim.shape[1], sim.shape[1]), -math.inf, dtype=sim.dtype).scatter_reduce(
        0, cv[:, None].expand_as(v2t_sim), v2t_sim, "amax")  # [group g, video j]: best caption of g
    multi = len(cv) > sim.shape[1]
    return {"t2v": summarize(index_order_ranks(t2v_sim, cv) if multi else ranks_of(t2v_sim, cv), lower_median=multi),
            "v2t": summarize(ranks_of(groups.T, torch.arange(sim.shape[1])))}


def temporal_pair_accuracy(sim, caption_video, twin):
    """Share (%) of captions whose video scores above its time-reversed twin, twin[j] = the twin of video j
    (a tie counts half): 50 for a model blind to frame order, 100 when order always decides. sim [Nt, Nv]."""
    sim, cv = sim.double().cpu(), torch.as_tensor(caption_video)
    own, other = sim[torch.arange(len(sim)), cv], sim[torch.arange(len(sim)), torch.as_tensor(twin)[cv]]
    return 100 * ((own > other).double() + 0.5 * (own == other).double()).mean().item()


@torch.no_grad()
def encode(method, split, mode, args, device, amp):
    """mode "texts": -> [Nt, D]; mode "videos": -> (what encode_video returns for every video, [Nv, D] or
    [Nv, T, D] for a method with its own similarity; video_mask [Nv, T]). The caller sets eval mode."""
    kw = dict(frames=args.frames, words=args.words, size=args.size, train=False, frame_cache=args.frame_cache)
    ds = data.VideoTextDataset(split, mode=mode, **kw)
    loader = data.make_loader(ds, batch_size=args.batch_size_val, shuffle=False, num_workers=args.num_workers)
    out, masks = [], []
    for b in tqdm(loader, desc=f"encode {mode}", leave=False, disable=not sys.stderr.isatty()):
        with amp:
            if mode == "texts":
                out.append(method.encode_text(b["text"].to(device)).float())
            else:
                mask = b["video_mask"].to(device)
                out.append(method.encode_video(method.normalize_pixels(b["video"].to(device)), mask).float())
                masks.append(mask)
    return torch.cat(out) if mode == "texts" else (torch.cat(out), torch.cat(masks))


def similarity_matrix(method, text, video, mask):
    """[Nt, Nv] logits of every text against every video, in blocks of texts for a method's own similarity."""
    block = len(text) if method.similarity is None else max(1, SIM_BLOCK_ELEMENTS // max(video.numel(), 1))
    return torch.cat([similarity(method, text[i:i + block], video, mask) for i in range(0, len(text), block)])


@torch.no_grad()
def evaluate(method, split, args, device, amp, keep=None):
    """Encode every test text and video once, then the [Nt, Nv] similarity (blockwise for method.similarity).
    keep: a dict that receives the similarity matrix as keep["sim"] (for retrievals.png)."""
    was_training = method.training
    method.eval()
    text = encode(method, split, "texts", args, device, amp)
    video, mask = encode(method, split, "videos", args, device, amp)
    sim = similarity_matrix(method, text, video, mask)
    method.train(was_training)
    metrics = {f"{label}{d}": m for label, dsl in (("", False), ("DSL ", True)) if dsl <= args.dsl
               for d, m in retrieval_metrics(sim, split.caption_video, dsl).items()}
    if split.name == "synthetic-test":  # its clips come in time-reversed pairs (synthetic.twins)
        metrics["temporal"] = {"pair_acc": temporal_pair_accuracy(sim, split.caption_video, synthetic.twins(split))}
    if keep is not None:
        keep["sim"] = sim
    return metrics


def table(metrics):
    rows = {k: m for k, m in metrics.items() if k != "temporal"}
    lines = [f"{'':>12} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MdR':>6} {'MnR':>7}"] + [
        f"{k:>12} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} {m['MdR']:6.1f} {m['MnR']:7.2f}"
        for k, m in rows.items()]
    if "temporal" in metrics:
        lines.append(f"temporal pair accuracy {metrics['temporal']['pair_acc']:.1f}% "
                     "(caption's clip above its time-reversed twin; order-blind: 50%)")
    if any(k.startswith("DSL") for k in rows):
        lines.append(DSL_NOTE)
    return "\n".join(lines)


DSL_NOTE = ("DSL rows: CAMoE's dual softmax normalises over all test queries at once, so they are transductive "
            "and not comparable with the rows above")


# ----------------------------------------------------------------------------------------------------
# Pictures of what was retrieved: retrievals.png after every evaluation, query.png for --query. OpenCV on a
# white page; each clip is a strip of frames (left to right in time), its score under it.

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
    tmp = f"{path}.tmp{os.getpid()}.png"
    cv2.imwrite(tmp, page, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    os.replace(tmp, path)
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


# ----------------------------------------------------------------------------------------------------
# The query mode: one caption against every video of a split. The videos' features (whatever encode_video
# returns, with the masks) are computed once per (model, split, frame settings) and kept next to the
# checkpoint as <checkpoint>.videos-<model>-<videos>.pt, so the next query only encodes its text.

def fingerprint(path):
    """A file's identity without reading all of it: size, mtime and sha256 of its first and last MiB."""
    st = os.stat(path)
    h = hashlib.sha256(f"{st.st_size} {st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(2 ** 20))
        f.seek(max(st.st_size - 2 ** 20, 0))
        h.update(f.read())
    return h.hexdigest()


def video_cache_keys(split, args):
    """-> (file prefix, model key, videos key): the cache of this split's features under this model is
    <checkpoint>.videos-<model key>-<videos key>.pt (no checkpoint: <output_dir>/videos-...pt)."""
    files = [fingerprint(p) if p and os.path.isfile(p) else p for p in (args.checkpoint, args.clip, args.init)]
    tiny = args.clip is None and (args.data == "synthetic" or getattr(args, "tiny_clip_data", None))
    model = dict(method=args.method, kwargs=args.kwargs, backbone="tiny CLIP" if tiny else args.clip, files=files)
    stats = [(v, os.path.getsize(v), os.path.getmtime(v)) for v in split.videos]
    videos = dict(videos=stats, frames=args.frames, size=args.size, max_seconds=split.max_seconds,
                  frame_cache=args.frame_cache and (args.frame_cache, data.read_manifest(args.frame_cache)))
    keys = [hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()[:12] for x in (model, videos)]
    prefix = f"{args.checkpoint}.videos" if args.checkpoint else os.path.join(args.output_dir, "videos")
    return prefix, *keys


@torch.no_grad()
def video_features(method, split, args, device, amp, log=print):
    """-> (video features, video_mask) of every video of the split, from the cache file or encoded (and cached)."""
    prefix, model_key, videos_key = video_cache_keys(split, args)
    path = f"{prefix}-{model_key}-{videos_key}.pt"
    if os.path.isfile(path):
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached["videos"] == split.videos:
            log(f"video features of {len(split.videos)} videos from {path}")
            return cached["video"].to(device), cached["mask"].to(device)
    was_training = method.training
    method.eval()
    t0 = time.time()
    video, mask = encode(method, split, "videos", args, device, amp)
    method.train(was_training)
    for old in glob.glob(glob.escape(prefix) + "-*.pt"):  # made before the checkpoint changed: never hit again
        if not old.startswith(f"{prefix}-{model_key}-"):
            os.remove(old)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(dict(video=video.cpu(), mask=mask.cpu(), videos=list(split.videos)), tmp)
    os.replace(tmp, path)
    log(f"encoded {len(split.videos)} videos in {time.time() - t0:.1f} s; cached in {path}")
    return video, mask


@torch.no_grad()
def search(method, query, split, args, device, amp, top_k=5, picture=None, log=print):
    """The top_k videos of the split for a caption: -> [(video path, score)], best first; printed, and drawn
    into `picture` (a PNG path) when given."""
    video, mask = video_features(method, split, args, device, amp, log)
    was_training = method.training
    method.eval()
    with amp:
        text = method.encode_text(data.tokenize(query, args.words)[None].to(device)).float()
    scores = similarity(method, text, video, mask)[0].cpu()
    method.train(was_training)
    best, order = scores.topk(min(top_k, len(scores)))
    hits = [(split.videos[v], float(s)) for v, s in zip(order.tolist(), best.tolist())]
    described = first_captions(split)
    log(f"query {query!r}: the top {len(hits)} of {len(split.videos)} videos (rank, score, file"
        + (", its caption)" if described else ")"))
    for k, v in enumerate(order.tolist()):
        log(f"{k + 1:>4}  {hits[k][1]:8.3f}  {hits[k][0]}" + (f"  {described[v]!r}" if v in described else ""))
    if picture:
        cells = [(k % PICTURE_TOP, v, f"#{k + 1}  score {s:.2f}", described.get(v, os.path.basename(split.videos[v])),
                  False) for k, (v, s) in enumerate(zip(order.tolist(), best.tolist()))]
        rows = [dict(caption=f"query: \"{query}\"" if k == 0 else "", cells=cells[k:k + PICTURE_TOP])
                for k in range(0, len(cells), PICTURE_TOP)]
        write_picture(picture, f"{args.method}: the top {len(hits)} of {len(split.videos)} videos of {split.name}",
                      rows, split.videos, split.max_seconds, min(PICTURE_TOP, len(cells)))
        log(f"picture: {picture}")
    return hits
