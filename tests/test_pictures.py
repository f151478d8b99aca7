"""retrievals.png's layout, and what a training run leaves behind: the picture, rounded log.jsonl, one line per
epoch, the table once, the pretraining checkpoint's name."""
import errno
import json
import os

import cv2
import numpy as np
import pytest
import torch

import data
import files
import pictures
import run_folder
import train
from conftest import make_run_dir
from messages import assert_tells


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
    lines = console.splitlines()
    epoch, = [x for x in lines if x.startswith("epoch 1/1")]  # it stays: where it ended, loss, metrics
    assert_tells(epoch, "step 3", "loss", "t2v", "R@1", "R@5")
    step, = [x for x in lines if x.startswith("epoch 1 step 1/3")]  # the first step, as a plain line (no tty)
    assert_tells(step, "loss")
    assert "\r" not in console + captured.err  # no progress bar off a terminal
    assert console.count("R@10    MdR") == 1  # the table once, at the end
    final, = [x for x in lines if x.startswith("final")]
    assert_tells(final, "epoch 1 of 1")  # which epoch the table is of
    assert "DSL rows" in console and "transductive" in console
    floats = []
    walk = lambda x: [walk(v) for v in x.values()] if isinstance(x, dict) else floats.append(x)
    for line in open(out / "log.jsonl"):
        walk(json.loads(line))
    floats = [x for x in floats if isinstance(x, float)]
    assert len(floats) > 30 and all(float(f"{x:.6g}") == x for x in floats)  # 6 significant digits at most
    assert run_folder.rounded(dict(a=3.5000000000000004, b=dict(c=1 / 3, n=7), s="x")) == dict(a=3.5, b=dict(c=0.333333, n=7), s="x")


def test_simvtp_pretraining_names_its_checkpoint(tiny_run, capsys):
    out = tiny_run / "pretrain"
    train.main(["--method", "simvtp", "--stage", "pretrain", "--data_path", str(tiny_run / "synthetic"),
                "--output_dir", str(out), "--num_workers", "0", "--batch_size", "8", "--max_steps", "1"])
    assert_tells(capsys.readouterr().out, "pretraining", f"--init {out / 'checkpoint.pt'}")  # the file and its flag


def test_a_full_disk_costs_no_result(setup, tmp_path, capsys, monkeypatch):
    """Every write of an evaluation fails (ENOSPC): the metrics are printed first and the run ends normally,
    each failed file named in one WARNING; nothing half-written is left."""
    def full(path, write, suffix=""):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files, "atomic_write", full)
    tmp_path.joinpath("out").mkdir()
    metrics = train.main(["--method", "zeroshot", "--data_path", str(setup / "synthetic"), "--clip",
                          str(setup / "clip.pt"), "--output_dir", str(tmp_path / "out"), "--num_workers", "0",
                          "--max_frames", "2", "--max_words", "16"])
    out, err = capsys.readouterr()
    assert metrics and "R@1" in out and "Traceback" not in err
    assert err.count("WARNING: could not write") == 2 and "No space left" in err  # the record and the picture
    assert os.listdir(tmp_path / "out") == []
