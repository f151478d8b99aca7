"""clip.load on bad model files: a cached file with the wrong SHA256 is kept until a verified download replaces
it; files that are not CLIP checkpoints raise ModelFileError naming the file and what it should be. No network:
urlopen is monkeypatched."""
import hashlib
import io
import os
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

import clip
from conftest import make_tiny_clip

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:FutureWarning")  # the archive case
SHOULD_BE = "It should be a CLIP checkpoint: an OpenAI .pt (TorchScript archive) or a state dict of clip.CLIP"


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fake model "tiny" (the bytes of a tiny CLIP) and, in the cache, a tiny.pt with the wrong SHA256."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    buf = io.BytesIO()
    torch.save(make_tiny_clip().state_dict(), buf)
    good = buf.getvalue()
    monkeypatch.setitem(clip._MODELS, "tiny", ("tiny.pt", hashlib.sha256(good).hexdigest()))
    folder = tmp_path / "xdg" / "clip"
    folder.mkdir(parents=True)
    (folder / "tiny.pt").write_bytes(good[:1000])  # an interrupted copy
    return folder / "tiny.pt", good


def serve(monkeypatch, payload, check=None):
    def urlopen(url, *args, **kwargs):
        if isinstance(payload, Exception):
            raise payload
        if check:
            check()
        return io.BytesIO(payload)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_wrong_sha_cached_file_kept_when_offline(cache, monkeypatch):
    target, good = cache
    serve(monkeypatch, urllib.error.URLError("no route to host"))
    with pytest.raises(clip.ModelFileError) as e:
        clip.load("tiny")
    msg, sha = str(e.value), clip._MODELS["tiny"][1]
    assert target.read_bytes() == good[:1000]  # nothing lost
    assert os.listdir(target.parent) == ["tiny.pt"]  # and no temporary left
    assert f"The cached {target} (SHA256 {hashlib.sha256(good[:1000]).hexdigest()}, not {sha}) was kept: delete " \
           "it, or replace it with a good copy." in msg
    assert f"To fix: download tiny.pt (SHA256 {sha}) on a machine with network access and copy it to {target}" in msg


def test_wrong_sha_cached_file_kept_when_the_download_is_bad_too(cache, monkeypatch):
    target, good = cache
    serve(monkeypatch, good[:-1] + b"!")
    with pytest.raises(clip.ModelFileError, match=r"downloaded tiny.pt from .* has SHA256 .*; the download was "
                       r"discarded .*The cached .*tiny.pt .* was kept"):
        clip.load("tiny")
    assert target.read_bytes() == good[:1000] and os.listdir(target.parent) == ["tiny.pt"]


def test_wrong_sha_cached_file_stays_until_the_new_one_is_verified(cache, monkeypatch):
    target, good = cache
    serve(monkeypatch, good, check=lambda: assert_still_there(target, good[:1000]))
    clip.load("tiny")
    assert target.read_bytes() == good and os.listdir(target.parent) == ["tiny.pt"]


def assert_still_there(target, content):
    assert target.read_bytes() == content  # the download has started; the old file is still in place


def save(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("kind", ["text", "empty", "random", "cut", "cut_archive", "train_checkpoint", "linear",
                                  "not_tensors", "resnet", "wrong_shape"])
def test_non_clip_files_named_with_what_they_should_be(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    sd = make_tiny_clip().state_dict()
    if kind == "text":
        path.write_text("export CLIP=ViT-B/32\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind in ("cut", "cut_archive"):
        if kind == "cut":
            save(path, sd)
        else:
            torch.jit.save(torch.jit.script(nn.Linear(64, 64)), str(path))
        whole = path.read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
    elif kind == "train_checkpoint":  # train.py's checkpoint.pt
        save(path, dict(model={"prompts": torch.zeros(4, 8)}, optimizer={}, scaler={}, step=3, epoch=1, batch=0))
    elif kind == "linear":
        save(path, nn.Linear(4, 4).state_dict())
    elif kind == "not_tensors":
        save(path, {"weights": [1, 2, 3]})
    elif kind == "resnet":
        save(path, {"visual.layer1.0.conv1.weight": torch.zeros(1), "token_embedding.weight": torch.zeros(1)})
    elif kind == "wrong_shape":
        save(path, {k: v for k, v in sd.items() if not k.startswith("transformer.resblocks.1.mlp")})
    expected = {"text": r"cannot be read as a torch file: it is a text file \(starting 'export CLIP=ViT-B/32\\n'\)",
                "empty": r"is empty \(0 bytes\)",
                "random": "cannot be read as a torch file: it is neither a torch file nor text",
                "cut": "cannot be read as a torch file: it is a zip archive, as torch files are, but cut off or "
                       "damaged",
                "cut_archive": "cannot be read as a torch file: it is a zip archive, as torch files are, but cut off",
                "train_checkpoint": "is a nanoTVR training checkpoint .train.py's checkpoint.pt., not CLIP weights: "
                                    "pass it as --checkpoint or --init",
                "linear": r"is not a CLIP state dict: it has no visual.conv1.weight, .* \(its keys: weight, bias\)",
                "not_tensors": "holds a dict that is not all tensors, not a state dict",
                "resnet": "is a ResNet CLIP model",
                "wrong_shape": r"does not fit clip.CLIP \(Error\(s\) in loading state_dict"}[kind]
    before = path.read_bytes()
    with pytest.raises(clip.ModelFileError, match=f"^{path} {expected}") as e:
        clip.load(str(path))
    assert str(e.value).endswith(SHOULD_BE) or kind == "resnet"
    assert "weights_only" not in str(e.value) and path.read_bytes() == before
