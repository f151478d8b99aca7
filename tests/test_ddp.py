"""DDP on CPU (gloo): two ranks with half a batch each take exactly the step of one process on the whole batch
(train.py deviation 1: the all-gather sums gradients, DDP averages them), for loss, gradients and updated
weights; and train.py on two "nodes" of one process each (env rendezvous on localhost, LOCAL_RANK 0 on both, as
torchrun --nnodes 2 sets it) equals train.py in one process."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoints
import meanp
import train
from loss import Forward, contrastive_loss, gather
from optimizer import param_groups
from conftest import make_tiny_clip
from equivalence import FORWARD, GRADIENT, assert_close32, gradient_floor

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
    """`STEPS` optimizer steps of `full` on rank's slice of each batch -> (losses, gradients, trainable weights)."""
    method = meanp.MeanP(make_tiny_clip(), T, train_clip=True)
    # SGD: the update is the gradient itself. (Adam would blow numerical noise up to +-lr on tensors whose
    # exact gradient is 0, such as the attention key biases, hiding what this test checks.)
    opt = torch.optim.SGD(param_groups(method, 0.5, 0.5, 0.2))
    forward = Forward(method)
    model = torch.nn.parallel.DistributedDataParallel(forward) if world > 1 else forward
    params, losses, grads = [p for g in opt.param_groups for p in g["params"]], [], []
    for text, video, mask in batches():
        part = slice(rank * B // world, (rank + 1) * B // world)
        t, v = model(text[part], video[part], mask[part])
        loss = contrastive_loss(method, t, v, mask[part])
        loss.backward()
        # the gradient before clipping: clipping would rescale a gradient that is off by a factor (e.g. 1/N
        # when the gather's backward is not summed) back to the same update
        grads.append({n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad})
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses), grads, checkpoints.trainable_state(method)


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
    ref_losses, ref_grads, ref = run(0, 1)
    for rank in (0, 1):
        losses, grads, weights = torch.load(f"{out}.{rank}", weights_only=False)
        assert_close32(losses, ref_losses, FORWARD, "losses")  # every rank sees the global loss
        for step, (g, ref_g) in enumerate(zip(grads, ref_grads)):
            assert g.keys() == ref_g.keys()
            for name in ref_g:
                assert_close32(g[name], ref_g[name], GRADIENT, f"step {step} {name}", gradient_floor(ref_g.values()))
        assert weights.keys() == ref.keys()
        for name in ref:  # SGD at lr 0.5: the weights carry the gradients' error
            assert_close32(weights[name], ref[name], GRADIENT, name)
    norms = [torch.cat([g.flatten() for g in step.values()]).norm() for step in ref_grads]
    assert min(norms) > 1e-2  # gradients of a size that a wrong factor would show in
    moved = [n for n in ref if not torch.equal(ref[n], make_tiny_clip().state_dict()[n[len("clip."):]])]
    assert len(moved) > len(ref) // 2  # the comparison is about weights that really changed


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather(x) is x


# ----------------------------------------------------------------------------------------------------
# Two "nodes": what `torchrun --nnodes 2 --node_rank R --nproc_per_node 1 --rdzv_endpoint HOST:PORT` gives each
# process (RANK R, LOCAL_RANK 0, WORLD_SIZE 2, the rendezvous address), here on one machine through gloo

def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def node(rank, port, argv):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank))
    train.main(argv)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_nodes_of_one_process_equal_one_process(tmp_path):
    import synthetic
    synthetic.make_synthetic(str(tmp_path / "set"), n_train=8, n_test_pairs=1)
    torch.save(make_tiny_clip().state_dict(), tmp_path / "clip.pt")

    def argv(out):
        return ["--method", "full", "--data_path", str(tmp_path / "set"), "--clip", str(tmp_path / "clip.pt"),
                "--output_dir", str(tmp_path / out), "--num_workers", "0", "--max_frames", "3", "--batch_size", "8",
                "--clip_lr", "1e-3", "--max_steps", "2", "--log_every", "1", "--device", "cpu"]

    mp.start_processes(node, args=(free_port(), argv("nodes")), nprocs=2, start_method="fork")
    train.main(argv("one"))
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "nodes"))
    assert a["step"] == b["step"] == 2
    for name in a["model"]:
        if name.endswith("in_proj_bias"):  # the key biases' exact gradient is 0 (softmax ignores a shift per query):
            # AdamW turns the rounding noise left in its place into steps of up to lr (m / sqrt(v) ~ 1), so two
            # summation orders may differ there by up to lr x steps = 2e-3
            torch.testing.assert_close(b["model"][name], a["model"][name], atol=2 * 1e-3, rtol=0, msg=name)
        else:  # AdamW moves a weight by up to lr a step, with the gradients' relative error: scale >= lr x steps
            assert_close32(b["model"][name], a["model"][name], GRADIENT, name, floor=2 * 1e-3)
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / d / "log.jsonl")) if r["event"] == "train"]
              for d in ("one", "nodes")]
    assert len(losses[0]) == 2
    assert_close32(torch.tensor(losses[1]), torch.tensor(losses[0]), FORWARD, "losses")
    # resumed with nothing left to do: rank 0 says so and exits 0, rank 1 with it (it waited in DDP's first
    # collective for a rank 0 that had gone; a hang until --dist_timeout, or an error)
    mp.start_processes(node, args=(free_port(), argv("nodes") + ["--resume", "--dist_timeout", "0.5"]), nprocs=2,
                       start_method="fork")  # raises if a rank exits non-zero
    assert torch.load(tmp_path / "nodes" / "checkpoint.pt", weights_only=True)["step"] == 2
