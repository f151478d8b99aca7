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
from messages import assert_tells

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:FutureWarning")  # the archive case


def sha256(content):
    return hashlib.sha256(content).hexdigest()


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fake model "tiny" (the bytes of a tiny CLIP) and, in the cache, a tiny.pt with the wrong SHA256."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    buf = io.BytesIO()
    torch.save(make_tiny_clip().state_dict(), buf)
    good = buf.getvalue()
    monkeypatch.setitem(clip._MODELS, "tiny", ("tiny.pt", sha256(good)))
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
    assert target.read_bytes() == good[:1000]  # nothing lost
    assert os.listdir(target.parent) == ["tiny.pt"]  # and no temporary left
    # the cached file, its SHA256 and the one it should have, that it was kept; the fix: which file to put there
    assert_tells(str(e.value), target, sha256(good[:1000]), sha256(good), "kept", "download tiny.pt")


def test_wrong_sha_cached_file_kept_when_the_download_is_bad_too(cache, monkeypatch):
    target, good = cache
    serve(monkeypatch, good[:-1] + b"!")
    with pytest.raises(clip.ModelFileError) as e:
        clip.load("tiny")
    # the download's SHA256 and the one it should have, that it was discarded, the cached file kept
    assert_tells(str(e.value), sha256(good[:-1] + b"!"), sha256(good), "discarded", target, "kept")
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
    facts = {"text": ["text file", "export CLIP=ViT-B/32"],  # what the file is (its start, for text)
             "empty": ["0 bytes"],
             "random": ["neither a torch file nor text"],
             "cut": ["zip archive", "cut off"],
             "cut_archive": ["zip archive", "cut off"],
             "train_checkpoint": ["train.py's checkpoint.pt", "--checkpoint", "--init", "--clip"],  # where it goes
             "linear": ["visual.conv1.weight", "weight, bias"],  # the key it lacks, the keys it has
             "not_tensors": ["not all tensors"],
             "resnet": ["ResNet", "ViT-B/32"],  # what is supported instead
             "wrong_shape": ["clip.CLIP", "state_dict"]}[kind]  # the model it does not fit, torch's reason
    before = path.read_bytes()
    with pytest.raises(clip.ModelFileError) as e:
        clip.load(str(path))
    msg = assert_tells(str(e.value), *facts)
    assert msg.startswith(str(path)) and (kind == "resnet" or clip.CLIP_FILE in msg)  # the file, what it should be
    assert "weights_only" not in msg and path.read_bytes() == before
