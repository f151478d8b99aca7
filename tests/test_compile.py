"""--compile: train.py compiles the training forward (loss.Forward, DDP-wrapped under torchrun, as PyTorch advises).

Graph breaks: torch._dynamo.explain of a step's forward and its loss (what forward_backward differentiates) finds
none for any method, SimVTP's pretraining or the documented ablations: no .item(), bool(tensor), nonzero or
data-dependent shape is left in a training forward (each would also stall a GPU).
Training: every method trains two steps under --compile; then the compiled forward, loss and gradients on a fixed
batch equal eager's within tests/equivalence.py's float32 bounds (FORWARD for the loss, GRADIENT for the
gradients): a compiled graph computes the same function and only sums in another order, which is what those
bounds are derived for. Backends: inductor, the flag's, for `full` only (cold, its C++ code generation took 48 s
of CPU, 4.4 min of wall time on 2 cores under load 6-9, 24 s at load ~1; warm, a few seconds); aot_eager for the
others (Dynamo's capture and AOT autograd's joint graph on eager kernels, 3-9 s each): CI checks every method's
graph and one method's generated code.
"""
import json
import os
import tempfile

import pytest
import torch

import data
import flags
import loss
import methods
import train
from conftest import make_tiny_clip
from equivalence import FORWARD, GRADIENT, assert_close32, gradient_floor

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = [("full", ["--clip_lr", "1e-4"]), ("ump", []), ("dgl", []), ("adapter", []), ("unipt", []),
           ("simvtp", []), ("simvtp", ["--stage", "pretrain"])]
ABLATIONS = [("ump", ["--upg_condition", "false"]), ("ump", ["--K_d", "0"]), ("ump", ["--shared_upg", "false"]),
             ("dgl", ["--latent", "linear"]), ("adapter", ["--d_s", "0"]), ("adapter", ["--pool", "mean"]),
             ("full", ["--freeze_layer_num", "-1", "--clip_lr", "1e-4"]), ("simvtp", ["--pool_pads", "false"]),
             ("ump-release", []), ("adapter-release", [])]
TINY = ["--max_frames", "2", "--max_words", "16", "--batch_size", "8"]
CAPTIONS = ["a red circle moves left", "a big blue square goes up", "green", "a yellow triangle falls"] * 2


def ids(cases):
    return [m + " ".join(e[:2]) for m, e in cases]


def batch(method, B=8, T=2):
    """text [B, 16] long, video [B, T, 3, 32, 32] normalised, video_mask [B, T] bool with one padded frame."""
    g = torch.Generator().manual_seed(0)
    video = method.normalize_pixels(torch.randint(0, 256, (B, T, 3, 32, 32), dtype=torch.uint8, generator=g))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -1] = False
    return torch.stack([data.tokenize(c, 16) for c in CAPTIONS[:B]]), video, mask


def step_loss(model, text, video, mask):  # the loss train.forward_backward differentiates
    if model.pretrain:
        return model(text, video, mask)["loss"]
    return loss.contrastive_loss(model.method, *model(text, video, mask), mask)


@pytest.mark.parametrize("method, extra", METHODS + ABLATIONS, ids=ids(METHODS + ABLATIONS))
def test_no_graph_breaks(method, extra):
    args, cls, _ = flags.parse_args(["--method", method, *TINY, *extra])
    torch.manual_seed(0)
    built = methods.construct(cls, make_tiny_clip() if cls.uses_clip else None, args).train()
    torch._dynamo.reset()
    out = torch._dynamo.explain(step_loss)(loss.Forward(built, args.stage == "pretrain"), *batch(built))
    assert out.graph_break_count == 0, [b.reason for b in out.break_reasons]


def grads_of(model, text, video, mask):
    """-> (loss, gradients of the trainable tensors) of one step, dropout and masks drawn from seed 1."""
    params = [p for p in model.method.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    torch.manual_seed(1)
    value = step_loss(model, text, video, mask)
    value.backward()
    return value.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("method, extra", METHODS, ids=ids(METHODS))
def test_every_method_trains_compiled_as_eager(setup, tmp_path, monkeypatch, method, extra):
    backend, compiled, compile = "inductor" if method == "full" else "aot_eager", [], torch.compile
    # inductor's cache per CPU capability: its precompiled header, built for AVX-512, fails to compile kernels
    # generated under ATEN_CPU_CAPABILITY=default (seen with torch 2.14.1), and the cache does not key on it
    capability = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"nanotvr-inductor-{capability}"))
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(compile(model, backend=backend)) or compiled[-1])
    torch._dynamo.reset()
    argv = ["--method", method, "--data_path", str(setup / "synthetic"), "--output_dir", str(tmp_path), *TINY,
            "--num_workers", "0", "--log_every", "1", "--max_steps", "2", "--compile", *extra]
    train.main(argv + ([] if method == "simvtp" else ["--clip", str(setup / "clip.pt")]))
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in rows if r.get("event") == "train"] == [1, 2]
    assert all(0 < r["loss"] < 100 for r in rows if r.get("event") == "train")
    (model,) = compiled  # the trained weights: compiled against eager on one batch of the training shapes
    inputs = batch(model.method)
    (loss_c, grads_c), (loss_e, grads_e) = grads_of(model, *inputs), grads_of(model._orig_mod, *inputs)
    assert_close32(loss_c, loss_e, FORWARD, f"{method} loss")
    for i, (c, e) in enumerate(zip(grads_c, grads_e)):
        assert_close32(c, e, GRADIENT, f"{method} gradient {i}", gradient_floor(grads_e))
