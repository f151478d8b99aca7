"""The query mode: --data folder's reader, the right clip found, cached video features reused and invalidated,
query.py's script and train.py --query."""
import os
from contextlib import nullcontext
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import data
import methods
import pictures
import query
import train
from messages import assert_tells, one_error

COLOURS = dict(red=(0, 0, 255), green=(0, 255, 0), blue=(255, 0, 0))  # BGR


class ColourToy(torch.nn.Module):
    """A method whose answer is certain: a video is its mean colour, a caption the colour words it names."""
    uses_clip = False
    normalize_pixels = staticmethod(lambda video: video.float() / 255)
    similarity = None

    def __init__(self, num_frames, size=16):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))
        self.logit_scale = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        self.words = torch.tensor([data.tokenize(c, 3)[1] for c in ("red", "green", "blue")])  # their BPE ids
        self.video_calls = 0

    def param_groups(self, weight_decay):
        return [dict(params=[self.gain], weight_decay=0.0)]

    def encode_text(self, text):  # [B, L] -> [B, 3]: which of red, green, blue the caption names
        return (text[:, :, None] == self.words).any(1).float() * self.gain

    def encode_video(self, video, video_mask):  # [B, T, 3, S, S] -> mean RGB [B, 3]
        self.video_calls += 1
        return video.mean((1, 3, 4)) + 0.01


@pytest.fixture
def colour_folder(tmp_path):
    """A folder of three one-colour clips (one nested, upper-case extension) and a file that is no video."""
    (tmp_path / "clips" / "more").mkdir(parents=True)
    for name, colour in (("red.mp4", "red"), ("more/green.MP4", "green"), ("blue.avi", "blue")):
        data.write_video(str(tmp_path / "clips" / name), [np.full((16, 16, 3), COLOURS[colour], np.uint8)] * 4)
    (tmp_path / "clips" / "notes.txt").write_text("not a video")
    return tmp_path / "clips"


def test_folder_reader(colour_folder, tmp_path):
    split = data.read_split("folder", "test", None, str(colour_folder))
    assert [os.path.relpath(v, colour_folder) for v in split.videos] == ["blue.avi", "more/green.MP4", "red.mp4"]
    assert split.captions == [] and split.caption_video == [] and all(os.path.isabs(v) for v in split.videos)
    ds = data.VideoTextDataset(split, frames=2, words=8, size=8, train=False, mode="videos")
    assert len(ds) == 3 and ds[1]["video"].shape == (2, 3, 8, 8) and ds[1]["video_mask"].all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError) as e:
        data.read_folder(str(tmp_path / "empty"))
    assert_tells(str(e.value), "--video_path", tmp_path / "empty", "no video files")


def query_args(tmp_path, checkpoint, **kw):
    return SimpleNamespace(**{**dict(method="toy", kwargs={}, data="folder", checkpoint=str(checkpoint), clip=None,
                                      init=None, frames=2, words=16, size=8, frame_cache=None, batch_size_val=2,
                                      num_workers=0, output_dir=str(tmp_path), top_k=5, sampling="segments"), **kw})


def test_query_finds_the_clip_and_caches_video_features(colour_folder, tmp_path, capsys):
    split = data.read_folder(str(colour_folder))
    ck = tmp_path / "checkpoint.pt"
    torch.save(dict(model=dict(gain=torch.ones(()))), ck)
    method, args = ColourToy(2), query_args(tmp_path, ck)
    hits = query.search(method, "a green circle", split, query_args(tmp_path, ck, top_k=2), "cpu", nullcontext(),
                        picture=str(tmp_path / "query.png"))
    assert os.path.basename(hits[0][0]) == "green.MP4" and len(hits) == 2 and hits[0][1] > hits[1][1]
    assert method.video_calls == 2  # 3 videos in batches of 2
    out = capsys.readouterr().out
    assert "green.MP4" in out and "encoded 3 videos" in out
    assert cv2.imread(str(tmp_path / "query.png")).shape[1] > 2 * pictures.THUMB
    caches = [f for f in os.listdir(tmp_path) if f.startswith("checkpoint.pt.videos-")]
    assert len(caches) == 1
    # a second query: the cached features, no video encoded
    hits = query.search(method, "something blue", split, args, "cpu", nullcontext())
    assert os.path.basename(hits[0][0]) == "blue.avi" and method.video_calls == 2
    assert "from " + str(tmp_path / caches[0]) in capsys.readouterr().out
    # the checkpoint changes: encoded again, and the stale cache removed
    torch.save(dict(model=dict(gain=2 * torch.ones(()))), ck)
    query.search(method, "a red one", split, args, "cpu", nullcontext())
    assert method.video_calls == 4
    after = [f for f in os.listdir(tmp_path) if f.startswith("checkpoint.pt.videos-")]
    assert len(after) == 1 and after != caches
    # other frame settings are another cache, the checkpoint's first one stays
    query.search(method, "a red one", split, query_args(tmp_path, ck, frames=3), "cpu", nullcontext())
    assert method.video_calls == 6
    assert len([f for f in os.listdir(tmp_path) if f.startswith("checkpoint.pt.videos-")]) == 2
    # so is another split, read with another --data: the same model, so nothing is removed
    other = data.Split("other", split.videos[:2], [], [])
    query.search(method, "a red one", other, query_args(tmp_path, ck, data="msrvtt"), "cpu", nullcontext())
    assert method.video_calls == 7
    assert len([f for f in os.listdir(tmp_path) if f.startswith("checkpoint.pt.videos-")]) == 3


def test_query_script(colour_folder, tmp_path, monkeypatch, capsys):
    """python query.py --data folder --video_path DIR --checkpoint CK --query ...: the model as its run built it;
    python train.py with --query runs the same."""
    monkeypatch.setitem(methods.METHODS, "toy", (ColourToy, dict(lr=1e-3, epochs=1, batch_size=2, frames=2, words=16,
                                                               weight_decay=0.0, warmup=0.1, grad_clip=1.0), {}))
    ck = tmp_path / "checkpoint.pt"
    torch.save(dict(model=dict(gain=torch.ones(())), args=dict(method="toy", data="synthetic", data_path=None,
                                                                clip="unused.pt", frames=3, words=16, size=8,
                                                                kwargs={})), ck)
    argv = ["--method", "toy", "--data", "folder", "--video_path", str(colour_folder), "--checkpoint", str(ck),
            "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]
    hits = query.main(argv + ["--query", "the red clip", "--top_k", "3"])
    assert [os.path.basename(v) for v, _ in hits][0] == "red.mp4" and len(hits) == 3
    assert os.path.isfile(tmp_path / "out" / "query.png")
    assert "--max_frames 3" in capsys.readouterr().out  # frames from the checkpoint's run
    assert train.main(argv + ["--query", "the red clip", "--top_k", "3"]) == hits
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)  # no --query
    assert e.value.code == 2
    one_error(capsys.readouterr().err, "--data folder", "--query")
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--method", "ump", "--query", "a red circle"])  # a method that trains, no checkpoint
    assert e.value.code == 2
    one_error(capsys.readouterr().err, "--query", "--method ump", "--checkpoint")
