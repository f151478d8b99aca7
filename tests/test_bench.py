"""bench.py's bookkeeping (not its timings): FLOP counting on the CPU and the --quality aggregation."""
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
