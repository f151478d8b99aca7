"""clip.py's model shapes: OpenAI's four ViT configs against facts of the official code, and ResNet CLIPs refused.

tests/fixtures/clip_manifests.json holds facts produced once by openai/CLIP@d05afc4's own CLIP class on the
meta device: every state-dict key, its shape and the parameter count.
"""
import json
import os

import pytest
import torch

import clip
from conftest import TINY, make_tiny_clip

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
N_PARAMS = {"ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737, "ViT-L/14": 427_616_513, "ViT-L/14@336px": 427_944_193}


@pytest.mark.parametrize("name", list(N_PARAMS))
def test_real_configs_match_openai_manifest(name):
    with open(os.path.join(FIXTURES, "clip_manifests.json")) as f:
        manifest = json.load(f)[name]
    with torch.device("meta"):  # shapes only, no memory
        model = clip.CLIP(**manifest["config"])
        rebuilt = clip.build_model(model.state_dict())  # config inference on the real shapes
    for m in (model, rebuilt):
        assert {k: list(v.shape) for k, v in m.state_dict().items()} == manifest["shapes"]
        assert sum(p.numel() for p in m.parameters()) == manifest["n_params"] == N_PARAMS[name]
        assert m.visual.transformer.resblocks[0].attn.heads == manifest["config"]["vision_width"] // 64
        assert m.transformer.resblocks[0].attn.heads == manifest["config"]["transformer_heads"]  # 64-dim heads
    assert name in clip.available_models()


def test_resnet_checkpoint_refused():
    sd = {k: v for k, v in make_tiny_clip().state_dict().items() if not k.startswith("visual.")}
    sd.update({"visual.conv1.weight": torch.zeros(32, 3, 3, 3),
               "visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
               "visual.attnpool.positional_embedding": torch.zeros(50, 2048)})  # RN50-like names
    with pytest.raises(ValueError, match="ResNet"):
        clip.build_model(sd)
    with pytest.raises(ValueError, match="ViT"):
        clip.CLIP(**dict(TINY, vision_layers=(3, 4, 6, 3)))
