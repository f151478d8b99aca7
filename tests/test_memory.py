"""The training step's memory (checks.check_memory): on CUDA, before step 1, a step that will not fit the GPU's free
memory is one `error:` line with the estimate, the free memory and the ways out; --grad_checkpointing reaches the
model through train.py. The GPU is faked: the methods are built at ViT-B/32 on the meta device (no memory) and
torch.cuda.mem_get_info is monkeypatched."""
import argparse
import pytest
import torch

import checks
import clip
import dgl
import meanp
import train
import fault_runs
from messages import assert_tells
from train import Env

pytestmark = pytest.mark.usefixtures("one_thread")
GiB = 2**30


def vit_b32(cls, **kwargs):
    with torch.device("meta"):
        return cls(clip.CLIP(**clip.CONFIGS["ViT-B/32"]), 12, **kwargs)


def flags(**given):
    return argparse.Namespace(**{**dict(method="dgl", stage="finetune", batch_size=512, accum=1, frames=12,
                                        precision=None, grad_checkpointing=False), **given})


def on_gpu(monkeypatch, free_gib, world=1):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GiB), 80 * GiB))
    return Env(torch.device("cuda", 0), world, 0, None, None, None, None)


def test_dgl_recipe_batch_on_one_gpu_is_one_error_line_with_the_ways_out(monkeypatch):
    method, args = vit_b32(dgl.DGL), flags()
    need = sum(checks.step_memory(method, "dgl", 12, 512, False, True, 1).values())
    with pytest.raises(checks.RunError) as e:
        checks.check_memory(args, method, on_gpu(monkeypatch, 79.2))
    message = str(e.value)
    assert "\n" not in message and e.value.status == 2
    weights = sum(p.numel() * 4 for p in method.parameters())
    assert_tells(message, "--method dgl", f"{(need - weights) / GiB:.1f} GiB", "79.2 GiB are free", "512 clips per GPU",
                 "--grad_checkpointing", "torchrun --nproc_per_node", "--batch_size", "--gradient_accumulation_steps",
                 "contrasts only 512 / K clips")
    assert need > 100 * GiB  # the issue's ~114 GiB of activations at 512 clips, ~227 MiB each


def test_what_fits_passes(monkeypatch):
    """With checkpointing DGL's recipe batch fits one 80 GB GPU; on 4 GPUs (128 clips each) it fits without."""
    method = vit_b32(dgl.DGL)
    checks.check_memory(flags(grad_checkpointing=True), method, on_gpu(monkeypatch, 79.2))
    assert method.grad_checkpointing and method.clip.visual.transformer.grad_checkpointing
    checks.check_memory(flags(), method, on_gpu(monkeypatch, 79.2, world=4))
    assert not method.grad_checkpointing
    with pytest.raises(checks.RunError, match="more GPUs") as e:  # already checkpointing: not offered again
        checks.check_memory(flags(grad_checkpointing=True), method, on_gpu(monkeypatch, 4))
    assert "pass --grad_checkpointing" not in str(e.value)


def test_the_estimate_scales_with_clips_frames_and_precision():
    method = vit_b32(meanp.MeanP)
    one, two = (checks.step_memory(method, "full", 12, n, False, True, 1)["activations"] for n in (64, 128))
    assert two == 2 * one
    assert checks.step_memory(method, "full", 6, 64, False, True, 1)["activations"] == one / 2
    assert checks.step_memory(method, "full", 12, 64, False, False, 1)["activations"] == 2 * one  # fp32
    assert checks.step_memory(method, "full", 12, 64, True, True, 1)["activations"] < one / 4
    grads = clip.count_trainable(method) * 4  # fp32 gradients; AdamW's two moments; DDP's buckets one more
    optimizer = [checks.step_memory(method, "full", 12, 64, False, True, world)["optimizer"] for world in (1, 4)]
    assert optimizer == [3 * grads, 4 * grads]


def test_not_on_the_cpu_and_not_for_an_unmeasured_method(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("asked a GPU"))
    checks.check_memory(flags(), vit_b32(dgl.DGL), Env(torch.device("cpu"), 1, 0, None, None, None, None))
    checks.check_memory(flags(method="zeroshot"), vit_b32(meanp.ZeroShot), on_gpu(monkeypatch, 1))  # no table row


def test_train_py_checkpoints_every_block_with_the_flag(setup, tmp_path, monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    train.main(["--method", "adapter", "--data_path", str(setup / "synthetic"), "--clip", str(setup / "clip.pt"),
                "--output_dir", str(tmp_path), "--num_workers", "0", "--max_frames", "2", "--batch_size", "8",
                "--max_words", "16", "--max_steps", "1", "--grad_checkpointing"])
    assert len(calls) == 4  # 2 blocks per tower of the tiny CLIP, one training step
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["args"]["grad_checkpointing"] is True


def test_grad_checkpointing_says_when_it_does_nothing(setup, tmp_path, capsys):
    train.main(fault_runs.flags(setup, tmp_path / "u", "--grad_checkpointing", "--max_steps", "1", method="unipt"))
    assert_tells(capsys.readouterr().out, "WARNING: --grad_checkpointing has no effect for --method unipt", "autograd")
    train.main(fault_runs.flags(setup, tmp_path / "m", "--grad_checkpointing", "--max_steps", "1", method="ump"))
    assert "--grad_checkpointing has no effect" not in capsys.readouterr().out
