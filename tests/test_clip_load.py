"""clip.py loading: config inference, strict loads (plain files, TorchScript archives), downloads (SHA256, atomic
rename, re-fetch, offline message, XDG_CACHE_HOME), the oracle. OpenAI's four configs and the ResNet refusal:
test_clip_configs.py; bad model files: test_clip_faults.py."""
import hashlib
import io
import os
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clip
from conftest import TINY, make_tiny_clip
from equivalence import FORWARD, GRADIENT, assert_close32, gradient_floor
from messages import assert_tells

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:FutureWarning")  # archives are TorchScript
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# a second tiny config: 2 heads per tower, 48 px / 16 px patches (3x3 grid), 32-token context, 3 text layers
TINY2 = dict(TINY, embed_dim=16, image_resolution=48, vision_width=128, vision_patch_size=16, context_length=32,
             transformer_width=128, transformer_heads=2, transformer_layers=3)


def assert_same_model(a, b):
    torch.manual_seed(1)
    res = a.visual.input_resolution
    img = torch.randn(2, 3, res, res)
    txt = clip.tokenize(["a red circle moves left", "a dog"], a.context_length)
    assert a.state_dict().keys() == b.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(img), b.encode_image(img), rtol=0, atol=0)
        torch.testing.assert_close(a.encode_text(txt), b.encode_text(txt), rtol=0, atol=0)


@pytest.mark.parametrize("config", [TINY, TINY2], ids=["tiny", "tiny2"])
def test_build_model_infers_config_and_loads_strictly(config):
    model = make_tiny_clip(**config)
    sd = dict(model.state_dict(), input_resolution=torch.tensor(32), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))  # archive-only keys OpenAI's .pt files carry
    built = clip.build_model(sd)
    assert not built.training and all(p.dtype == torch.float32 for p in built.parameters())
    assert built.visual.transformer.resblocks[0].attn.heads == max(config["vision_width"] // 64, 1)
    assert built.transformer.resblocks[0].attn.heads == config["transformer_heads"]
    assert_same_model(model, built)


def test_load_plain_state_dict_file(tmp_path):
    model = make_tiny_clip(**TINY2)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "wrapped.pt")
    assert_same_model(model, clip.load(str(tmp_path / "plain.pt")))
    assert_same_model(model, clip.load(str(tmp_path / "wrapped.pt")))


class Archive(nn.Module):
    """Like OpenAI's .pt files: a TorchScript module holding CLIP's fp16 weights under OpenAI's names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("load() must not run archived code")


def test_load_torchscript_archive(tmp_path):
    model = make_tiny_clip(**TINY2)
    root = Archive()
    for name, t in model.state_dict().items():
        *path, leaf = name.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(leaf, nn.Parameter(t.half(), requires_grad=False))
    root.register_buffer("input_resolution", torch.tensor(48))
    torch.jit.save(torch.jit.script(root), str(tmp_path / "ViT-tiny.pt"))
    loaded = clip.load(str(tmp_path / "ViT-tiny.pt"))
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})  # what the archive holds
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert_same_model(model, loaded)


# ---- downloads (urlopen monkeypatched: no network) ---------------------------------------------------

@pytest.fixture
def cache(monkeypatch, tmp_path):
    """XDG_CACHE_HOME in tmp_path and a fake entry "tiny" in the model table whose bytes are a tiny CLIP."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    buf = io.BytesIO()
    torch.save(make_tiny_clip().state_dict(), buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(clip._MODELS, "tiny", ("tiny.pt", sha))
    served = []

    def serve(payload):  # urlopen replacement; records every URL it is asked for
        def urlopen(url, *args, **kwargs):
            served.append(url)
            if isinstance(payload, Exception):
                raise payload
            return io.BytesIO(payload)
        monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return dict(dir=tmp_path / "xdg" / "clip", data=data, sha=sha, served=served, serve=serve)


def test_download_verifies_renames_and_reuses_the_cache(cache):
    assert clip.default_cache_dir() == str(cache["dir"])  # XDG_CACHE_HOME respected
    cache["serve"](cache["data"])
    assert_same_model(make_tiny_clip(), clip.load("tiny"))
    assert os.listdir(cache["dir"]) == ["tiny.pt"] and len(cache["served"]) == 1
    assert cache["served"][0].endswith(f"/{cache['sha']}/tiny.pt")  # the hash is in OpenAI's URL
    cache["serve"](urllib.error.URLError("offline"))  # a verified cached file needs no network
    clip.load("tiny")
    assert len(cache["served"]) == 1


def test_wrong_hash_raises_and_leaves_no_file(cache, monkeypatch):
    cache["serve"](cache["data"][:-1] + b"!")
    for mod, fn in ((torch.jit, "load"), (torch, "load")):  # the hash is checked before anything is deserialised
        monkeypatch.setattr(mod, fn, lambda *a, **k: pytest.fail("a file with a wrong SHA256 was deserialised"))
    with pytest.raises(RuntimeError, match="SHA256"):
        clip.load("tiny")
    assert os.listdir(cache["dir"]) == []  # neither tiny.pt nor a temporary .part file


def test_cached_file_with_wrong_hash_is_fetched_again(cache):
    os.makedirs(cache["dir"])
    (cache["dir"] / "tiny.pt").write_bytes(b"truncated download")
    cache["serve"](cache["data"])
    assert_same_model(make_tiny_clip(), clip.load("tiny"))
    assert len(cache["served"]) == 1 and clip.sha256_of(cache["dir"] / "tiny.pt") == cache["sha"]


@pytest.mark.parametrize("error", [urllib.error.URLError("no route to host"),
                                   urllib.error.HTTPError("https://x", 404, "Not Found", None, None)])
def test_offline_or_404_error_says_where_to_put_the_file(cache, error):
    cache["serve"](error)
    with pytest.raises(RuntimeError) as e:
        clip.load("ViT-B/32")
    sha = cache["served"][0].split("/")[-2]  # the SHA256 in the URL it asked for, as the first test checks
    assert_tells(str(e.value), "ViT-B-32.pt", sha, cache["dir"] / "ViT-B-32.pt")  # the file, its hash, where to put it
    assert os.listdir(cache["dir"]) == []


def test_cache_dir_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert clip.default_cache_dir() == str(tmp_path / ".cache" / "clip")
    with pytest.raises(clip.ModelFileError, match="ViT-B/32"):  # neither a file nor a known name
        clip.load(str(tmp_path / "missing.pt"))


def test_matches_official_clip():
    """tests/fixtures/official_clip.pt: openai/CLIP's model.py on a tiny ViT (2-head vision attention, fp16-exact
    weights, LN weights and biases moved off their init, logit_scale ln 100), made by tests/oracles/make_fixtures.py."""
    ref = torch.load(os.path.join(FIXTURES, "official_clip.pt"), weights_only=True)
    model = clip.build_model(ref["state_dict"])  # infers the config from the official keys, loads strictly
    assert {k: getattr(model.visual, k) for k in ("input_resolution", "patch_size")} == dict(
        input_resolution=ref["config"]["image_resolution"], patch_size=ref["config"]["vision_patch_size"])
    images, text, out = ref["inputs"]["images"].float(), ref["inputs"]["text"], ref["outputs"]
    ours = dict(image_features=model.encode_image(images), text_features=model.encode_text(text),
                image_tokens=model.visual.head(model.visual.transformer(model.visual.embed(images))),
                text_tokens=model.text_head(model.transformer(model.embed_text(text), is_causal=True)),
                logits_per_image=model(images, text)[0])
    for k, v in ours.items():  # |values| <= 3.5 (logits <= 14)
        assert_close32(v, out[k], FORWARD, k)
    labels = torch.arange(len(images))
    loss = (F.cross_entropy(ours["logits_per_image"], labels) + F.cross_entropy(ours["logits_per_image"].t(), labels)) / 2
    assert_close32(loss, ref["loss"], FORWARD, "loss")  # loss 8.66, chance ln 4 = 1.39
    loss.backward()
    params = dict(model.named_parameters())
    assert len(ref["grads"]) == 39  # every tensor of <= 8192 entries: LNs, biases, embeddings, projections
    for k, g in ref["grads"].items():  # |grad| <= 59
        assert_close32(params[k].grad, g, GRADIENT, k, gradient_floor(ref["grads"].values()))


def test_interrupted_download_leaves_no_partial_file(cache, monkeypatch):
    class Cut(io.BytesIO):  # the first megabyte arrives, then the user presses Ctrl-C
        def read(self, n=-1):
            if self.tell():
                raise KeyboardInterrupt
            return super().read(n)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Cut(cache["data"] * 2))
    with pytest.raises(KeyboardInterrupt):
        clip.load("tiny")
    assert os.listdir(cache["dir"]) == []
