"""Each method's input pipeline against its release's own loader: tests/fixtures/official_pipelines.pt holds what
the releases' dataset classes returned on frame-ID clips (frame k painted with k in binary; made by
tests/oracles/make_pipeline_fixtures.py, docs/equivalence.md): the frames chosen in training and test, the valid
mask, UMP's crop boxes and flips, SimVTP's windows. data.py must choose the same frames by the same rules."""
import os
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import data
import frames
import methods

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "oracles"))
from make_pipeline_fixtures import CLIPS, frame_id, write_clip  # noqa: E402 (the clips the fixture was made on)

FIX = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "official_pipelines.pt"), weights_only=True)
RULES = [("clip4clip", "clip4clip"), ("unipt", "clip4clip"), ("adapter", "clip4clip"), ("ump", "uniform")]


def records(release, mode):
    rec = FIX[release]["inputs"]["raw"] if "inputs" in FIX[release] else FIX[release]
    return rec[mode]


@pytest.mark.parametrize("release, sampling", RULES)
@pytest.mark.parametrize("train", [False, True])
def test_frames_and_mask_as_the_release(release, sampling, train):
    for name, clip_ in FIX["clips"].items():
        rec = records(release, "train" if train else "test")[name]
        rec = rec[0] if isinstance(rec, list) else rec  # the random modes hold several seeded draws
        idx, valid = frames.sample_frames(clip_["frames"], clip_["fps"], 12, sampling, train)
        ids = [i for i in rec["ids"] if i >= 0]  # -1: a zero-padded slot
        assert idx == ids, (release, name)
        assert valid == sum(rec.get("mask", [1] * 12)), (release, name)  # UMP has no mask: all 12 count


def test_the_recipes_choose_the_releases_rules():
    expected = dict(full="clip4clip", zeroshot="clip4clip", unipt="clip4clip", adapter="clip4clip", ump="uniform",
                    dgl="dgl", simvtp="window")
    for name, sampling in expected.items():
        _, recipe, per_set = methods.METHODS[name]
        assert recipe["sampling"] == sampling and "sampling" not in per_set.get("msrvtt", {})
    assert methods.METHODS["ump"][1]["augment"] == "crop_flip" and methods.METHODS["simvtp"][1]["pairs"] == "video"


def test_dgl_rules():
    for n, offsets in FIX["dgl"]["test_rule"].items():  # uniform_sampling: int(tick/2 + tick*x), 19.999 -> 19
        assert frames.sample_frames(n, 3, 12, "dgl", train=False)[0] == list(offsets), n
    torch.manual_seed(0)
    for n, draws in FIX["dgl"]["train_rule"].items():
        ours = [frames.sample_frames(n, 3, 12, "dgl", train=True) for _ in range(50)]
        for idx, valid in ours + [(d, min(n, 12)) for d in draws]:  # theirs follow the same rule as ours
            if n < 12:  # the last frame repeated, n valid
                assert idx == list(range(n)) + [n - 1] * (12 - n) and valid == n
            else:  # segments of n // 12: the last n mod 12 frames never drawn
                assert all(k * (n // 12) <= i < (k + 1) * (n // 12) for k, i in enumerate(idx)), (n, idx)
        if n >= 24:
            assert len({tuple(i) for i, _ in ours}) > 1  # random in training


def test_simvtp_window_rules():
    torch.manual_seed(0)
    for name, clip_ in FIX["clips"].items():
        n = clip_["frames"]
        draws = [rec["ids"] for rec in FIX["simvtp"]["train"][name]]
        ours = [frames.sample_frames(n, clip_["fps"], 16, "window", train=True)[0] for _ in range(50)]
        for idx in draws + ours:
            if n > 64:  # 16 frames at stride ~4.27 from one window of 64, start in [0, n - 65]
                assert 0 <= idx[0] <= n - 65 and idx == (idx[0] + np.linspace(0, 64, 16).clip(0, 63)).astype(int).tolist()
            else:
                assert idx == draws[0]  # deterministic on a short clip
        middle = [r["ids"] for r in FIX["simvtp"]["test"][name] if r["chunk"] == 1][0]
        assert frames.sample_frames(n, clip_["fps"], 16, "window", train=False)[0] == middle  # simvtp.py deviation 9: one view


def test_decoded_frames_are_the_chosen_ones(tmp_path):
    """Through OpenCV: each slot holds the frame the rule chose (repeats included), in slot order."""
    for name in ("video9003", "video9004", "video9005"):
        path = str(tmp_path / f"{name}.mp4")
        write_clip(path, CLIPS[name])
        for release, sampling in RULES:
            decoded, valid = data.read_clip(path, 12, False, sampling)
            ids = [i for i in records(release, "test")[name]["ids"] if i >= 0]
            assert [frame_id(f) for f in decoded] == ids, (name, release)


def test_ump_crop_and_flip_draws_equal_the_release(tmp_path):
    """One RandomResizedCrop box and flip per clip from torch's generator: under the same seed, the release's
    (torchvision in its dataset) and ours draw the very same box and flip."""
    for s, rec in zip(FIX["seeds"], records("ump", "train")["video9001"]):
        torch.manual_seed(s)
        box = T.RandomResizedCrop.get_params(torch.zeros(1, 3, 240, 320), scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
        assert list(box) == rec["box"] and bool(torch.rand(()) < 0.5) == bool(rec["flip"])
    path = str(tmp_path / "clip.mp4")
    write_clip(path, CLIPS["video9001"])
    decoded, _ = data.read_clip(path, 12, True, "uniform")
    x = torch.from_numpy(decoded).permute(0, 3, 1, 2)  # [12, 3, 240, 320]
    torch.manual_seed(0)  # seed 0: the release drew box (0, 14, 222, 259) and a flip, for the whole clip
    out = frames.crop_flip(x, 32)
    box = TF.resized_crop(x, 0, 14, 222, 259, [32, 32], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    assert out.dtype == torch.uint8 and torch.equal(out, box.flip(-1))

def test_simvtp_trains_on_one_caption_per_video():
    split = data.Split(name="x", videos=["a", "b", "c"], captions=["a1", "b1", "a2", "c1", "b2"],
                       caption_video=[0, 1, 0, 2, 1])
    one = data.one_caption_per_video(split)
    assert one.captions == ["a1", "b1", "c1"] and one.caption_video == [0, 1, 2] and one.videos == split.videos


@pytest.mark.parametrize("method, extra, pairs", [
    ("simvtp", ["--width", "64", "--depth", "1", "--heads", "1", "--patch_size", "8", "--size", "32"], 24),
    ("full", ["--clip_lr", "1e-4"], 72)])
def test_training_pairs_on_an_msrvtt_layout(setup, tmp_path, capsys, method, extra, pairs):
    """The synthetic set is written in MSR-VTT's layout (24 clips x 3 captions here): read as --data msrvtt, SimVTP
    trains on one pair per video as its release, the others on one per caption."""
    import train
    clip_flag = [] if method == "simvtp" else ["--clip", str(setup / "clip.pt")]
    train.main(["--method", method, "--data", "msrvtt", "--data_path", str(setup / "synthetic"),
                "--video_path", str(setup / "synthetic" / "videos"), "--output_dir", str(tmp_path), "--num_workers",
                "0", "--max_frames", "2", "--batch_size", "8", "--max_words", "16", "--max_steps", "1", *clip_flag,
                *extra])
    assert f"\n{pairs} training pairs: {pairs // 8} steps/epoch" in capsys.readouterr().out
