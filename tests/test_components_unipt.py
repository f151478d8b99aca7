"""UniPT (unipt.py): one test per paper component (docs/unipt.md), each failing when that component alone is
broken. The side network is written out step by step (the numbered steps of ParallelSideNetwork.forward, one
layer and one sample at a time, the release's loop over taps) and compared within the float32 bound of
tests/equivalence.py."""
import pytest
import torch
import torch.nn.functional as F

import clip
import unipt
from conftest import make_tiny_clip
from equivalence import FORWARD, assert_close32


def side_written_out(net, taps, anchor, mask, position):
    """-> (output [N, E], c [N, L+1]) for taps [L+1, N, S, H], anchor [N, E], mask [N, S] bool, position [N]."""
    outs, cs = [], []
    for i in range(taps.shape[1]):
        q = net.downsample_layer(anchor[i])  # step 1: W_a ReLU(a) + b_a
        m = mask[i].float()  # [S]
        ys, gates = [], []
        for phi, h in zip(net.downsample_layers, taps[:, i]):
            X = phi(h)  # step 2: W_l ReLU(h_l) + b_l, [S, M]
            x_bar = (X * m[:, None]).sum(0) / m.sum()  # step 3: mean over the valid tokens
            r = torch.relu(X @ q) * m  # step 4: ReLU scores of the valid tokens, L1-normalised
            alpha = r / r.sum().clamp(min=1e-6)
            ys.append(alpha @ X + X[position[i]])  # step 5: plus the same-position token
            gates.append(net.gate_layer(q * x_bar))  # step 6: theta(q * x_bar_l)
        c = torch.cat(gates).softmax(0)  # softmax over layers
        outs.append(anchor[i] + net.upsample_layer((c[:, None] * torch.stack(ys)).sum(0)))  # step 7
        cs.append(c)
    return torch.stack(outs), torch.stack(cs)


@pytest.fixture
def case():
    torch.manual_seed(0)
    net = unipt.ParallelSideNetwork(num_taps=3, width=16, embed_dim=8)
    with torch.no_grad():  # biases off zero so that every term matters
        [p.add_(0.1 * torch.randn_like(p)) for p in net.parameters()]
    taps, anchor = torch.randn(3, 2, 6, 16), torch.randn(2, 8)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    return net, taps, anchor, mask, torch.tensor([3, 5])


def test_side_network_output_steps_1_to_7(case):
    net, taps, anchor, mask, position = case
    with torch.no_grad():
        out, _ = net(taps, anchor, mask, position)
        assert_close32(out, side_written_out(net, taps, anchor, mask, position)[0], FORWARD,
                       "side network output (steps 1-7)")


def test_confidence_gate_over_layers_of_the_masked_mean(case):
    """Steps 3 and 6: c = softmax over layers of theta(q * mean of the valid tokens' X_l)."""
    net, taps, anchor, mask, position = case
    with torch.no_grad():
        _, c = net(taps, anchor, mask, position)
        assert_close32(c, side_written_out(net, taps, anchor, mask, position)[1], FORWARD, "confidence gate c")


def test_tap_projection_reads_relu_of_the_taps(case):
    """Step 2: X_l = W_l ReLU(h_l) + b_l, so the taps' negative entries do not matter."""
    net, taps, anchor, mask, position = case
    with torch.no_grad():
        out = net(taps, anchor, mask, position)[0]
        more_negative = torch.where(taps < 0, 3 * taps, taps)
        assert torch.equal(net(more_negative, anchor, mask, position)[0], out), "tap projection: no ReLU before it"


def test_padded_tokens_change_nothing(case):
    """Steps 3-5 see the valid tokens only: anything in the padded positions leaves output and gate unchanged."""
    net, taps, anchor, mask, position = case
    junk = taps.clone()
    junk[:, 0, 4:] = 5 * torch.randn(3, 2, 16)
    with torch.no_grad():
        for a, b in zip(net(taps, anchor, mask, position), net(junk, anchor, mask, position)):
            assert torch.equal(a, b), "side network reads padded tokens"


def test_frozen_taps_embedding_stage_then_every_block():
    clip_model = make_tiny_clip()
    ids = clip.tokenize(["a red circle moves left", "a dog"], context_length=10)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, taps = unipt.frozen_text_taps(clip_model, ids)
        x = clip_model.embed_text(ids)
        assert torch.equal(taps[0], x), "text taps: tap 0 is the embedding stage"
        for l, block in enumerate(clip_model.transformer.resblocks):
            x = block(x, is_causal=True)
            assert torch.equal(taps[l + 1], x), f"text taps: tap {l + 1} is not causal block {l}'s output"
        _, taps = unipt.frozen_image_taps(clip_model, images)
        x = clip_model.visual.embed(images)
        assert torch.equal(taps[0], x), "image taps: tap 0 is after ln_pre"
        for l, block in enumerate(clip_model.visual.transformer.resblocks):
            x = block(x)
            assert torch.equal(taps[l + 1], x), f"image taps: tap {l + 1} is not block {l}'s output"


def test_meanp_over_valid_frames_of_normalised_side_outputs():
    torch.manual_seed(1)
    model = unipt.UniPT(make_tiny_clip(), num_frames=3)
    video = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        frames = F.normalize(model.encode_frames(video), dim=-1)
        ref = torch.stack([frames[0, :2].mean(0), frames[1].mean(0)])
        assert_close32(model.encode_video(video, mask), ref, FORWARD, "meanP over the valid frames")
