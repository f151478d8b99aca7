"""Retrieval metrics: worked examples A (ties) and B (multi-caption), CLIP4Clip's own outputs (a fixture), DSL,
the loss and the schedule."""
import math
import os

import pytest
import torch

from retrieval import ranks_of, retrieval_metrics
from optimizer import lr_factor

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "clip4clip_metrics.pt")
NAMES = ("R@1", "R@5", "R@10", "MdR", "MnR")  # the fixture's R1, R5, R10, MR, MeanR

# Example A: rows are texts, the ground truth is on the diagonal; video 3 ties (.2) with text 0
A = torch.tensor([[.9, .1, .3, .2], [.5, .4, .8, .1], [.2, .6, .7, .6], [.3, .9, .1, .2]])
# Example B: 3 videos with 2, 1, 2 captions; rows t0..t4 describe videos 0, 0, 1, 2, 2
B = torch.tensor([[.80, .3, .1], [.20, .5, .4], [.60, .7, .1], [.85, .2, .9], [.82, .6, .5]])


def test_example_a_text_to_video():
    assert ranks_of(A.double(), torch.arange(4)).tolist() == [1, 3, 1, 3]
    m = retrieval_metrics(A, [0, 1, 2, 3])["t2v"]
    assert m["R@1"] == 50 and m["R@5"] == 100 and m["MdR"] == 2 and m["MnR"] == 2.0


def test_example_a_video_to_text_tie_adds_both_ranks():
    # video 3's column (.2, .1, .6, .2): its text 3 ties with text 0 at rank 2, so ranks 2 and 3 both count
    assert ranks_of(A.T.double(), torch.arange(4)).tolist() == [1, 3, 2, 2, 3]
    m = retrieval_metrics(A, [0, 1, 2, 3])["v2t"]
    assert m["R@1"] == pytest.approx(20.0) and m["MdR"] == 2 and m["MnR"] == pytest.approx(2.2)
    assert m["R@5"] == 100 and m["R@10"] == 100


def test_example_b_multi_caption():
    m = retrieval_metrics(B, [0, 0, 1, 2, 2])
    t2v, v2t = m["t2v"], m["v2t"]
    assert t2v["R@1"] == pytest.approx(60.0) and t2v["MdR"] == 1 and t2v["MnR"] == pytest.approx(1.8)
    # video 0 scores the caption groups by their best caption (.80, .60, .85): rank 2, not 3 (first-correct)
    assert v2t["R@1"] == pytest.approx(200 / 3) and v2t["MdR"] == 1 and v2t["MnR"] == pytest.approx(4 / 3)


def test_even_count_median_averages_like_numpy():
    sim = torch.tensor([[1., 0.], [1., 0.]])  # text 1's video ranks 2: ranks (1, 2) -> MdR 1.5
    assert retrieval_metrics(sim, [0, 1])["t2v"]["MdR"] == 1.5


def test_equals_clip4clip_metrics_on_recorded_outputs():
    """CLIP4Clip's compute_metrics / tensor_text_to_video_metrics at 508ffa3 on random, tied and constant matrices,
    one and several captions per video (tests/oracles/make_metrics_fixture.py). Measured |diff|: <= 1.5e-14 on
    the single-caption cases and v2t; <= 3.7e-6 on multi-caption t2v R@k, which CLIP4Clip divides in float32."""
    fixture = torch.load(FIXTURE, weights_only=True)
    assert fixture["repo"] == "ArrowLuo/CLIP4Clip" and fixture["commit"].startswith("508ffa3")
    assert len(fixture["cases"]) == 11
    for case in fixture["cases"]:
        ours = retrieval_metrics(case["sim"], case["caption_video"])
        # multi-caption t2v: CLIP4Clip's function with tied videos in index order (retrieval.py's docstring)
        for direction, expected in (("t2v", case.get("t2v_stable", case["t2v"])), ("v2t", case["v2t"])):
            got = torch.tensor([ours[direction][k] for k in NAMES], dtype=torch.float64)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=0, msg=f"{case['name']} {direction}")
        if "t2v_stable" in case and case["name"] != "multi tied round(3x) 200x20":  # the others sort stably anyway
            torch.testing.assert_close(case["t2v_stable"], case["t2v"], atol=2e-5, rtol=0)


def test_multi_caption_text_to_video_one_rank_per_caption_ties_in_index_order_lower_median():
    # 2 videos x 2 captions; caption 1 ties videos 0 and 1; caption 3 ties them too
    sim = torch.tensor([[.9, .1], [.5, .5], [.2, .7], [.3, .3]])
    t2v = retrieval_metrics(sim, [0, 0, 1, 1])["t2v"]
    # ranks 1, 1 (its video 0 comes first among the tied), 1, 2 (video 1 after the tied video 0): one entry each
    assert t2v["R@1"] == 75 and t2v["MnR"] == 1.25 and t2v["MdR"] == 1.0
    even = torch.tensor([[.9, .1], [.8, .2], [.5, .4], [.6, .5]])  # ranks 1, 1, 2, 2: numpy's median says 1.5
    assert retrieval_metrics(even, [0, 0, 1, 1])["t2v"]["MdR"] == 1.0  # torch.median, as CLIP4Clip


def test_dsl_is_a_separate_and_different_ranking():
    # text 0 prefers video 0, but video 0 is far more similar to text 1: the dual softmax moves text 0 to video 1
    sim = torch.tensor([[5.0, 4.9], [9.0, 0.0]])
    plain, dsl = retrieval_metrics(sim, [1, 0]), retrieval_metrics(sim, [1, 0], dsl=True)
    assert plain["t2v"]["R@1"] == 50 and dsl["t2v"]["R@1"] == 100


def test_warmup_then_cosine_to_zero():
    f = [lr_factor(s, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 1e-3
    assert lr_factor(55, 100, 0.1) == pytest.approx(0.5)
    assert lr_factor(0, 10, 0.0) == 1.0 and not math.isnan(lr_factor(0, 1, 0.1))
