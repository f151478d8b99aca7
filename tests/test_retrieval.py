"""Retrieval you can look at: retrievals.png's layout, the query mode (right clip, cached video features
reused and invalidated), --data folder, the frame cache's manifest, and what a training run leaves behind
(the picture, rounded log.jsonl, one line per epoch, the table once)."""
import json
import os
import re
from contextlib import nullcontext
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import data
import data_checks
import frame_cache
import methods
import pictures
import query
import run_folder
import train
from conftest import make_run_dir

COLOURS = dict(red=(0, 0, 255), green=(0, 255, 0), blue=(255, 0, 0))  # BGR


def write_clip(path, bgr, n=4, size=16):
    data.write_video(str(path), [np.full((size, size, 3), bgr, np.uint8) for _ in range(n)])


def grey_split(tmp_path, n=8):
    """n tiny clips, caption i describes clip i."""
    videos = []
    for i in range(n):
        write_clip(tmp_path / f"clip{i}.mp4", (20 * i,) * 3)
        videos.append(str(tmp_path / f"clip{i}.mp4"))
    return data.Split("toy-test", videos, [f"caption number {i} " + "long words " * 3 * i for i in range(n)],
                      list(range(n)))


def green_boxes(page):
    """Count the green borders: each is two horizontal bands (top and bottom) of >= 100 green pixels."""
    green = np.all(page == pictures.GREEN, axis=-1)
    bands, inside = 0, False
    for row in green:
        runs = np.diff(np.concatenate([[0], row.astype(int), [0]]))
        longest = max((e - s for s, e in zip(np.where(runs == 1)[0], np.where(runs == -1)[0])), default=0)
        bands += longest >= 100 and not inside
        inside = longest >= 100
    return bands // 2  # a band of the right width per edge; several rows each


def separators(page):
    """Rows of the page that are the light line between caption rows (full width inside the margins)."""
    inner = page[:, pictures.MARGIN:page.shape[1] - pictures.MARGIN]
    return int(np.all(inner == pictures.LIGHT, axis=(1, 2)).sum())


def test_retrievals_png_layout(tmp_path):
    split = grey_split(tmp_path)
    sim = torch.eye(8) * 10  # every caption finds its clip first ...
    sim[7] = torch.arange(8.0)  # ... but caption 7, whose clip scores highest: rank 1 as well
    sim[6] = -torch.arange(8.0)  # caption 6's clip scores lowest but one: rank 7, outside the top 5
    rows = pictures.retrieval_rows(split, sim)
    assert [r["index"] for r in rows] == [0, 1, 3, 4, 6, 7]  # evenly spaced, fixed
    assert [r["rank"] for r in rows] == [1, 1, 1, 1, 7, 1]
    assert [v for v, _ in rows[4]["top"]] == [0, 1, 2, 3, 4] and rows[4]["true_score"] == -6
    path = tmp_path / "retrievals.png"
    pictures.write_retrievals(str(path), split, sim, "toy")
    page = cv2.imread(str(path))
    cell = pictures.PICTURE_FRAMES * pictures.THUMB + 2 * (pictures.PICTURE_FRAMES - 1) + 2 * pictures.BORDER
    columns = pictures.PICTURE_TOP + 1  # caption 6's clip in a column of its own
    assert page.shape[1] == 2 * pictures.MARGIN + columns * cell + (columns - 1) * pictures.GAP
    assert separators(page) == len(rows) == 6
    assert green_boxes(page) == 6  # each caption's own clip, once
    assert (page == 255).all(-1).mean() > 0.5  # a white page
    # the long captions wrap inside the page instead of running off it: nothing drawn in the right margin
    assert (page[:, -pictures.MARGIN + 2:] == 255).all()
    lines = pictures.wrap(split.captions[7], 400)
    assert len(lines) > 3 and " ".join(lines) == split.captions[7].strip()
    assert max(cv2.getTextSize(x, pictures.FONT, pictures.TEXT, 1)[0][0] for x in lines) <= 400
    sim[6] = torch.eye(8)[6] * 10  # every clip in its top 5: no extra column
    page = pictures.write_retrievals(str(path), split, sim, "toy")
    assert page.shape[1] == 2 * pictures.MARGIN + 5 * cell + 4 * pictures.GAP and green_boxes(page) == 6


class ColourToy(torch.nn.Module):
    """A method whose answer is certain: a video is its mean colour, a caption the colour words it names."""
    uses_clip = False
    normalize_pixels = staticmethod(lambda video: video.float() / 255)
    similarity = None

    def __init__(self, num_frames, size=16):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))
        self.logit_scale = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        self.words = torch.tensor([data.tokenize(c, 3)[1] for c in ("red", "green", "blue")])  # their BPE ids
        self.video_calls = 0

    def param_groups(self, weight_decay):
        return [dict(params=[self.gain], weight_decay=0.0)]

    def encode_text(self, text):  # [B, L] -> [B, 3]: which of red, green, blue the caption names
        return (text[:, :, None] == self.words).any(1).float() * self.gain

    def encode_video(self, video, video_mask):  # [B, T, 3, S, S] -> mean RGB [B, 3]
        self.video_calls += 1
        return video.mean((1, 3, 4)) + 0.01


@pytest.fixture
def colour_folder(tmp_path):
    """A folder of three one-colour clips (one nested, upper-case extension) and a file that is no video."""
    (tmp_path / "clips" / "more").mkdir(parents=True)
    write_clip(tmp_path / "clips" / "red.mp4", COLOURS["red"])
    write_clip(tmp_path / "clips" / "more" / "green.MP4", COLOURS["green"])
    write_clip(tmp_path / "clips" / "blue.avi", COLOURS["blue"])
    (tmp_path / "clips" / "notes.txt").write_text("not a video")
    return tmp_path / "clips"


def test_folder_reader(colour_folder, tmp_path):
    split = data.read_split("folder", "test", None, str(colour_folder))
    assert [os.path.relpath(v, colour_folder) for v in split.videos] == ["blue.avi", "more/green.MP4", "red.mp4"]
    assert split.captions == [] and split.caption_video == [] and all(os.path.isabs(v) for v in split.videos)
    ds = data.VideoTextDataset(split, frames=2, words=8, size=8, train=False, mode="videos")
    assert len(ds) == 3 and ds[1]["video"].shape == (2, 3, 8, 8) and ds[1]["video_mask"].all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no video files"):
        data.read_folder(str(tmp_path / "empty"))


def query_args(tmp_path, checkpoint, **kw):
    return SimpleNamespace(**{**dict(method="toy", kwargs={}, data="folder", checkpoint=str(checkpoint), clip=None,
                                      init=None, frames=2, words=16, size=8, frame_cache=None, batch_size_val=2,
                                      num_workers=0, output_dir=str(tmp_path), top_k=5), **kw})


def test_query_finds_the_clip_and_caches_video_features(colour_folder, tmp_path, capsys):
    split = data.read_folder(str(colour_folder))
    ck = tmp_path / "checkpoint.pt"
    torch.save(dict(model=dict(gain=torch.ones(()))), ck)
    method, args = ColourToy(2), query_args(tmp_path, ck)
    hits = query.search(method, "a green circle", split, query_args(tmp_path, ck, top_k=2), "cpu", nullcontext(),
                        picture=str(tmp_path / "query.png"))
    assert os.path.basename(hits[0][0]) == "green.MP4" and len(hits) == 2 and hits[0][1] > hits[1][1]
    assert method.video_calls == 2  # 3 videos in batches of 2
    out = capsys.readouterr().out
    assert "green.MP4" in out and "encoded 3 videos" in out
    assert cv2.imread(str(tmp_path / "query.png")).shape[1] > 2 * pictures.THUMB
    caches = [f for f in os.listdir(tmp_path) if f.startswith("checkpoint.pt.videos-")]
    assert len(caches) == 1
    # a second query: the cached features, no video encoded
    hits = query.search(method, "something blue", split, args, "cpu", nullcontext())
    assert os.path.basename(hits[0][0]) == "blue.avi" and method.video_calls == 2
    assert "from " + str(tmp_path / caches[0]) in capsys.readouterr().out
    # the checkpoint changes: encoded again, and the stale cache removed
    torch.save(dict(model=dict(gain=2 * torch.ones(()))), ck)
    query.search(method, "a red one", split, args, "cpu", nullcontext())
    assert method.video_calls == 4
    after = [f for f in os.listdir(tmp_path) if f.startswith("checkpoint.pt.videos-")]
    assert len(after) == 1 and after != caches
    # other frame settings are another cache, the checkpoint's first one stays
    query.search(method, "a red one", split, query_args(tmp_path, ck, frames=3), "cpu", nullcontext())
    assert method.video_calls == 6
    assert len([f for f in os.listdir(tmp_path) if f.startswith("checkpoint.pt.videos-")]) == 2
    # so is another split, read with another --data: the same model, so nothing is removed
    other = data.Split("other", split.videos[:2], [], [])
    query.search(method, "a red one", other, query_args(tmp_path, ck, data="msrvtt"), "cpu", nullcontext())
    assert method.video_calls == 7
    assert len([f for f in os.listdir(tmp_path) if f.startswith("checkpoint.pt.videos-")]) == 3


def test_query_script(colour_folder, tmp_path, monkeypatch, capsys):
    """python query.py --data folder --video_path DIR --checkpoint CK --query ...: the model as its run built it;
    python train.py with --query runs the same."""
    monkeypatch.setitem(methods.METHODS, "toy", (ColourToy, dict(lr=1e-3, epochs=1, batch_size=2, frames=2, words=16,
                                                               weight_decay=0.0, warmup=0.1, grad_clip=1.0), {}))
    ck = tmp_path / "checkpoint.pt"
    torch.save(dict(model=dict(gain=torch.ones(())), args=dict(method="toy", data="synthetic", data_path=None,
                                                                clip="unused.pt", frames=3, words=16, size=8,
                                                                kwargs={})), ck)
    argv = ["--method", "toy", "--data", "folder", "--video_path", str(colour_folder), "--checkpoint", str(ck),
            "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]
    hits = query.main(argv + ["--query", "the red clip", "--top_k", "3"])
    assert [os.path.basename(v) for v, _ in hits][0] == "red.mp4" and len(hits) == 3
    assert os.path.isfile(tmp_path / "out" / "query.png")
    assert "--max_frames 3" in capsys.readouterr().out  # frames from the checkpoint's run
    assert train.main(argv + ["--query", "the red clip", "--top_k", "3"]) == hits
    with pytest.raises(SystemExit):
        train.parse_args(argv)  # no --query
    assert "--data folder is for --query only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "ump", "--query", "a red circle"])  # a method that trains, no checkpoint
    assert "needs --checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A synthetic set of 24 training pairs and 8 test clips, and a random tiny CLIP."""
    return make_run_dir(tmp_path_factory.mktemp("run"), n_train=8)


def test_training_run_leaves_picture_rounded_log_and_readable_console(tiny_run, capsys):
    out = tiny_run / "out"
    train.main(["--method", "full", "--data_path", str(tiny_run / "synthetic"), "--clip", str(tiny_run / "clip.pt"),
                "--output_dir", str(out), "--num_workers", "0", "--max_frames", "4", "--batch_size", "8",
                "--epochs", "1", "--clip_lr", "1e-3", "--log_every", "2", "--dsl"])
    captured = capsys.readouterr()
    console = captured.out
    page = cv2.imread(str(out / "retrievals.png"))
    assert separators(page) == 6 and green_boxes(page) == 6  # 6 of the 8 test captions
    assert re.search(r"^epoch 1/1: step 3, loss [\d.]+, \d+ s; t2v R@1 [\d.]+ R@5", console, re.M)  # it stays
    assert re.search(r"^epoch 1 step 1/3: loss", console, re.M)  # the first step, as a plain line (no tty)
    assert "\r" not in console + captured.err  # no progress bar off a terminal
    assert console.count("R@10    MdR") == 1  # the table once, at the end
    assert "after epoch 1 of 1" in console
    assert "DSL rows" in console and "transductive" in console
    floats = []
    walk = lambda x: [walk(v) for v in x.values()] if isinstance(x, dict) else floats.append(x)
    for line in open(out / "log.jsonl"):
        walk(json.loads(line))
    floats = [x for x in floats if isinstance(x, float)]
    assert len(floats) > 30 and all(float(f"{x:.6g}") == x for x in floats)  # 6 significant digits at most
    assert run_folder.rounded(dict(a=3.5000000000000004, b=dict(c=1 / 3, n=7), s="x")) == dict(a=3.5, b=dict(c=0.333333, n=7), s="x")


def test_frame_cache_manifest_refuses_and_warns(tmp_path, capsys):
    videos = []
    for k, n in enumerate((3, 8)):
        write_clip(tmp_path / f"v{k}.mp4", (50, 50, 50), n=n)
        videos.append(str(tmp_path / f"v{k}.mp4"))
    cache = str(tmp_path / "cache")
    assert frame_cache.build_frame_cache(videos, cache, size=16, fps=0) == []
    manifest = json.load(open(os.path.join(cache, data_checks.MANIFEST)))
    assert manifest == dict(size=16, fps=0, max_seconds=None, frames={"v0.mp4": 3, "v1.mp4": 8})
    with pytest.raises(data.DataError, match="made with"):
        frame_cache.build_frame_cache(videos, cache, size=32, fps=0)  # never mix two settings in one folder
    split = data.Split("t", videos, ["a", "b"], [0, 1])
    with pytest.raises(data.DataError, match="16 px frames, this run uses 32 px"):
        data.VideoTextDataset(split, frames=4, words=8, size=32, train=False, frame_cache=cache)
    capsys.readouterr()
    data.VideoTextDataset(split, frames=4, words=8, size=8, train=False, frame_cache=cache)
    err = capsys.readouterr().err
    assert "every load resizes" in err and "1 of 2 clips" in err and "fewer than 4 frames" in err
    data.VideoTextDataset(split, frames=4, words=8, size=8, train=False, frame_cache=cache)
    assert capsys.readouterr().err == ""  # said once per process
    data.VideoTextDataset(split, frames=2, words=8, size=16, train=False, frame_cache=cache)
    assert capsys.readouterr().err == ""  # the run's settings: nothing to say


def test_simvtp_pretraining_names_its_checkpoint(tiny_run, capsys):
    out = tiny_run / "pretrain"
    train.main(["--method", "simvtp", "--stage", "pretrain", "--data_path", str(tiny_run / "synthetic"),
                "--output_dir", str(out), "--num_workers", "0", "--batch_size", "8", "--max_steps", "1"])
    assert f"pretraining checkpoint: {out / 'checkpoint.pt'}; fine-tune from it with --init" in capsys.readouterr().out
