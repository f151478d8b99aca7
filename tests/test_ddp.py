"""DDP on CPU (gloo): two ranks with half a batch each take exactly the step of one process on the whole batch
(train.py deviation 1: the all-gather sums gradients, DDP averages them), for loss and updated weights."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import meanp
import runs
import train
from conftest import make_tiny_clip

B, T, STEPS = 6, 3, 2


def batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        video = torch.randn(B, T, 3, 32, 32, generator=g)
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, 2:] = mask[4, 1:] = False  # short clips on both ranks
        text = torch.randint(1, 400, (B, 8), generator=g)
        text[:, 0], text[torch.arange(B), torch.randint(3, 8, (B,), generator=g)] = 49406, 49407
        yield text, video, mask


def run(rank, world):
    """`STEPS` optimizer steps of `full` on rank's slice of each batch -> (losses, trainable weights)."""
    method = meanp.MeanP(make_tiny_clip(), T, train_clip=True)
    # SGD: the update is the gradient itself. (Adam would blow numerical noise up to +-lr on tensors whose
    # exact gradient is 0, such as the attention key biases, hiding what this test checks.)
    opt = torch.optim.SGD(train.param_groups(method, 0.5, 0.5, 0.2))
    forward = train.Forward(method)
    model = torch.nn.parallel.DistributedDataParallel(forward) if world > 1 else forward
    params, losses = [p for g in opt.param_groups for p in g["params"]], []
    for text, video, mask in batches():
        part = slice(rank * B // world, (rank + 1) * B // world)
        t, v = model(text[part], video[part], mask[part])
        loss = train.contrastive_loss(method, t, v, mask[part])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses), runs.trainable_state(method)


def worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(run(rank, world), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    out = str(tmp_path / "result")
    mp.start_processes(worker, args=(2, str(tmp_path / "init"), out), nprocs=2, start_method="fork")
    ref_losses, ref = run(0, 1)
    for rank in (0, 1):
        losses, weights = torch.load(f"{out}.{rank}", weights_only=False)
        torch.testing.assert_close(losses, ref_losses, atol=1e-6, rtol=0)  # every rank sees the global loss
        assert weights.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(weights[name], ref[name], atol=1e-6, rtol=0, msg=name)
    moved = [n for n in ref if not torch.equal(ref[n], make_tiny_clip().state_dict()[n[len("clip."):]])]
    assert len(moved) > len(ref) // 2  # the comparison is about weights that really changed


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 2, requires_grad=True)
    assert train.gather(x) is x
