"""Shared fixtures: tiny CLIP configs built with OpenAI's constructor arguments (CPU, seconds)."""
import pytest
import torch

import clip

# 32 px frames, 8 px patches (16 patches + CLS), widths 64 (one 64-dim head), 2 layers per tower
TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)


def make_tiny_clip(seed=0, **overrides):
    torch.manual_seed(seed)
    return clip.CLIP(**{**TINY, **overrides}).eval()


@pytest.fixture
def tiny_clip():
    return make_tiny_clip()
