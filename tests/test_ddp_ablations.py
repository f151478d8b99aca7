"""Every documented ablation trains under torchrun: 2 gloo ranks, two steps each. DDP fails the step after one whose graph
leaves a trainable parameter unused ("Expected to have finished reduction"), so an ablation must not keep
parameters it never reads (UMP's w/o-condition ablation kept the video tower's input projection)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_ddp import free_port, node

ABLATIONS = [("ump", ["--upg_condition", "false"]), ("ump", ["--K_d", "0"]), ("ump", ["--shared_upg", "false"]),
             ("dgl", ["--latent", "linear"]), ("adapter", ["--d_s", "0"]), ("adapter", ["--pool", "mean"]),
             ("full", ["--freeze_layer_num", "-1", "--clip_lr", "1e-4"]), ("simvtp", ["--pool_pads", "false"])]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("method, flags", ABLATIONS, ids=[f"{m} {' '.join(f[:2])}" for m, f in ABLATIONS])
def test_ablation_trains_on_two_ranks(setup, tmp_path, method, flags):
    argv = ["--method", method, "--data_path", str(setup / "synthetic"), "--output_dir", str(tmp_path),
            "--num_workers", "0", "--max_frames", "2", "--batch_size", "8", "--max_words", "16", "--max_steps", "2",
            "--device", "cpu", *flags] + ([] if method == "simvtp" else ["--clip", str(setup / "clip.pt")])
    mp.start_processes(node, args=(free_port(), argv), nprocs=2, start_method="fork")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
