"""Write tests/fixtures/official_pipelines.pt by running the OFFICIAL input pipelines on frame-ID videos.

Not part of nanoTVR: the project and the tests never import this file. It writes five small clips whose frame k
shows k in its pixels (`paint`, `frame_id`), builds a tiny MSR-VTT annotation for them (5 train videos x 20
captions, a 1k-A style test csv), runs each release's own dataset classes / loader functions on them and reads
back, from the pixels each loader returns, which source frames it took, the valid mask, the crop geometry and the
token ids. Figures only: nothing of the official code is copied here, it is only imported and called.

What is recorded, per method (clip4clip, unipt, adapter, dgl, ump, simvtp) and mode (train/test), per clip:
  ids   source frame index in every one of the 12 (SimVTP: 16) slots, -1 where the loader wrote zeros
  mask  the loader's video_mask (UMP has none: all ones, short clips repeat their last frame)
  positions  frame index inside the file the loader read (the 3 fps re-encode for DGL/UniPT)
plus the spatial geometry (resize (h, w), crop (top, left, h, w), checked against the pixels), several seeded
draws of every random part (training frames, crop boxes, flips, SimVTP's window), the pairs per epoch of the tiny
annotation, and the token ids of CAPTIONS. The clips: CLIPS below (320x240 like MSR-VTT, mp4v written by OpenCV),
and their 3 fps / short-side-224 re-encodes made by the releases' own preprocess/compress_video.py (ffmpeg); the
fixture stores which source frame each re-encoded frame shows ("compressed"), so a test can rebuild both with
OpenCV alone: `write_clip(path, CLIPS[name])` and `write_clip(path, (3.0, ids), size=(298, 224))`.

Regenerate
    # 1. checkouts at the commits below (their HEAD today), e.g. git clone URL && git -C NAME checkout COMMIT
    #    ArrowLuo/CLIP4Clip 508ffa3  Paranioar/UniPT 3fa457d  LeapLabTHU/Cross-Modal-Adapter 07b2203
    #    knightyxp/DGL 9139fd1  zchoi/UMP_TVR 9ec554a  wufeim/SimVTP 558d24e
    # 2. ffmpeg on PATH (Debian: apt-get install ffmpeg; 5.1.x made the committed file) and, in a separate
    #    environment next to nanoTVR's requirements: pip install pandas av decord ujson lmdb
    # 3. from the nanoTVR root
    python tests/oracles/make_pipeline_fixtures.py --clip4clip DIR --unipt DIR --adapter DIR --dgl DIR \
        --ump DIR --simvtp DIR
About a minute on 2 CPU cores.

What this script changes in the releases' world (nothing in their files):
  - numpy.float = float when missing (removed in numpy 1.24; the CLIP4Clip-family loaders allocate with it), and
    a stand-in numpy.lib.function_base (gone in numpy 2) for SimVTP's datasets.py, which imports `disp` unused.
  - UMP: sys.argv is set to run_msrvtt.sh's flags while config.all_config.AllConfig parses it; the cwd is a temp
    folder holding data/MSRVTT/* (the paths msrvtt_dataset.py hard-codes); its tokenizer gets bpe_path=nanoTVR's
    copy of the same BPE file (its default is a relative data/CLIP path).
  - Spies that return what they wrap: torchvision RandomResizedCrop.get_params (UMP), SimVTP's
    video_transforms._get_param_spatial_crop and horizontal_flip, to record the boxes and flips drawn.
  - DGL's tokenizer file is loaded by path (modules/__init__.py imports the model); its compress() is imported
    from preprocess/compress_video.py and called on the clips (the 3 fps inputs of DGL, UniPT and UMP's option).
  - Cross-Modal Adapter reads pre-extracted 1 fps images (--dataset_type img, images/fps_1/<id>.mp4/); the
    release does not ship the extraction, so its own dataloaders_drl/rawvideo_util.py (framerate 1,
    _no_process=True) writes them here as zero-padded PNGs.
"""
import argparse
import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_pipelines.pt")
BPE = os.path.join(ROOT, "bpe_simple_vocab_16e6.txt.gz")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SimVTP (VideoMAE)
FRAMES, WORDS = 12, 32  # the MSR-VTT scripts' max_frames / max_words
SEEDS = (0, 1, 2, 3, 4, 5)

# name -> (fps, frame count): 10.0 s, 10.4 s, 15 s at 30 fps, 10 s at 29.97 fps (int(fps) = 29), 2 s at 30 fps
CLIPS = dict(video9001=(30.0, 300), video9002=(30.0, 312), video9003=(30.0, 450), video9004=(30000 / 1001, 300),
             video9005=(30.0, 60))
SIZE = (320, 240)  # (width, height) of MSR-VTT's videos
BITS, BANDS = 9, 10  # frame k: 9 full-width black/white bands = k in binary (MSB on top), then a ramp band
CAPTIONS = ["a man is playing a guitar on stage",
            "A woman's dog jumps over 2 fences -- quickly & happily!",
            "a man in a red shirt and a woman in a blue dress are dancing together in a large room while many "
            "people watch them and clap their hands to the loud music playing from the speakers behind them"]


# ------------------------------------------------------------------------------------------------ frame IDs
def paint(k, size=SIZE):
    """Frame k, BGR uint8 [H, W, 3]: bands 0-8 are k's bits (white = 1), band 9 a left-to-right ramp 0..255 that
    shows horizontal crops and flips."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    for b in range(BITS):
        if k >> (BITS - 1 - b) & 1:
            img[b * h // BANDS:(b + 1) * h // BANDS] = 255
    img[BITS * h // BANDS:] = np.round(np.linspace(0, 255, w)).astype(np.uint8)[None, :, None]
    return img


def frame_id(img):
    """uint8/float RGB or BGR [H, W, 3] in 0..255 whose rows span the painted frame's full height -> k."""
    h, k = img.shape[0], 0
    for b in range(BITS):
        lo, hi = b * h / BANDS, (b + 1) * h / BANDS
        k = 2 * k + int(np.asarray(img[int(lo + (hi - lo) / 3):int(hi - (hi - lo) / 3)], np.float64).mean() > 127.5)
    return k


def ramp_ends(img):
    """Ramp value (0..255) under the first and the last column: which part of the source width a crop kept."""
    h = img.shape[0]
    band = np.asarray(img[int((BITS + 0.3) * h / BANDS):int((BITS + 0.7) * h / BANDS)], np.float64)
    return float(band[:, :3].mean()), float(band[:, -3:].mean())


def write_clip(path, spec, size=SIZE):
    """spec = (fps, frame count) or (fps, list of the frame numbers to paint)."""
    fps, frames = spec
    frames = range(frames) if isinstance(frames, int) else frames
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for k in frames:
        writer.write(paint(k, size))
    writer.release()


def decoded_ids(path):
    cap, ids = cv2.VideoCapture(path), []
    while True:
        ok, f = cap.read()
        if not ok:
            return ids
        ids.append(frame_id(f))


def to_pixels(x, mean, std):
    """normalized float [..., 3, H, W] -> 0..255 float [..., H, W, 3]."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x * 255).movedim(-3, -1).numpy()


def slot_ids(video, mean, std):
    """[T, 3, H, W] normalized -> source id per slot, -1 for an all-zero (padded) slot."""
    video = np.asarray(video, dtype=np.float32)
    pix = to_pixels(video, mean, std)
    return [-1 if not np.any(video[t]) else frame_id(pix[t]) for t in range(len(video))]


# ------------------------------------------------------------------------------------------------ helpers
def commit_of(path):
    return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


class Release:
    """Import a release's top-level packages (dataloaders, modules, ...) from `path`; forget them on exit, as
    several releases name theirs alike."""

    def __init__(self, path):
        self.path = os.path.abspath(path)

    def __enter__(self):
        self.before = set(sys.modules)
        sys.path.insert(0, self.path)
        return self

    def __exit__(self, *exc):
        sys.path.remove(self.path)
        for name in set(sys.modules) - self.before:  # the release's own modules, not torchvision's
            mod = sys.modules[name]
            where = [getattr(mod, "__file__", None) or ""] + list(getattr(mod, "__path__", []))
            if any(str(w).startswith(self.path) for w in where):
                del sys.modules[name]


def load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def write_annotation(folder):
    """The tiny MSR-VTT: MSRVTT_data.json (20 captions per clip), train.9k/7k csv (all clips), 1k-A test csv."""
    names = list(CLIPS)
    sentences = [dict(video_id=v, caption=f"{CAPTIONS[j % 3]} {j}", sen_id=20 * i + j)
                 for i, v in enumerate(names) for j in range(20)]
    data = dict(videos=[dict(video_id=v, url=f"https://www.youtube.com/watch?v=yt{i}") for i, v in enumerate(names)],
                sentences=sentences)
    with open(os.path.join(folder, "MSRVTT_data.json"), "w") as f:
        json.dump(data, f)
    for split in ("9k", "7k"):
        with open(os.path.join(folder, f"MSRVTT_train.{split}.csv"), "w") as f:
            f.write("video_id\n" + "".join(f"{v}\n" for v in names))
    with open(os.path.join(folder, "MSRVTT_JSFUSION_test.csv"), "w") as f:
        f.write("key,vid_key,video_id,sentence\n")
        f.write("".join(f"ret{i},msr{i},{v},{CAPTIONS[i % 3]}\n" for i, v in enumerate(names)))
    return names


def compress_clips(dgl, src, dst):
    """The releases' preprocess/compress_video.py (ffmpeg -r 3, short side 224) -> source id of each frame."""
    mod = load_file("dgl_compress_video", os.path.join(dgl, "preprocess", "compress_video.py"))
    os.makedirs(dst, exist_ok=True)
    out = {}
    for name in CLIPS:
        mod.compress((os.path.join(src, name + ".mp4"), os.path.join(dst, name + ".mp4")))
        out[name] = decoded_ids(os.path.join(dst, name + ".mp4"))
    return out


def plain(x):
    """numpy scalars/arrays and tuples -> Python ints/floats, tensors and lists (torch.load(weights_only=True))."""
    if isinstance(x, dict):
        return {plain(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def positions(ids, file_ids):
    return [file_ids.index(i) if i >= 0 else -1 for i in ids]


# ------------------------------------------------------------------------------------------------ CLIP4Clip family
def clip4clip_family(path, videos, ann, compressed_ids, unipt=False):
    """CLIP4Clip's and UniPT's dataloaders/dataloader_msrvtt_retrieval.py as the MSR-VTT scripts run them:
    --expand_msrvtt_sentences --feature_framerate 1 --max_frames 12 --max_words 32 --slice_framepos 2."""
    with Release(path):
        dl = importlib.import_module("dataloaders.dataloader_msrvtt_retrieval")
        tok = importlib.import_module("modules.tokenization_clip").SimpleTokenizer()
        rec = dict(repo="Paranioar/UniPT" if unipt else "ArrowLuo/CLIP4Clip", commit=commit_of(path), inputs={})
        for inp, folder in videos.items():
            kw = dict(features_path=folder, tokenizer=tok, max_words=WORDS, feature_framerate=1, max_frames=FRAMES,
                      slice_framepos=2)
            train = dl.MSRVTT_TrainDataLoader(csv_path=os.path.join(ann, "MSRVTT_train.9k.csv"),
                                              json_path=os.path.join(ann, "MSRVTT_data.json"),
                                              unfold_sentences=True, frame_order=0, **kw)
            test = dl.MSRVTT_DataLoader(csv_path=os.path.join(ann, "MSRVTT_JSFUSION_test.csv"), frame_order=0, **kw)
            out = dict(pairs=dict(train=len(train), test=len(test)), train={}, test={})
            for i, name in enumerate(CLIPS):
                for mode, ds, idx in (("train", train, 20 * i), ("test", test, i)):
                    epochs = []
                    for s in SEEDS[:2]:  # two "epochs": the frames must not change
                        seed_all(s)
                        _, _, _, video, mask = ds[idx]
                        epochs.append(slot_ids(video[0, :, 0], CLIP_MEAN, CLIP_STD))
                    assert epochs[0] == epochs[1], (name, epochs)
                    ids = epochs[0]
                    out[mode][name] = dict(ids=ids, mask=mask[0].tolist(),
                                           positions=positions(ids, compressed_ids[name]) if inp == "compressed"
                                           else ids)
            rec["inputs"][inp] = out
        rec["tokens"] = torch.tensor(np.stack([train._get_text(list(CLIPS)[0], c)[0][0] for c in CAPTIONS]))
        rec["token_mask"] = torch.tensor(np.stack([train._get_text(list(CLIPS)[0], c)[1][0] for c in CAPTIONS]))
        # geometry: PIL bicubic resize of the short side to 224, torchvision centre crop; checked on the pixels
        raw = cv2.cvtColor(paint(0), cv2.COLOR_BGR2RGB)
        ref = np.asarray(Image.fromarray(raw).resize((298, 224), Image.BICUBIC))[0:224, 37:261]
        got = to_pixels(train.rawVideoExtractor.transform(Image.fromarray(raw)), CLIP_MEAN, CLIP_STD)
        rec["geometry"] = dict(raw=dict(resize=[224, 298], crop=[0, 37, 224, 224], interpolation="PIL bicubic"),
                               compressed=dict(resize=[224, 298], crop=[0, 37, 224, 224]),
                               check_max_abs=float(np.abs(got - ref).max()))
    return rec


# ------------------------------------------------------------------------------------------------ Cross-Modal Adapter
def adapter(path, raw, ann, tmp):
    """dataloaders_drl/dataloader_msrvtt_retrieval_images.py (README: --dataset_type img, images/fps_1,
    --max_frames 12, slice_framepos 2, expand_msrvtt_sentences 1, no --train_augment)."""
    with Release(path):
        ru = importlib.import_module("dataloaders_drl.rawvideo_util")
        ds_mod = importlib.import_module("dataloaders_drl.dataloader_msrvtt_retrieval_images")
        tok = importlib.import_module("modules.tokenization_clip").SimpleTokenizer()
        img_root = os.path.join(tmp, "images_fps_1")
        extracted = {}
        for name in CLIPS:  # one folder per video, named <video_id>.mp4 as _get_anns builds the path
            folder = os.path.join(img_root, name + ".mp4")
            os.makedirs(folder, exist_ok=True)
            images = ru.RawVideoExtractor(framerate=1, size=224).get_video_data(
                os.path.join(raw, name + ".mp4"), _no_process=True)["video"]
            for j, im in enumerate(images):
                im.save(os.path.join(folder, f"{j:05d}.png"))
            extracted[name] = [frame_id(np.asarray(im)) for im in images]
        config = SimpleNamespace(train_augment=False, horizontal_flip=False, expand_msrvtt_sentences=1, debug=0,
                                 mq_test=0, no_expand_type="all")
        kw = dict(anno_path=ann, video_path=img_root, tokenizer=tok, max_words=WORDS, max_frames=FRAMES,
                  video_framerate=1, slice_framepos=2, config=config)
        train, test = ds_mod.MSRVTTDataset("train", **kw), ds_mod.MSRVTTDataset("test", **kw)
        rec = dict(repo="LeapLabTHU/Cross-Modal-Adapter", commit=commit_of(path), extracted_1fps=extracted,
                   pairs=dict(train=len(train), test=len(test)), train={}, test={})
        for i, name in enumerate(CLIPS):
            for mode, ds, idx in (("train", train, 20 * i), ("test", test, i)):
                _, _, _, video, mask, vid = ds[idx]
                assert vid == name
                ids = slot_ids(video, CLIP_MEAN, CLIP_STD)
                rec[mode][name] = dict(ids=ids, mask=mask.tolist(), positions=positions(ids, extracted[name]))
        rec["tokens"] = torch.tensor(np.stack([train.proc_text(c)[0] for c in CAPTIONS]))
        rec["token_mask"] = torch.tensor(np.stack([train.proc_text(c)[1] for c in CAPTIONS]))
        rec["geometry"] = dict(resize=[224, 298], crop=[0, 37, 224, 224], interpolation="PIL bicubic")
    return rec


# ------------------------------------------------------------------------------------------------ DGL
def dgl(path, videos, ann, compressed_ids):
    """dataloaders/dataloader_msrvtt_retrieval.py + decode.py + sampling.py as scripts/msrvtt.sh runs them
    (resized_videos at fps=3, --expand_msrvtt_sentences, max_frames 12, max_words 32)."""
    with Release(path):
        dl = importlib.import_module("dataloaders.dataloader_msrvtt_retrieval")
        sampling = importlib.import_module("dataloaders.sampling")
        tok = load_file("dgl_simple_tokenizer", os.path.join(path, "modules", "simple_tokenizer.py")).SimpleTokenizer()
        rec = dict(repo="knightyxp/DGL", commit=commit_of(path), inputs={})
        for inp, folder in videos.items():
            kw = dict(features_path=folder, tokenizer=tok, max_words=WORDS, feature_framerate=3, max_frames=FRAMES,
                      slice_framepos=2)
            train = dl.MSRVTT_TrainDataLoader(csv_path=os.path.join(ann, "MSRVTT_train.9k.csv"),
                                              json_path=os.path.join(ann, "MSRVTT_data.json"),
                                              unfold_sentences=True, **kw)
            test = dl.MSRVTT_DataLoader(csv_path=os.path.join(ann, "MSRVTT_JSFUSION_test.csv"), **kw)
            out = dict(pairs=dict(train=len(train), test=len(test)), train={}, test={})
            for i, name in enumerate(CLIPS):
                file_ids = compressed_ids[name] if inp == "compressed" else list(range(CLIPS[name][1]))
                _, _, _, video, mask = test[i]
                ids = slot_ids(video[0], CLIP_MEAN, CLIP_STD)
                out["test"][name] = dict(ids=ids, mask=mask[0].tolist(), positions=positions(ids, file_ids))
                draws = []
                for s in SEEDS:
                    seed_all(s)
                    _, _, _, video, mask = train[20 * i]
                    ids = slot_ids(video[0], CLIP_MEAN, CLIP_STD)
                    draws.append(dict(ids=ids, mask=mask[0].tolist(), positions=positions(ids, file_ids)))
                out["train"][name] = draws
            rec["inputs"][inp] = out
            if inp == "raw":  # the raw clip's test frame is its unresized centre 224 x 224 (mp4v noise aside)
                pix = to_pixels(test[0][3][0, 0], CLIP_MEAN, CLIP_STD)
                ref = cv2.cvtColor(paint(out["test"][list(CLIPS)[0]]["ids"][0]), cv2.COLOR_BGR2RGB)[8:232, 48:272]
                check = float(np.abs(pix - ref).mean())
        # the rule, on frame counts alone: segments of n // 12 frames, one random frame in each (numpy RNG)
        counts = (8, 12, 30, 31, 32, 33, 47, 300, 312, 450)
        rec["train_rule"] = {n: [sampling.multi_segments_sampling(FRAMES, n, random_shift=True).tolist()
                                 for _ in range(3)] for n in counts}
        rec["test_rule"] = {n: sampling.uniform_sampling(FRAMES, n).tolist() for n in counts}
        rec["tokens"] = torch.tensor(np.stack([train._get_text(list(CLIPS)[0], c)[0][0] for c in CAPTIONS]))
        rec["token_mask"] = torch.tensor(np.stack([train._get_text(list(CLIPS)[0], c)[1][0] for c in CAPTIONS]))
        rec["geometry"] = dict(compressed=dict(resize=None, crop=[0, 37, 224, 224]),
                               raw=dict(resize=None, crop=[8, 48, 224, 224]), interpolation=None)
        rec["geometry"]["check_raw_mean_abs"] = check
    return rec


# ------------------------------------------------------------------------------------------------ UMP
def ump(path, videos, ann, tmp):
    """datasets/msrvtt_dataset.py + video_capture.py + model_transforms.py with run_msrvtt.sh's flags."""
    work = os.path.join(tmp, "ump_cwd")
    os.makedirs(os.path.join(work, "data", "MSRVTT"), exist_ok=True)
    for f in ("MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv", "MSRVTT_JSFUSION_test.csv"):
        with open(os.path.join(ann, f)) as src, open(os.path.join(work, "data", "MSRVTT", f), "w") as dst:
            dst.write(src.read())
    cwd, argv = os.getcwd(), sys.argv
    os.chdir(work)
    try:
        with Release(path):
            from torchvision import transforms as T
            all_config = importlib.import_module("config.all_config")
            ds_mod = importlib.import_module("datasets.msrvtt_dataset")
            tfm = importlib.import_module("datasets.model_transforms")
            vc = importlib.import_module("datasets.video_capture").VideoCapture
            tok = importlib.import_module("modules.tokenization_clip").SimpleTokenizer(bpe_path=BPE)
            rec = dict(repo="zchoi/UMP_TVR", commit=commit_of(path), inputs={})
            boxes = []
            get_params = T.RandomResizedCrop.get_params
            spy = staticmethod(lambda *a, **k: boxes.append(get_params(*a, **k)) or boxes[-1])
            T.RandomResizedCrop.get_params = spy
            try:
                for inp, folder in videos.items():
                    sys.argv = ["train.py", "--exp_name=oracle", f"--videos_dir={folder}", "--batch_size=32",
                                "--noclip_lr=3e-5", "--transformer_dropout=0.3", "--dataset_name=MSRVTT",
                                "--msrvtt_train_file=9k"]
                    config = all_config.AllConfig()
                    tf = tfm.init_transform_dict(config.input_res)
                    train = ds_mod.MSRVTTDataset(config, "train", tf["clip_train"])
                    test = ds_mod.MSRVTTDataset(config, "test", tf["clip_test"])
                    out = dict(pairs=dict(train=len(train), test=len(test)), settings=dict(
                        num_frames=config.num_frames, video_sample_type=config.video_sample_type,
                        input_res=config.input_res), train={}, test={})
                    for i, name in enumerate(CLIPS):
                        raw, idxs = vc.load_frames_from_video(os.path.join(folder, name + ".mp4"), config.num_frames,
                                                              config.video_sample_type)
                        ids = [frame_id(f.permute(1, 2, 0).numpy() * 255) for f in raw]
                        item = test[i]
                        assert item["video_id"] == name
                        got = slot_ids(item["video"], CLIP_MEAN, CLIP_STD)
                        assert got == ids, (got, ids)
                        out["test"][name] = dict(ids=ids, positions=list(idxs) + [idxs[-1]] * (len(ids) - len(idxs)),
                                                 mask=[1] * len(ids))
                        draws = []
                        for s in SEEDS:
                            seed_all(s)
                            boxes.clear()
                            video = train[20 * i]["video"]
                            (top, left, h, w), = boxes
                            ref = F.interpolate(raw[:, :, top:top + h, left:left + w], size=(224, 224),
                                                mode="bilinear", align_corners=False, antialias=True)
                            ref = (ref - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
                            err = [float((video - r).abs().max()) for r in (ref, ref.flip(-1))]
                            flip = int(err[1] < err[0])
                            assert min(err) < 1e-4, err
                            draws.append(dict(ids=ids, box=[top, left, h, w], flip=flip,
                                              frame_hw=list(raw.shape[-2:])))
                        out["train"][name] = draws
                    rec["inputs"][inp] = out
            finally:
                T.RandomResizedCrop.get_params = get_params
            rec["tokens"] = tok(CAPTIONS)  # [3, 77]: SOT ids EOT zero-padded, no truncation (raises past 77)
            rec["geometry"] = dict(test=dict(resize=[224, 298], crop=[0, 37, 224, 224],
                                             interpolation="torchvision bicubic antialias on the float tensor"),
                                   train=dict(scale=[0.5, 1.0], ratio=[3 / 4, 4 / 3], interpolation="bilinear",
                                              flip_p=0.5, per="clip (one draw for all 12 frames)"))
    finally:
        os.chdir(cwd)
        sys.argv = argv
    return rec


# ------------------------------------------------------------------------------------------------ SimVTP
def simvtp(path, raw, tmp):
    """datasets.py MSRVTT + build_datasets.py as scripts/finetune_msrvtt.sh runs them: --num_frames 16
    --sampling_rate 4 --input_size 224 --short_side_size 224 --test_num_segment 3 --test_num_crop 3
    --num_sample 1; --aa, --reprob, --train_interpolation at their defaults."""
    if "numpy.lib.function_base" not in sys.modules:  # gone in numpy 2; datasets.py imports an unused name
        try:
            importlib.import_module("numpy.lib.function_base")
        except ImportError:
            sys.modules["numpy.lib.function_base"] = SimpleNamespace(disp=print)
    with Release(path):
        datasets = importlib.import_module("datasets")
        vt = importlib.import_module("video_transforms")
        ann = {}
        for split in ("train", "test"):  # {video path: caption}, the format DATA.md gives
            ann[split] = os.path.join(tmp, f"simvtp_{split}.json")
            with open(ann[split], "w") as f:
                json.dump({os.path.join(raw, n + ".mp4"): CAPTIONS[i % 3] for i, n in enumerate(CLIPS)}, f)
        args = SimpleNamespace(reprob=0.25, remode="pixel", recount=1, num_sample=1, aa="rand-m7-n4-mstd0.5-inc1",
                               train_interpolation="bicubic", data_set="MSRVTT")
        kw = dict(data_path="/", clip_len=16, frame_sample_rate=4, num_segment=1, test_num_segment=3,
                  test_num_crop=3, keep_aspect_ratio=True, crop_size=224, short_side_size=224, new_height=256,
                  new_width=320, args=args)
        train = datasets.MSRVTT(ann["train"], mode="train", num_crop=1, **kw)
        test = datasets.MSRVTT(ann["test"], mode="test", num_crop=3, **kw)
        rec = dict(repo="wufeim/SimVTP", commit=commit_of(path), pairs=dict(train=len(train), test=len(test)),
                   train={}, test={})
        crops, flips = [], []
        get_crop, hflip = vt._get_param_spatial_crop, vt.horizontal_flip

        def spy_flip(prob, images, boxes=None):
            out, b = hflip(prob, images, boxes)
            flips.append(int(not torch.equal(out, images)))
            return out, b

        vt._get_param_spatial_crop = lambda *a, **k: crops.append(get_crop(*a, **k)) or crops[-1]
        vt.horizontal_flip = spy_flip
        try:
            for i, name in enumerate(CLIPS):
                draws = []
                for s in SEEDS:
                    seed_all(s)
                    buf = train.loadvideo_decord(train.dataset_samples[i])
                    ids = [frame_id(f) for f in buf]
                    seed_all(s)
                    crops.clear(), flips.clear()
                    video, text, index, _ = train[i]
                    assert index == i and video.shape == (3, 16, 224, 224)
                    (top, left, h, w), = crops
                    draws.append(dict(ids=ids, box=[top, left, h, w], flip=flips[0], mask=[1] * len(ids)))
                rec["train"][name] = draws
                views = []
                for ck in range(3):
                    for cp in range(3):
                        j = (ck * 3 + cp) * len(CLIPS) + i
                        video, text, vid, chunk, split = test[j]
                        assert (chunk, split) == (ck, cp) and vid == name[len("video"):]
                        pix = to_pixels(video.permute(1, 0, 2, 3), IMAGENET_MEAN, IMAGENET_STD)  # [16, H, W, 3]
                        left, right = ramp_ends(pix[0])
                        views.append(dict(chunk=ck, crop=cp, ids=[frame_id(f) for f in pix],
                                          ramp_left=round(left * 319 / 255, 1), ramp_right=round(right * 319 / 255, 1),
                                          hw=list(pix.shape[1:3])))
                rec["test"][name] = views
        finally:
            vt._get_param_spatial_crop, vt.horizontal_flip = get_crop, hflip
        rec["geometry"] = dict(
            train=dict(randaugment="rand-m7-n4-mstd0.5-inc1 (one op draw per clip)", scale=[0.08, 1.0],
                       ratio=[0.75, 1.3333], interpolation="bilinear (F.interpolate on the tensor)", flip_p=0.5,
                       random_erasing=dict(p=0.25, mode="pixel", count=1), mean=IMAGENET_MEAN, std=IMAGENET_STD),
            test=dict(resize=[224, 298], interpolation="cv2 INTER_LINEAR", crops_left=[0, 37, 74],
                      crop=[224, 224], mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return rec


# ------------------------------------------------------------------------------------------------ main
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("clip4clip", "unipt", "adapter", "dgl", "ump", "simvtp"):
        p.add_argument(f"--{name}", required=True, help=f"checkout of the official {name} repository")
    p.add_argument("--out", default=FIXTURE)
    args = p.parse_args()
    if not hasattr(np, "float"):
        np.float = float  # removed in numpy 1.24; the CLIP4Clip-family loaders allocate with dtype=np.float
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        raw, comp, ann = (os.path.join(tmp, d) for d in ("raw", "compressed", "ann"))
        for d in (raw, ann):
            os.makedirs(d)
        for name, spec in CLIPS.items():
            write_clip(os.path.join(raw, name + ".mp4"), spec)
            assert decoded_ids(os.path.join(raw, name + ".mp4")) == list(range(spec[1])), name
        write_annotation(ann)
        compressed = compress_clips(args.dgl, raw, comp)
        both = dict(raw=raw, compressed=comp)
        fix = dict(clips={n: dict(fps=f, frames=c, width=SIZE[0], height=SIZE[1]) for n, (f, c) in CLIPS.items()},
                   compressed={n: dict(fps=3.0, width=298, height=224, ids=ids) for n, ids in compressed.items()},
                   captions=CAPTIONS, frames=FRAMES, words=WORDS, seeds=list(SEEDS))
        fix["clip4clip"] = clip4clip_family(args.clip4clip, both, ann, compressed)
        fix["unipt"] = clip4clip_family(args.unipt + "/CLIP4Clip", both, ann, compressed, unipt=True)
        fix["unipt"]["commit"] = commit_of(args.unipt)
        fix["adapter"] = adapter(args.adapter, raw, ann, tmp)
        fix["dgl"] = dgl(args.dgl, both, ann, compressed)
        fix["ump"] = ump(args.ump, both, ann, tmp)
        fix["simvtp"] = simvtp(args.simvtp, raw, tmp)
    import av
    import decord
    ffmpeg = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    fix["provenance"] = dict({m: dict(repo=fix[m]["repo"], commit=fix[m]["commit"]) for m in
                              ("clip4clip", "unipt", "adapter", "dgl", "ump", "simvtp")},
                             torch=str(torch.__version__), opencv=cv2.__version__, numpy=np.__version__,
                             pyav=av.__version__, decord=decord.__version__, ffmpeg=ffmpeg,
                             python=sys.version.split()[0])
    torch.save(plain(fix), args.out)
    torch.load(args.out, weights_only=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
