"""The loop's promises, each guarded where it is kept: --grad_clip bounds the step (0: no clipping), the learnt
temperature is clamped at ln 100 after every step, gradient accumulation averages its micro-batches, every epoch
draws a new batch order, and --dsl adds its rows beside the plain ones. Each test fails when that line alone is
broken (docs/equivalence.md lists the mutants)."""
import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import data
import meanp
import retrieval
import train
from conftest import make_tiny_clip
from equivalence import GRADIENT, assert_close32, gradient_floor
from loss import Forward

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = train.Env(torch.device("cpu"), 1, 0, nullcontext(), None, torch.amp.GradScaler("cpu", enabled=False), None)


def full_model(frames=2):
    return Forward(meanp.MeanP(make_tiny_clip(), frames))  # every CLIP tensor trains, logit_scale included


def step_with_grads(model, grad_clip, grad):
    """One optimizer_step of SGD at lr 1 on gradients all equal to `grad` -> the update's norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, grad)
    opt = torch.optim.SGD([dict(params=params)], lr=1.0)
    train.optimizer_step(model, opt, train.Position(), CPU, SimpleNamespace(grad_clip=grad_clip))
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]).norm().item()


def test_grad_clip_bounds_the_update_and_zero_turns_it_off():
    model = full_model()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert step_with_grads(full_model(), 1.0, 1e-2) == pytest.approx(1.0, rel=1e-4)  # norm 1e-2 sqrt(n) > 1
    assert step_with_grads(full_model(), 0.0, 1e-2) == pytest.approx(1e-2 * math.sqrt(n), rel=1e-4)
    assert step_with_grads(full_model(), 1e3, 1e-2) == pytest.approx(1e-2 * math.sqrt(n), rel=1e-4)  # under it
    args, _, _ = train.parse_args(["--method", "full", "--grad_clip", "0.25"])
    assert args.grad_clip == 0.25  # the flag reaches the loop


def test_temperature_clamped_at_ln_100_after_every_step():
    model = full_model()
    model.method.logit_scale.data.fill_(5.0)  # exp(5) = 148 > 100
    step_with_grads(model, 0.0, 0.0)
    assert model.method.logit_scale.item() == pytest.approx(math.log(100), abs=1e-6)


def micro_batch(seed, B=3, T=2):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 400, (B, 8), generator=g)
    text[:, 0], text[:, 5] = 49406, 49407  # SOT, EOT
    return dict(video=torch.randint(0, 256, (B, T, 3, 32, 32), dtype=torch.uint8, generator=g), text=text,
                video_mask=torch.ones(B, T, dtype=torch.bool))


def gradients_after(model, batches, accum):
    model.zero_grad(set_to_none=True)
    for b in batches:
        train.forward_backward(model, b, train.Position(), CPU, SimpleNamespace(accum=accum, stage="finetune"))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_averages_its_micro_batches():
    model, b1, b2 = full_model(), micro_batch(1), micro_batch(2)
    g1, g2 = gradients_after(model, [b1], 1), gradients_after(model, [b2], 1)
    both = gradients_after(model, [b1, b2], 2)
    mean = {n: (g1[n] + g2[n]) / 2 for n in g1}
    for n in mean:  # a summing loop would give twice this
        assert_close32(both[n], mean[n], GRADIENT, n, gradient_floor(mean.values()))


def test_each_epoch_has_its_own_batch_order_and_repeats_it():
    def order(epoch, start=0):
        s = data.EpochSampler(40, 4, 10, 0, 1, seed=7)
        s.set_epoch(epoch, start)
        return [i for _, i in s]
    assert order(0) == order(0) and sorted(order(0)) == list(range(40))
    assert order(1) != order(0) and sorted(order(1)) == list(range(40))
    assert order(1, start=3) == order(1)[12:]  # a resume mid-epoch continues the same order


def test_the_loop_moves_the_sampler_to_each_epoch(setup, tmp_path, monkeypatch):
    seen = []
    get = data.SeededItems.__getitem__
    monkeypatch.setattr(data.SeededItems, "__getitem__", lambda self, key: seen.append(key) or get(self, key))
    train.main(["--method", "full", "--data_path", str(setup / "synthetic"), "--clip", str(setup / "clip.pt"),
                "--output_dir", str(tmp_path), "--num_workers", "0", "--max_frames", "2", "--batch_size", "24",
                "--epochs", "2", "--clip_lr", "1e-4", "--max_words", "16"])
    train_keys = [k for k in seen if isinstance(k, tuple)]
    epochs = [[i for e, i in train_keys if e == epoch] for epoch in (0, 1)]
    assert len(epochs[0]) == len(epochs[1]) == 72 and epochs[0] != epochs[1]


def test_dsl_rows_sit_beside_the_plain_rows():
    # 3 captions x 3 videos; video 2 is every caption's favourite, which DSL's column softmax discounts
    sim = torch.tensor([[5.0, 1.0, 6.0], [1.0, 5.0, 6.0], [1.0, 1.0, 6.5]])
    split = SimpleNamespace(caption_video=[0, 1, 2], twin=None)
    plain, both = retrieval.metrics_of(sim, split), retrieval.metrics_of(sim, split, dsl=True)
    assert set(plain) == {"t2v", "v2t"} and set(both) == {"t2v", "v2t", "DSL t2v", "DSL v2t"}
    assert both["t2v"] == plain["t2v"] and both["v2t"] == plain["v2t"]
    assert plain["t2v"]["R@1"] == pytest.approx(100 / 3) and both["DSL t2v"]["R@1"] == pytest.approx(100.0)
