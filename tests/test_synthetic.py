"""synthetic.py: the set is deterministic and in MSR-VTT's layout, its test clips come in time-reversed pairs
(the test CSV's "twin" column, read into Split.twin, names each clip's twin: what retrieval's temporal pair
accuracy relies on), its still split names objects only; the metric itself."""
import csv
import os

import numpy as np
import pytest
import torch

import data
import retrieval
import synthetic


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "a"
    synthetic.make_synthetic(str(root), seed=3, n_train=12, n_test_pairs=3)
    return root


def test_deterministic_and_msrvtt_layout(tiny_set, tmp_path, monkeypatch):
    b = tmp_path / "b"
    synthetic.make_synthetic(str(b), seed=3, n_train=12, n_test_pairs=3)
    for name in ["MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv", "synthetic_still.csv",
                 "videos/video0.mp4", "videos/video17.mp4"]:
        assert (tiny_set / name).read_bytes() == (b / name).read_bytes(), name
    train = data.read_split("msrvtt", "train", str(tiny_set), str(tiny_set / "videos"))  # the MSR-VTT reader reads it
    test = data.read_split("synthetic", "test", str(tiny_set))
    assert len(train.videos) == 12 and len(train.captions) == 36 and len(test.videos) == 6
    assert len(set(test.captions)) == 6  # every test caption unique: R@1 can reach 100
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the default location, written atomically
    root = synthetic.ensure_synthetic(n_train=2, n_test_pairs=1)
    assert root == str(tmp_path / "xdg" / "nanotvr" / f"synthetic-{synthetic.SYNTHETIC_VERSION}")
    assert os.listdir(tmp_path / "xdg" / "nanotvr") == [os.path.basename(root)]  # no temporary left behind


def test_test_clips_are_time_reversed_pairs(tiny_set):
    test = data.read_split("synthetic", "test", str(tiny_set))
    twin = test.twin
    assert twin == [j ^ 1 for j in range(6)]  # written in pairs, in order
    with open(tiny_set / "MSRVTT_JSFUSION_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    name = [os.path.splitext(os.path.basename(v))[0] for v in test.videos]
    assert [r["twin"] for r in rows] == [name[twin[j]] for j in range(len(name))]  # read from the CSV
    assert data.read_split("msrvtt", "test", str(tiny_set), str(tiny_set / "videos")).twin == twin
    assert data.read_split("msrvtt", "train", str(tiny_set), str(tiny_set / "videos")).twin is None  # no column
    canonical = {synthetic.caption(c, s, m): (c, s, m) for c in synthetic.COLOURS for s in synthetic.SHAPES
                 for m in synthetic.MOTIONS}
    for j in range(len(name)):
        k = twin[j]
        assert twin[k] == j != k
        first, second = (data.read_frames(test.videos[i], 0, False, fps=0).astype(float) for i in (j, k))
        assert np.abs(first - second[::-1]).mean() < 2 and np.abs(first - second).mean() > 0.2  # same frames, reversed
        colour, shape, motions = canonical[test.captions[j]]  # "moves left then grows" <-> "shrinks then moves right"
        assert test.captions[k] == synthetic.caption(colour, shape, synthetic.reverse(motions)) != test.captions[j]


def test_still_split_names_objects_only(tiny_set):
    still = synthetic.still_split(str(tiny_set))
    train = data.read_split("msrvtt", "train", str(tiny_set), str(tiny_set / "videos"))
    objects = {f"a {c} {s}" for c in synthetic.COLOURS for s in synthetic.SHAPES}
    assert still.captions and set(still.captions) <= objects  # no motion word reaches the backbone's pretraining
    assert set(still.videos) <= set(train.videos)
    for v, c in zip(still.videos, still.captions):  # ... and its clips show the object in every frame
        train_caps = [t for t, i in zip(train.captions, train.caption_video) if train.videos[i] == v]
        assert all(t.split()[1:3] == c.split()[1:3] for t in train_caps)
        assert not any(w in t for t in train_caps for w in ("appears", "disappears", "fades", "vanishes", "shows up"))


def test_temporal_pair_accuracy_by_hand():
    # 4 videos = pairs (0, 1) and (2, 3); captions 0-3 describe videos 0-3, caption 4 describes video 0 again
    sim = torch.tensor([[.9, .1, .5, .0],   # video 0 above its twin 1: right
                        [.8, .3, .0, .0],   # caption of video 1: .3 < .8 of its twin: wrong (rank irrelevant)
                        [.0, .0, .4, .4],   # a tie with the twin: half
                        [.9, .9, .1, .2],   # .2 > .1: right, although videos 0 and 1 score higher
                        [.2, .7, .0, .0]])  # wrong
    acc, n = retrieval.temporal_pair_accuracy(sim, [0, 1, 2, 3, 0], [1, 0, 3, 2])
    assert acc == pytest.approx(100 * 2.5 / 5) and n == 5
    assert retrieval.temporal_pair_accuracy(torch.ones(4, 4), [0, 1, 2, 3], [1, 0, 3, 2]) == (50, 4)  # order-blind
    # videos 2 and 3 missing (--allow_missing): the pairs come from the twin column, never from positions
    acc, n = retrieval.temporal_pair_accuracy(sim[[0, 1, 4], :2], [0, 1, 0], [1, 0])
    assert (acc, n) == (pytest.approx(100 / 3), 3)
    assert retrieval.temporal_pair_accuracy(sim[:, :3], [0, 1, 2], [1, 0, None]) == (50, 2)  # 2's twin is gone
    m = {"t2v": retrieval.summarize(torch.tensor([1.0, 2.0])), "temporal": {"pair_acc": 62.5}}
    assert "temporal pair accuracy 62.5%" in retrieval.table(m)

