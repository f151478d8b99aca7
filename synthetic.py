"""synthetic.py: the built-in data set and backbone of nanoTVR's default job (CPU, minutes, no download).

The set: coloured shapes that move, grow/shrink, appear/disappear, in one or two phases, written as real
.mp4 files plus MSR-VTT's annotation files, so data.py reads it as it reads MSR-VTT. The test clips come in
pairs that are each other's time reversal, so a model that ignores frame order cannot tell them apart; the
test CSV's "twin" column names each clip's twin (data.py reads it into Split.twin).
The backbone: a tiny CLIP pretrained on still frames of the set's "still" split (captions name colour and
shape only), so that it knows objects but not motion: what a method learns on top of it is the motion.

    python synthetic.py                 # generate the set (once) into ~/.cache/nanotvr and print its path
"""
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import clip
import data
import files
from data_checks import bad_file, need_file, read_csv
from optimizer import lr_factor

# ----------------------------------------------------------------------------------------------------
# The set: coloured shapes that move, grow/shrink, appear/disappear, in one or two phases, written as
# real .mp4 files plus MSR-VTT annotation files. Test = pairs of clips that are each other's time reversal
# ("moves left then grows" / "shrinks then moves right"): same frames in opposite order, so a model that
# averages frames scores at most 50% on them; every test caption is unique, 200 clips: chance R@1 = 0.5%.
# 12 objects x 22 reversal classes: the test's 100 pairs leave ~17 clips per object, so a backbone that knows
# the object narrows a caption to ~17 clips and only motion can pick one of them.
# Version 3: 3,000 training clips (1,500 before: the methods overfit them within 2 epochs) and shapes of radius
# 6-15 px (4-13 before: a 4 px shape is half a 16 px patch, and shape is what the backbone must know).

SYNTHETIC_VERSION = 3
RADIUS = (6, 8)  # the smallest radius a shape takes, px; "mid" and "big" add 3 and 7
COLOURS = dict(red=(40, 40, 230), green=(40, 200, 40), blue=(230, 80, 30), yellow=(30, 220, 230))  # BGR
SHAPES = ("circle", "square", "triangle")
PHRASES = dict(left=("moves to the left", "moves left", "goes left"),
               right=("moves to the right", "moves right", "goes right"),
               up=("moves up", "goes up", "rises"), down=("moves down", "goes down", "falls"),
               grows=("grows", "gets bigger", "becomes larger"), shrinks=("shrinks", "gets smaller", "becomes smaller"),
               appears=("appears", "fades in", "shows up"), disappears=("disappears", "fades out", "vanishes"))
REVERSE = dict(left="right", right="left", up="down", down="up", grows="shrinks", shrinks="grows",
               appears="disappears", disappears="appears")
# one motion, or two in order; "appears" only first, "disappears" only last, no pair that is its own reversal
MOTIONS = [(m,) for m in PHRASES] + [(a, b) for a in PHRASES for b in PHRASES
                                     if a != b and b != REVERSE[a] and a != "disappears" and b != "appears"]


def reverse(motions):
    return tuple(REVERSE[m] for m in reversed(motions))


def caption(colour, shape, motions, variant=0):
    subject = ("a", "the", "a")[variant % 3] + f" {colour} {shape}"
    then = (" and then ", ", then ", " and after that ")[variant % 3]
    return subject + " " + then.join(PHRASES[m][variant % 3] for m in motions)


def render(rng, colour, shape, motions, n_frames, size=64):
    """-> list of BGR uint8 [size, size, 3] frames. Phases split the clip evenly; x, y, radius, opacity."""
    dist, (small, mid, big) = rng.uniform(16, 24), rng.uniform(*RADIUS) + np.array([0, 3, 7])
    state = np.array([0.0, 0.0, small if "grows" in motions else big if "shrinks" in motions else mid,
                      0.0 if motions[0] == "appears" else 1.0])
    delta = dict(left=(-dist, 0, 0, 0), right=(dist, 0, 0, 0), up=(0, -dist, 0, 0), down=(0, dist, 0, 0),
                 grows=(0, 0, big - small, 0), shrinks=(0, 0, small - big, 0), appears=(0, 0, 0, 1),
                 disappears=(0, 0, 0, -1))
    states = []
    for f in range(n_frames):
        s = f / (n_frames - 1) * len(motions)   # global time in phase units
        p = min(int(s), len(motions) - 1)
        states.append(state + sum(np.array(delta[m]) for m in motions[:p]) + (s - p) * np.array(delta[motions[p]]))
    states = np.array(states)  # [n_frames, 4]
    lo, hi = (states[:, :2] - states[:, 2:3]).min(0), (states[:, :2] + states[:, 2:3]).max(0)
    states[:, :2] += rng.uniform(2 - lo, np.maximum(2 - lo, size - 2 - hi))  # keep the path inside the frame
    background = np.full((size, size, 3), rng.integers(0, 60), np.uint8)
    frames = []
    for x, y, r, alpha in states:
        shape_img = background.copy()
        X, Y, R = int(x * 16), int(y * 16), int(r * 16)  # 4 fractional bits for smooth motion
        if shape == "circle":
            cv2.circle(shape_img, (X, Y), R, COLOURS[colour], -1, cv2.LINE_AA, 4)
        elif shape == "square":
            cv2.rectangle(shape_img, (X - R, Y - R), (X + R, Y + R), COLOURS[colour], -1, cv2.LINE_AA, 4)
        else:
            pts = np.array([[X, Y - R], [X - R, Y + R * 4 // 5], [X + R, Y + R * 4 // 5]], np.int32)
            cv2.fillPoly(shape_img, [pts], COLOURS[colour], cv2.LINE_AA, 4)
        frames.append(cv2.addWeighted(shape_img, float(alpha), background, 1 - float(alpha), 0))
    return frames


def still_split(root):
    """The "still" split of the set in `root`: the training clips whose object is in every frame, each captioned
    with its colour and shape only ("a red circle"): what the tiny CLIP is pretrained on."""
    origin = data.ORIGINS["synthetic"]
    path = need_file(root, "synthetic_still.csv", origin)
    rows = read_csv(path, ("video_id", "sentence"), origin)
    videos = [os.path.abspath(os.path.join(root, "videos", r["video_id"] + ".mp4")) for _, r in rows]
    missing = [v for v in videos if not os.path.isfile(v)]
    if missing or not rows:
        raise bad_file(path, f"lists {len(rows)} videos, {len(missing)} of them missing {missing[:3]}", origin)
    return data.Split("synthetic-still", videos, [r["sentence"] for _, r in rows], list(range(len(rows))))


def make_synthetic(root, seed=0, n_train=3000, n_test_pairs=100, size=64):
    """Generate the synthetic set into root (MSR-VTT layout + synthetic_still.csv + videos/videoN.mp4).
    The test split: n_test_pairs reversal classes (None: all of them), two clips each."""
    os.makedirs(os.path.join(root, "videos"))
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    classes = sorted({(c, s, min(m, reverse(m))) for c, s in objects for m in MOTIONS})  # reversal classes
    test = [classes[k] for k in np.random.default_rng(seed).permutation(len(classes))[:n_test_pairs]]
    videos, sentences, test_rows, still_rows = [], [], [], []
    for i in tqdm(range(n_train + 2 * len(test)), desc="synthetic set", unit="clip", leave=False,
                  dynamic_ncols=True, disable=not sys.stderr.isatty()):
        rng = np.random.default_rng([seed, i])
        vid, n_frames = f"video{i}", int(rng.integers(16, 25))
        if i < n_train:
            (colour, shape), motions = objects[rng.integers(len(objects))], MOTIONS[rng.integers(len(MOTIONS))]
            frames = render(rng, colour, shape, motions, n_frames, size)
            caps = [caption(colour, shape, motions, k) for k in range(3)]
            if "appears" not in motions and "disappears" not in motions:  # object visible in every frame
                still_rows.append([f"still{len(still_rows)}", vid, vid, f"a {colour} {shape}"])
        else:
            colour, shape, motions = test[(i - n_train) // 2]
            if (i - n_train) % 2 == 0:
                frames = render(rng, colour, shape, motions, n_frames, size)
            else:  # the previous clip played backwards
                frames, motions = frames[::-1], reverse(motions)
            caps = [caption(colour, shape, motions)]
            twin = f"video{i + 1 if (i - n_train) % 2 == 0 else i - 1}"
            test_rows.append([f"ret{len(test_rows)}", f"msr{i}", vid, caps[0], twin])
        data.write_video(os.path.join(root, "videos", vid + ".mp4"), frames)
        videos.append({"video_id": vid, "category": 0, "url": "", "start time": 0.0, "end time": n_frames / 8,
                       "split": "train" if i < n_train else "test", "id": i})
        sentences += [{"caption": c, "video_id": vid, "sen_id": len(sentences) + k} for k, c in enumerate(caps)]
    with open(os.path.join(root, "MSRVTT_data.json"), "w") as f:
        json.dump({"info": {"nanotvr_synthetic": SYNTHETIC_VERSION, "seed": seed}, "videos": videos,
                   "sentences": sentences}, f)
    for name, header, rows in [("MSRVTT_train.9k.csv", ["video_id"], [[f"video{i}"] for i in range(n_train)]),
                               ("MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence", "twin"], test_rows),
                               ("synthetic_still.csv", ["key", "vid_key", "video_id", "sentence"], still_rows)]:
        with open(os.path.join(root, name), "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)


def ensure_synthetic(root=None, **kwargs):
    """The synthetic set's directory, generated on first use: in a temporary directory renamed into place,
    so an interrupted run or several DDP ranks generating at once never leave a half-written set."""
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "nanotvr", f"synthetic-{SYNTHETIC_VERSION}")
    if os.path.isdir(root):
        return root
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=os.path.dirname(os.path.abspath(root)))
    try:
        print(f"generating the synthetic data set into {root} (once)", file=sys.stderr, flush=True)
        make_synthetic(os.path.join(tmp, "set"), **kwargs)
        os.rename(os.path.join(tmp, "set"), root)
    except OSError:
        if not os.path.isdir(root):  # another process won the rename: use its copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------------
# The methods' recipes on this set (ours; the papers' recipes are each method file's RECIPE). train.py merges
# RECIPE, then these, then the flags given. Each must train on 2 CPU cores in minutes on the tiny CLIP below, so
# they use 8 frames (the set's clips have 16-24), batches of 32 and a larger lr than the papers': recipes tuned
# for thousands of steps on ViT-B/32 barely move freshly initialised modules in the few hundred steps here.
# The runs behind these choices: docs/results-synthetic.md. Every method samples the set's 16-24-frame clips
# (2-3 s at 8 fps) in nanoTVR's segments and trains on every caption without augmentation: the releases' rules
# (1 frame/s, SimVTP's 64-frame window) are made for 10-30 s clips at 30 fps.
SYNTHETIC = dict(sampling="segments", augment="none", pairs="caption")
SIMVTP_TINY = dict(SYNTHETIC, frames=8, size=32, patch_size=8, tubelet_size=2, width=64, depth=2, heads=2,
                   batch_size=32, warmup=0.1)  # SimVTP has its own encoders: a ViT of 2 layers of width 64
RECIPES = dict(
    # full (and zeroshot's frames): CLIP trains at 3e-4 for 3 epochs of the set's 9,000 pairs
    full=dict(SYNTHETIC, clip_lr=3e-4, epochs=3, batch_size=32, frames=8),
    # UMP: K_d=1 is the upper half of a 2-layer video tower (6 of 12 at ViT-B/32); d_ff=256 keeps G at 4x the
    # width, as 2048 is at 512; lr 1e-3 (3e-5 is tuned for ~1.4k steps on MSR-VTT). 1 epoch (281 steps): the
    # whole default job (set, tiny CLIP, training) fits in 3 minutes on 2 idle cores.
    ump=dict(SYNTHETIC, lr=1e-3, epochs=1, batch_size=32, frames=8, K_d=1, d_ff=256),
    # DGL: backprop through the frozen towers dominates a step, so a small batch gives more updates; twice the
    # release's prompts, n_f 8 per frame and n_t 16: with 4 and 8 (lr 2e-2) the transformer latent stayed at
    # t2v R@1 4.5, R@10 45.5 over 3 seeds, with 8 and 16 at lr 1e-2 it reaches 6.0 / 50.0 (linear 6.5 / 49.9)
    dgl=dict(SYNTHETIC, lr=1e-2, epochs=2, batch_size=32, frames=8, n_f=8, n_t=16),
    # Cross-Modal Adapter: r=8 with d_s=8 keeps roughly MSR-VTT's bottleneck/shared ratio at width 64; 3 epochs
    # (843 steps) at lr 1e-2 (3e-3 left t2v R@1 at 4.5 against zero-shot's 2.5 after 3 epochs, one seed)
    adapter=dict(SYNTHETIC, r=8, d_s=8, lr=1e-2, epochs=3, batch_size=32, frames=8),
    # UniPT: 2 epochs (562 steps) at 20x the release's lr, so that a default-initialised side network moves
    unipt=dict(SYNTHETIC, lr=2e-3, epochs=2, batch_size=32, frames=8),
    # SimVTP: 5 epochs of the 9,000 pairs, the same ~1,400 steps as 10 epochs of the earlier 4,500
    simvtp=dict(SIMVTP_TINY, lr=5e-4, epochs=5),
    simvtp_pretrain=dict(SIMVTP_TINY, decoder_width=32, decoder_depth=1, decoder_heads=1, lr=1e-3, epochs=5),
)


# ----------------------------------------------------------------------------------------------------
# The backbone

# Tiny CLIP of the synthetic default, pretrained contrastively on still frames. Its token embeddings keep their
# random init (a dozen words; AdamW over 49408 rows would cost half of each step); every other tensor trains.
# 64 px frames (the set's own size) in 16 px patches: 17 tokens, yet shapes stay legible (at 32 px / 8 px
# patches it learnt colours but hardly shapes: 47% of still frames classified against 56-59% here).
# embed_dim 64 (32 before): trained on object captions only, a 32-d embedding keeps little besides the object
# (a linear probe reads a frame's x, y, size from it with R^2 0.14, 0.23, 0.73; 0.31, 0.22, 0.81 at 64-d); the
# wider one leaves the methods more to build motion from, and zero-shot retrieval no better (t2v R@10 32 vs 42).
TINY_CLIP = clip.CONFIGS["synthetic"]  # the name tiny_clip() reads (tests/test_learning.py swaps it)
TINY_PRETRAIN = dict(seed=0, steps=300, batch_size=128, lr=1e-3, weight_decay=0.1, frames=8, words=32,
                     frozen=("token_embedding.weight",))


def uses_tiny_clip(clip_name, data_name):
    """The synthetic default's backbone rule: without --clip, --data synthetic runs on the tiny CLIP below,
    pretrained on the set itself (any other set: ViT-B/32)."""
    return clip_name is None and data_name == "synthetic"


def tiny_clip(cache_dir, data_path, log=print):
    """The synthetic default's backbone: TINY_CLIP trained contrastively on single frames of the "still" split
    (captions name colour and shape only), so it knows objects but not motion. Cached by config hash."""
    config = dict(clip=TINY_CLIP, pretrain=TINY_PRETRAIN, data=SYNTHETIC_VERSION)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tiny-clip-{key}.pt")
    if os.path.isfile(path):
        return clip.load(path)
    P, t0 = TINY_PRETRAIN, time.time()
    split = still_split(data_path)
    ds = data.VideoTextDataset(split, frames=P["frames"], words=P["words"], size=TINY_CLIP["image_resolution"],
                               train=False, mode="videos")
    videos = torch.stack([ds[i]["video"] for i in range(len(ds))])  # [N, T, 3, S, S]: the object is in every frame
    names = sorted(set(split.captions))  # a dozen "a red circle" captions: one class each
    label = torch.tensor([names.index(c) for c in split.captions])
    ids = torch.stack([data.tokenize(c, P["words"]) for c in names])  # [C, L]
    video_of = torch.tensor(split.caption_video)
    torch.manual_seed(P["seed"])
    model = clip.CLIP(**TINY_CLIP).train()
    for n, p in model.named_parameters():
        p.requires_grad_(n not in P["frozen"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]  # matrices decay, the rest not
    opt = torch.optim.AdamW([dict(params=[p for n, p in named if not any(p is q for q in decay)], weight_decay=0.0),
                             dict(params=decay, weight_decay=P["weight_decay"])], lr=P["lr"])
    for step in tqdm(range(P["steps"]), desc="pretrain tiny CLIP", leave=False, dynamic_ncols=True,
                     disable=not sys.stderr.isatty()):
        for g in opt.param_groups:  # linear warmup over 10% of the steps, then cosine to 0: train.py's schedule
            g["lr"] = P["lr"] * lr_factor(step, P["steps"], 0.1)
        i = torch.randint(len(label), (P["batch_size"],))
        frame = clip.normalize_pixels(videos[video_of[i], torch.randint(P["frames"], (len(i),))])  # [B, 3, S, S]
        img = F.normalize(model.encode_image(frame), dim=-1)
        txt = F.normalize(model.encode_text(ids), dim=-1)[label[i]]  # [B, E]
        logits = model.logit_scale.exp() * img @ txt.T
        same = (label[i, None] == label[None, i]).float()  # repeated captions are positives, not negatives
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.logit_scale.data.clamp_(max=math.log(100))
    os.makedirs(cache_dir, exist_ok=True)
    files.atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))  # concurrent runs read a whole file
    log(f"tiny CLIP: {P['steps']} steps on {len(ds)} still clips, {time.time() - t0:.0f} s, loss {loss.item():.3f}: {path}")
    return clip.load(path)


if __name__ == "__main__":
    print(ensure_synthetic())
