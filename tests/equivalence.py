"""The bound of every equivalence test against the official code: float32 round-off, scaled to the tensor.

Two float32 programs that compute the same function differ only by rounding, and how they round depends on the
machine: the SIMD width (ATEN_CPU_CAPABILITY default / avx2 / avx512), the thread count and the kernel chosen
change the order of every sum. So no bound may be a maximum measured on one CPU. Each comparison asserts

    max |ours - theirs|  <=  c * eps32 * max |theirs|        (per tensor; eps32 = 2^-23 = 1.19e-7)

with c from the arithmetic (docs/equivalence.md derives it): a dot product of length K summed in another order
moves by about sqrt(K) roundings of its magnitude (K in the worst case); a network of depth D, where the residual
stream keeps the scale and LayerNorm/softmax amplify little, adds the D layers' errors. The tiny models of the
fixtures have D <= 24 dependent matrix products (2-4 layers of ~6, plus embeddings and heads) and K <= 256, so
D * sqrt(K) <= 384: FORWARD = 512 leaves headroom for LayerNorm's 1/sigma. A gradient runs the graph twice
(2D) and sums over the batch and its tokens (N <= 4 x 77, sqrt(N) <= 18) where terms cancel, so its error is
measured against the largest term, not the sum: GRADIENT = 2 * 512 * 16 = 16384 (2e-3 relative). A gradient
that cancels to about zero (a softmax's bias, a dead slot) still carries the rounding of its summands, which are
at most the largest gradient G of the model: its scale is at least G / 512, so its bound is 32 eps32 G
(sqrt(4 x 77) ~ 18 roundings of G, twice). A component
that is wrong moves a tensor by 1e-2 to 1 of its scale (docs/equivalence.md lists the mutants we ran), so both
bounds sit orders of magnitude below a broken component and orders above any rounding we measured.

`NANOTVR_EQUIV_LOG=FILE python -m pytest ...` appends every comparison (test, name, |diff|, scale, |diff| in units
of eps32 * scale, c) to FILE: how docs/equivalence.md's margins were measured.
"""
import os

import torch

EPS32 = torch.finfo(torch.float32).eps
FORWARD = 512     # outputs: embeddings, logits, losses (D * sqrt(K) <= 384 for the fixtures' tiny models)
GRADIENT = 16384  # parameter gradients: twice the depth, and sums over up to 4 x 77 tokens (x 16 < sqrt(308))


def gradient_floor(grads):
    """The least scale of a gradient's bound: G / 512, G the largest entry of all the reference gradients."""
    return max(g.abs().max().item() for g in grads) / 512


def assert_close32(ours, theirs, c, name, floor=1e-6):
    """max|ours - theirs| <= c * eps32 * max(max|theirs|, floor)."""
    ours = torch.as_tensor(ours).detach().double()
    theirs = torch.as_tensor(theirs).detach().double()
    assert ours.shape == theirs.shape, (name, tuple(ours.shape), tuple(theirs.shape))
    diff = (ours - theirs).abs().max().item() if ours.numel() else 0.0
    scale = max(theirs.abs().max().item() if theirs.numel() else 0.0, floor)
    if os.environ.get("NANOTVR_EQUIV_LOG"):
        with open(os.environ["NANOTVR_EQUIV_LOG"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{name}\t{diff:.3g}\t{scale:.3g}"
                    f"\t{diff / (EPS32 * scale):.1f}\t{c}\n")
    assert diff <= c * EPS32 * scale, (f"{name}: |diff| {diff:.3g} is {diff / (EPS32 * scale):.0f} eps32 x max|ref| "
                                       f"({scale:.3g}); the bound is {c}")
