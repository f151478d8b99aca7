"""--grad_checkpointing (clip.checkpointed): for every method and SimVTP's pretraining, the loss and every trainable
gradient equal the plain path's, dropout and stochastic depth included, and what autograd keeps shrinks.

Equal, not close: a checkpointed block runs the same kernels on the same inputs twice (forward, then again in
backward with the RNG state restored), so its saved tensors are bit for bit the plain path's, and so is every
gradient computed from them. The bound is therefore 0 on the CPU, in fp32 and under bf16 autocast alike."""
import pytest
import torch

import bench
import clip
from conftest import make_tiny_clip
from flags import LOOP_DEFAULTS
from loss import contrastive_loss
from methods import METHODS, PRETRAINING

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["full", "ump", "ump-release", "dgl", "adapter", "adapter-release", "unipt", "simvtp", "simvtp-pretrain"]
FRAMES = 4  # SimVTP's tubelets take 2 frames; DGL's transformer latent is built for this many


def build(name, **overrides):
    """The method at the synthetic set's recipe on the tests' tiny CLIP, dropout as in training."""
    pretrain = name == "simvtp-pretrain"
    cls, recipe, sets = PRETRAINING["simvtp"] if pretrain else METHODS[name]
    recipe = {**recipe, **sets["synthetic"], **overrides}
    kwargs = {k: v for k, v in recipe.items() if k not in LOOP_DEFAULTS}
    torch.manual_seed(0)
    if cls.uses_clip:
        return cls(make_tiny_clip(), FRAMES, **kwargs), 32
    if not pretrain:
        kwargs["drop_path"] = 0.2  # stochastic depth draws per block: the rerun must draw the same
    return cls(FRAMES, size=recipe["size"], **kwargs), recipe["size"]


def batch(size, n=3):
    g = torch.Generator().manual_seed(1)
    video = torch.randn(n, FRAMES, 3, size, size, generator=g)
    mask = torch.tensor([[True] * FRAMES, [True] * FRAMES, [True, True] + [False] * (FRAMES - 2)])[:n]
    text = torch.randint(1, 49000, (n, 12), generator=g)
    text[:, 0], text[:, 7], text[:, 8:] = clip.SOT, clip.EOT, 0
    return video, mask, text


def loss_of(model, name, video, mask, text):
    if name == "simvtp-pretrain":
        return model.pretraining_loss(video, mask, text)["loss"]
    return contrastive_loss(model, model.encode_text(text), model.encode_video(video, mask), mask)


def step(model, name, data, checkpointing, dtype=torch.float32):
    """Loss and gradients of one training step, RNG seeded as train.py seeds a micro-batch."""
    clip.set_grad_checkpointing(model.train(), checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_of(model, name, *data)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_checkpointed_loss_and_gradients_equal_the_plain_path(name, dtype):
    model, size = build(name)
    data = batch(size)
    loss, grads = step(model, name, data, False, dtype)
    loss_ck, grads_ck = step(model, name, data, True, dtype)
    assert torch.equal(loss, loss_ck), (name, loss.item(), loss_ck.item())
    assert grads.keys() == grads_ck.keys() and grads
    for n, g in grads.items():
        assert g is not None and torch.equal(g, grads_ck[n]), n
    if name == "ump":  # its generator's dropout is on: a third step under another seed differs
        clip.set_grad_checkpointing(model, False)
        torch.manual_seed(8)
        assert not torch.equal(loss, loss_of(model, name, *data).detach())


def saved(model, name, data, checkpointing):
    clip.set_grad_checkpointing(model.train(), checkpointing)
    torch.manual_seed(7)
    with bench.SavedBytes(model.parameters()) as counter:
        loss_of(model, name, *data)
    return counter.bytes


@pytest.mark.parametrize("name", [n for n in NAMES if n != "unipt"])
def test_checkpointing_keeps_less_for_backward(name):
    """Kept: every block's input instead of every block's activations; at 4 layers' depth (2 in the tiny CLIP) the
    saving is smaller than at ViT-B's 12, but at least a third. UniPT runs its towers without autograd: no saving.
    SimVTP pretraining at least a fifth: outside its blocks, masked language modelling scores every text slot
    over the vocabulary (static shapes), a large share of what a step keeps at this size."""
    model, size = build(name, **({"depth": 4} if name.startswith("simvtp") else {}))
    data = batch(size)
    plain, kept = saved(model, name, data, False), saved(model, name, data, True)
    assert kept < (4 / 5 if name == "simvtp-pretrain" else 2 / 3) * plain, (name, plain, kept)


def test_checkpointing_is_off_in_evaluation_and_without_autograd(monkeypatch):
    model, size = build("dgl")
    clip.set_grad_checkpointing(model, True)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: pytest.fail("checkpointed"))
    video, mask, text = batch(size)
    with torch.no_grad():
        model.train().encode_video(video, mask)
    model.eval().encode_text(text)
