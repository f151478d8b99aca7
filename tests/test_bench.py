"""bench.py's bookkeeping (not its timings): FLOP counting on the CPU, the quality aggregation, a tiny speed run."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import bench


def test_flop_counter_counts_cpu_fused_attention_forward_and_backward():
    B, H, L, D = 2, 3, 5, 8
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    with bench.flop_counter() as fc:
        out = F.scaled_dot_product_attention(q, k, v)
    assert fc.get_total_flops() == 2 * (2 * B * H * L * L * D)  # QK^T and PV, 2 FLOPs per multiply-add
    with bench.flop_counter() as fc:
        out.sum().backward()
    # torch's flash-attention formula: 5 matmuls (QK^T recomputed, dV, dP, dQ, dK)
    assert fc.get_total_flops() == 5 * (2 * B * H * L * L * D)


def test_quality_reuses_finished_runs_and_reports_mean_and_population_std(tmp_path, monkeypatch):
    for seed, r1 in (("0", 10.0), ("1", 20.0)):
        run = tmp_path / f"quality_full_seed{seed}"
        run.mkdir()
        metrics = {"R@1": r1, "R@5": 50.0, "R@10": 80.0, "MdR": 3.0, "MnR": 4.0}
        (run / "final_eval.json").write_text(json.dumps({"event": "eval", "t2v": metrics, "v2t": metrics}))
    monkeypatch.setattr(bench.subprocess, "Popen", lambda *a, **k: pytest.fail("a finished run was trained again"))
    rows = bench.quality(argparse.Namespace(methods="full", seeds="0,1", out=str(tmp_path), jobs=2))
    assert rows[0]["stats"]["t2v R@1"] == (15.0, 5.0) and rows[0]["stats"]["v2t R@10"] == (80.0, 0.0)
    assert rows[0]["command"] == "python train.py --method full --seed S"


def test_speed_runs_every_column_through_train_methods_and_the_frame_cache_loader(tmp_path):
    args = argparse.Namespace(device="cpu", tiny=True, methods="unipt,zeroshot", batch=2, frames=4, words=8, steps=1,
                              warmup=1, loader_steps=1, loader_clips=1, workers=1)
    result = bench.speed(args)  # a forked loader worker once hung here on OpenCV's thread pool
    unipt, zeroshot = result["rows"]
    assert unipt["trainable"] == sum(p.numel() for p in bench.build("unipt", bench.TINY, 4, True)[0].parameters()
                                     if p.requires_grad)
    assert unipt["flops"] > 0 and unipt["peak_mem_MB"] > 0 and 0 <= unipt["loader_wait"] < 1
    assert "step_ms" not in zeroshot and "loader_wait" not in zeroshot  # nothing trains
    assert "loader wait" in bench.speed_table(result)
