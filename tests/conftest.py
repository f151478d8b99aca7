"""Shared fixtures: tiny CLIP configs built with OpenAI's constructor arguments (CPU, seconds), and the tiny
synthetic run setup of the train.py tests."""
import pytest
import torch

import clip
import synthetic

# 32 px frames, 8 px patches (16 patches + CLS), widths 64 (one 64-dim head), 2 layers per tower
TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)


def make_tiny_clip(seed=0, **overrides):
    torch.manual_seed(seed)
    return clip.CLIP(**{**TINY, **overrides}).eval()


@pytest.fixture
def tiny_clip():
    return make_tiny_clip()


@pytest.fixture
def one_thread():  # tiny tensors: one thread is as fast, and far faster on a loaded machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_run_dir(tmp, n_train=24):
    """tmp/synthetic: a synthetic set of n_train training clips (3 captions each) and 8 test clips;
    tmp/clip.pt: a random tiny CLIP checkpoint. -> tmp"""
    synthetic.make_synthetic(str(tmp / "synthetic"), n_train=n_train, n_test_pairs=4)
    torch.save(make_tiny_clip().state_dict(), tmp / "clip.pt")
    return tmp


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 24-clip synthetic set (72 training pairs, 8 test clips) and a random tiny CLIP checkpoint."""
    return make_run_dir(tmp_path_factory.mktemp("run"))
