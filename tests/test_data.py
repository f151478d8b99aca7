"""data.py: MSR-VTT reader, frame sampling and masks, corrupt and missing videos, text, cache (the synthetic set: test_synthetic.py)."""
import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import clip
import data
import data_checks
import frame_cache
import frames


def write_gray_video(path, n, size=(48, 32)):
    """Frame k is flat gray 10*k, so a decoded frame tells which index it was."""
    data.write_video(str(path), [np.full((size[1], size[0], 3), 10 * k, np.uint8) for k in range(n)])


def frame_ids(video, mask):
    return [round(float(f.float().mean()) / 10) for f in video[mask]]


@pytest.fixture
def msrvtt(tmp_path):
    """video0, video1 train (9k), video2 test; video1 is unreadable; test sentence has CSV quoting."""
    ann, vids = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir(), vids.mkdir()
    sentences = [("video0", "a man sings"), ("video1", "a dog runs"), ("video0", "someone <|EndOfText|> sings"),
                 ("video2", "cars, trucks and \"bikes\""), ("video1", "a dog plays")]
    json.dump({"info": {}, "videos": [{"video_id": f"video{i}", "split": "train"} for i in range(3)],
               "sentences": [{"caption": c, "video_id": v, "sen_id": k} for k, (v, c) in enumerate(sentences)]},
              open(ann / "MSRVTT_data.json", "w"))
    for name, ids in [("MSRVTT_train.9k.csv", ["video0", "video1"]), ("MSRVTT_train.7k.csv", ["video0"])]:
        (ann / name).write_text("video_id\n" + "".join(i + "\n" for i in ids))
    with open(ann / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["key", "vid_key", "video_id", "sentence"],
                                 ["ret0", "msr2", "video2", sentences[3][1]]])
    write_gray_video(vids / "video0.mp4", 24)
    (vids / "video1.mp4").write_bytes(b"\x00not a video" * 50)
    write_gray_video(vids / "video2.mp4", 5)
    return str(ann), str(vids)


def test_msrvtt_reader(msrvtt):
    train = data.read_split("msrvtt", "train", *msrvtt)
    assert train.captions == ["a man sings", "someone <|EndOfText|> sings", "a dog runs", "a dog plays"]
    assert train.caption_video == [0, 0, 1, 1]
    assert [os.path.basename(v) for v in train.videos] == ["video0.mp4", "video1.mp4"]
    assert all(os.path.isabs(v) for v in train.videos)
    test = data.read_split("msrvtt", "test", *msrvtt)
    assert test.captions == ['cars, trucks and "bikes"'] and test.caption_video == [0]
    assert len(data.read_split("msrvtt7k", "train", *msrvtt).videos) == 1
    with pytest.raises(data.DataError, match="MSRVTT_JSFUSION_test.csv not found.*msrvtt_data.zip"):
        data.read_split("msrvtt", "test", msrvtt[1], msrvtt[1])
    with pytest.raises(data.DataError, match="unknown data set 'msr'.*msrvtt"):
        data.read_split("msr", "train", *msrvtt)


def test_duplicates_allowed_where_the_data_has_them(msrvtt, tmp_path):
    """A train list may repeat (it weights that video, as CLIP4Clip reads it); MSVD's test annotators wrote
    the same sentence for one video 3,730 times, and published numbers count every one."""
    ann, videos = msrvtt
    ann = Path(ann)
    (ann / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo0\n")
    assert len(data.read_split("msrvtt", "train", str(ann), videos).captions) == 6
    (tmp_path / "test_list.txt").write_text("video2\n")
    json.dump({"video2": ["a cat", "a cat", "a kitten"]}, open(tmp_path / "captions_msvd.json", "w"))
    assert data.read_split("msvd", "test", str(tmp_path), videos).captions == ["a cat", "a cat", "a kitten"]


def test_empty_captions_counted_and_dropped(msrvtt, tmp_path, capsys):
    ann, videos = msrvtt
    ann = Path(ann)
    json.dump({"sentences": [{"video_id": "video0", "caption": "a man"}, {"video_id": "video0", "caption": " "},
                             {"video_id": "video1", "caption": ""}, {"video_id": "video1", "caption": "a dog"}]},
              open(ann / "MSRVTT_data.json", "w"))
    split = data.read_split("msrvtt", "train", str(ann), videos)
    assert split.captions == ["a man", "a dog"] and split.caption_video == [0, 1]
    assert f"WARNING: {ann / 'MSRVTT_data.json'}: 2 empty train captions dropped; 2 left" in capsys.readouterr().err
    (ann / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\nret0,msr2,video2,a cat\n"
                                                  "ret1,msr3,video3,\n")
    with pytest.raises(data.DataError) as e:  # 1k-A has one caption per video: nothing would be left for video3
        data.read_split("msrvtt", "test", str(ann), videos)
    assert "MSRVTT_JSFUSION_test.csv has no non-empty caption for 1 of the 2 test videos" in str(e.value)
    assert "video3" in str(e.value)
    assert "1 empty test caption dropped; 1 left" in capsys.readouterr().err


def test_missing_videos_clear_error_or_loud_subset(msrvtt, capsys):
    os.remove(os.path.join(msrvtt[1], "video0.mp4"))
    with pytest.raises(data.DataError, match=r"1 of 2 msrvtt train videos are missing .*video0.*--allow_missing"):
        data.read_split("msrvtt", "train", *msrvtt)
    split = data.read_split("msrvtt", "train", *msrvtt, allow_missing=True)
    assert split.captions == ["a dog runs", "a dog plays"] and split.caption_video == [0, 0]
    assert "present videos only" in capsys.readouterr().err


def test_segments_sampling():  # nanoTVR's own rule (the synthetic set); the releases': tests/test_pipelines.py
    assert frames.sample_frames(24, 8, 12, "segments", train=False) == (list(range(1, 24, 2)), 12)  # segment centres
    assert frames.sample_frames(5, 8, 12, "segments", train=False) == ([0, 1, 2, 3, 4], 5)  # short: every frame
    torch.manual_seed(0)
    draws = [frames.sample_frames(30, 8, 4, "segments", train=True)[0] for _ in range(200)]
    for k, (lo, hi) in enumerate([(0, 7), (7, 15), (15, 22), (22, 30)]):  # edges 0, 7.5, 15, 22.5, 30
        seen = {d[k] for d in draws}
        assert min(seen) >= lo and max(seen) < hi and len(seen) > 1


def test_frames_mask_and_padding(msrvtt):
    test = data.read_split("msrvtt", "test", *msrvtt)
    item = data.VideoTextDataset(test, frames=8, words=16, size=32, train=False, mode="videos")[0]
    assert item["video"].shape == (8, 3, 32, 32) and item["video"].dtype == torch.uint8
    assert item["video_mask"].tolist() == [True] * 5 + [False] * 3  # 5-frame clip: zero padding, masked
    assert frame_ids(item["video"], item["video_mask"]) == [0, 1, 2, 3, 4]
    assert item["video"][5:].abs().sum() == 0
    train = data.read_split("msrvtt", "train", *msrvtt)
    item = data.VideoTextDataset(train, frames=6, words=16, size=32, train=False, mode="pairs")[0]
    assert frame_ids(item["video"], item["video_mask"]) == [2, 6, 10, 14, 18, 22]  # 24 frames, centres
    first_second = data.read_frames(train.videos[0], 4, train=False, max_seconds=1.0)  # 8 fps: frames 0-7
    assert [round(f.mean() / 10) for f in first_second] == [1, 3, 5, 7]


def test_truncated_file_with_wrong_frame_count(tmp_path):
    writer = cv2.VideoWriter(str(tmp_path / "t.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 8, (48, 32))
    for k in range(24):
        writer.write(np.full((32, 48, 3), 10 * k, np.uint8))
    writer.release()
    whole = (tmp_path / "t.avi").read_bytes()
    (tmp_path / "t.avi").write_bytes(whole[:len(whole) * 6 // 10])  # header still says 24 frames
    frames = data.read_frames(str(tmp_path / "t.avi"), 12, train=False)
    assert 0 < len(frames) < 12 and [round(f.mean() / 10) for f in frames] == list(range(len(frames)))


def test_corrupt_video_substituted_in_training_error_at_eval(msrvtt, capfd):
    train = data.read_split("msrvtt", "train", *msrvtt)
    ds = data.VideoTextDataset(train, frames=4, words=16, size=32, train=True)
    loader = data.make_loader(ds, batch_size=4, shuffle=False, num_workers=1)
    batch = next(iter(loader))  # decoded in a worker process
    assert batch["video"].shape == (4, 4, 3, 32, 32) and batch["text"].dtype == torch.long
    # captions 2, 3 belong to the bad video1: replaced by the next caption (wrapping round) of video0
    assert batch["caption_index"].tolist() == [0, 1, 0, 0] and batch["video_index"].tolist() == [0, 0, 0, 0]
    assert ds.substitutions == 2 and [os.path.basename(v) for v in ds.corrupt_videos] == ["video1.mp4"]
    assert capfd.readouterr().err.count("unreadable video") == 1  # logged once, by the worker
    eval_ds = data.VideoTextDataset(train, frames=4, words=16, size=32, train=False, mode="videos")
    assert eval_ds[0]["video_mask"].all()
    with pytest.raises(data.VideoError, match="video1.mp4.*Evaluation needs every test video"):
        eval_ds[1]


def test_text_tokens_and_sanitising():
    ids = data.tokenize("Someone <|EndOfText|> sings &lt;|startoftext|&gt; loudly", 16)
    assert ids.dtype == torch.long and ids.shape == (16,)
    eot = (ids == clip.EOT).nonzero().flatten().tolist()
    assert eot == [int(ids.argmax())] and clip.SOT not in ids[1:].tolist()
    assert torch.equal(ids, data.tokenize("someone sings loudly", 16))
    long = data.tokenize("word " * 40, 8)
    assert long[-1] == clip.EOT and long[0] == clip.SOT and (long != 0).all()


def test_frame_cache_equals_decoding(msrvtt, tmp_path):
    train = data.read_split("msrvtt", "train", *msrvtt)
    cache = str(tmp_path / "cache")
    with pytest.raises(data.DataError) as e:  # no cache yet: which folder, and the command that builds it
        data.VideoTextDataset(train, frames=6, words=8, size=32, train=False, frame_cache=cache)
    assert cache in str(e.value) and f"python frame_cache.py --cache {cache}" in str(e.value)
    errors = frame_cache.build_frame_cache(train.videos, cache, size=32, fps=0, workers=0)  # fps 0: every frame
    assert len(errors) == 1 and "video1.mp4" in errors[0]
    decoded = data.VideoTextDataset(train, frames=6, words=8, size=32, train=False, mode="videos")[0]
    cached = data.VideoTextDataset(train, frames=6, words=8, size=32, train=False, mode="videos",
                                   frame_cache=cache)
    assert np.load(data_checks.cache_file(cache, train.videos[0])).shape == (24, 3, 32, 32)
    assert torch.equal(cached.load_video(0)[0], decoded["video"])


def test_loader_distributed_sampler(msrvtt, tmp_path):
    train = data.read_split("msrvtt", "train", *msrvtt)
    ds = data.VideoTextDataset(train, frames=2, words=8, size=16, train=False, mode="texts")
    assert len(ds) == 4 and ds[3]["caption_index"] == 3
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        loader = data.make_loader(ds, batch_size=3, shuffle=True, num_workers=0, distributed=True, drop_last=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler) and loader.sampler.shuffle
        loader.sampler.set_epoch(1)
        assert [b["text"].shape for b in loader] == [(3, 8)]  # drop_last
    finally:
        torch.distributed.destroy_process_group()
