"""Under torchrun, rank 0 evaluates alone after each epoch while the other ranks wait. With NCCL's 10 minutes as
the timeout of that wait, a long evaluation (ActivityNet decoded on the fly) killed the job, and a resume started
with the same evaluation. Here: 2 gloo ranks whose training collectives time out after 6 s (--dist_timeout 0.1)
and an evaluation that takes 12 s: the run must finish both epochs."""
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import retrieval
from test_ddp import free_port, node


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_slow_evaluation_does_not_time_out_the_other_ranks(setup, tmp_path, monkeypatch):
    evaluate = retrieval.evaluate

    def slow(*args, **kw):
        time.sleep(12)
        return evaluate(*args, **kw)
    monkeypatch.setattr(retrieval, "evaluate", slow)  # the forked ranks inherit it
    argv = ["--method", "full", "--data_path", str(setup / "synthetic"), "--clip", str(setup / "clip.pt"),
            "--output_dir", str(tmp_path), "--num_workers", "0", "--max_frames", "2", "--batch_size", "24",
            "--max_words", "16", "--epochs", "2", "--clip_lr", "1e-4", "--device", "cpu", "--dist_timeout", "0.1"]
    mp.start_processes(node, args=(free_port(), argv), nprocs=2, start_method="fork")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2
