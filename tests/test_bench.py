"""bench.py's bookkeeping (not its timings): FLOP counting on the CPU, the quality aggregation (quality.py, as
`python bench.py quality` runs it), a tiny speed run."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import bench
import clip
import quality


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
        final = {"event": "eval", "t2v": metrics, "v2t": metrics, "temporal": {"pair_acc": 40.0 + r1},
                 "wall_s": 6 * r1, "load": [0.5, r1 / 10]}
        (run / "final_eval.json").write_text(json.dumps(final))
    monkeypatch.setattr(quality.subprocess, "Popen", lambda *a, **k: pytest.fail("a finished run was trained again"))
    rows = quality.quality(argparse.Namespace(methods="full", seeds="0,1", out=str(tmp_path), jobs=2))
    stats = rows[0]["stats"]
    assert stats["t2v R@1"] == (15.0, 5.0) and stats["v2t R@10"] == (80.0, 0.0)
    assert stats["pair acc"] == (55.0, 5.0) and stats["wall min"] == (1.5, 0.5) and rows[0]["load"] == "0.5-2.0"
    assert rows[0]["command"] == "python train.py --method full --seed S"
    table = quality.quality_table(rows)
    assert "| pair acc | wall min | load |" in table and "| 55.0 ± 5.0 | 1.5 ± 0.5 | 0.5-2.0 |" in table


def test_speed_runs_every_column_through_train_methods_and_the_frame_cache_loader(tmp_path):
    args = argparse.Namespace(device="cpu", tiny=True, methods="unipt,zeroshot", batch=2, frames=4, words=8, steps=1,
                              warmup=1, loader_steps=1, loader_clips=1, workers=1)
    result = bench.speed(args)  # a forked loader worker once hung here on OpenCV's thread pool
    unipt, zeroshot = result["rows"]
    assert unipt["trainable"] == sum(p.numel() for p in bench.build("unipt", clip.CONFIGS["bench-tiny"], 4, True)[0].parameters()
                                     if p.requires_grad)
    assert unipt["flops"] > 0 and unipt["peak_mem_MB"] > 0 and 0 <= unipt["loader_wait"] < 1
    assert "step_ms" not in zeroshot and "loader_wait" not in zeroshot  # nothing trains
    assert "loader wait" in bench.speed_table(result)


def test_quality_reads_the_last_eval_of_a_training_log_and_the_record_of_an_eval_only_run(tmp_path, monkeypatch):
    def metrics(r1):
        m = {"R@1": r1, "R@5": 50.0, "R@10": 80.0, "MdR": 3.0, "MnR": 4.0}
        return {"event": "eval", "t2v": m, "v2t": m, "temporal": {"pair_acc": 50.0}}

    class FakeRun:  # what train.py leaves in --output_dir, without training
        def __init__(self, cmd, **kwargs):
            out = tmp_path / cmd[cmd.index("--output_dir") + 1].split("/")[-1]
            if "zeroshot" in cmd:  # --eval_only: no log.jsonl, one eval-<time>-<pid>.json record
                (out / "eval-20261201-120000-1.json").write_text(json.dumps(metrics(2.0)))
            else:
                rows = [{"event": "start"}, metrics(1.0), metrics(9.0)]
                (out / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

        def poll(self):
            return 0

        returncode = 0

    monkeypatch.setattr(quality.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(quality.time, "sleep", lambda s: None)
    clock = iter(range(0, 6000, 60))  # a minute passes between two looks at the clock
    monkeypatch.setattr(quality.time, "time", lambda: next(clock))
    rows = quality.quality(argparse.Namespace(methods="zeroshot,full", seeds="0", out=str(tmp_path), jobs=1))
    assert [r["stats"]["t2v R@1"][0] for r in rows] == [2.0, 9.0]  # full: its last evaluation, not the first
    final = json.loads((tmp_path / "quality_full_seed0" / "final_eval.json").read_text())
    assert final["wall_s"] == 60 and len(final["load"]) == 2  # the run's start to its end
