"""bf16 at the recipes' size: one training step of each CLIP method at ViT-B/32 (random weights, 12 frames of
224 px, 32 words), bf16 autocast against fp32. Skipped without a CUDA GPU (tests/test_cuda.py has the rest).

    python -m pytest -q tests/test_cuda_recipe.py                  # on a GPU, seconds
    NANOTVR_DRY_RUN=cpu python -m pytest -q tests/test_cuda_recipe.py   # the same arithmetic on the CPU, minutes

Why a second test: bf16 rounds every autocast matmul's inputs to 8 significant bits (relative 2^-9) and
accumulates in fp32, on the GPU's tensor cores as in the CPU's autocast; the tiny config's bounds say nothing of
what 12 + 12 layers of width 768 do to that error. It is the arithmetic, not the device, that sets it, so a CPU
dry run measures it. The bounds are about 3x the deviations of a CPU dry run (2026-12-06, 2-core Intel Xeon Sapphire Rapids VM,
torch 2.14.1), rounded up: loss 0.01-0.23% (adapter largest) -> 1%; gradient cosine 0.9986-0.9997 -> 0.995, UniPT
0.9964 (its side network's image adapter, as in test_cuda.py) -> 0.985; gradient norm 0.07-1.3% -> 5%.
The tiny config deviates more (cosine down to 0.977 in test_cuda.py's dry run): wider dot products average the roundings.
"""
import os

import pytest
import torch

import bench
import clip
from test_cuda import close, gradient, step_loss

DEVICE = torch.device(os.environ.get("NANOTVR_DRY_RUN", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
BATCH, FRAMES, WORDS = 2, 12, 32
# name: (loss rtol, min gradient cosine, gradient norm rtol)
BOUNDS = {"full": (1e-2, 0.995, 5e-2), "ump": (1e-2, 0.995, 5e-2), "dgl": (1e-2, 0.995, 5e-2),
          "adapter": (1e-2, 0.995, 5e-2), "unipt": (1e-2, 0.985, 5e-2)}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_bf16_step_at_vit_b32_matches_fp32(name):
    torch.manual_seed(0)
    method, size = bench.build(name, clip.CONFIGS["ViT-B/32"], FRAMES, tiny=False)
    method.to(DEVICE).eval()  # no dropout: both precisions see the same function
    torch.manual_seed(1)
    data = bench.make_batch(BATCH, FRAMES, size, WORDS, DEVICE)
    data[1][1, -1] = False  # one padded frame
    ref = step_loss(method, data, False, None, DEVICE)
    ref.backward()
    ref_loss, ref_grad = ref.item(), gradient(method)
    assert ref_grad.norm() > 0
    loss = step_loss(method, data, False, torch.bfloat16, DEVICE)
    loss.backward()
    grad = gradient(method)
    close(loss.item(), grad, ref_loss, ref_grad, *BOUNDS[name])
