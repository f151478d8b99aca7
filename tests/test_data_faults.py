"""data.py on damaged input: every fault is a DataError naming the file, the line/key/column and the download;
annotation files are never changed; check_videos() names all unreadable videos at once; MSVD in both formats."""
import collections
import csv
import json
import os
import pickle
import runpy
import sys

import numpy as np
import pytest

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSRVTT = "CLIP4Clip's msrvtt_data.zip"


def touch(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), "wb").close()


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture
def msrvtt(tmp_path):
    """MSR-VTT's four files (2 train videos x 2 captions, 2 test videos); videos are empty stand-ins."""
    ann = tmp_path / "ann"
    ann.mkdir()
    json.dump({"videos": [], "sentences": [{"video_id": v, "caption": f"{v} caption {k}", "sen_id": 2 * i + k}
                                           for i, v in enumerate(["video0", "video1"]) for k in range(2)]},
              open(ann / "MSRVTT_data.json", "w"))
    write_csv(ann / "MSRVTT_train.9k.csv", [["video_id"], ["video0"], ["video1"]])
    write_csv(ann / "MSRVTT_train.7k.csv", [["video_id"], ["video0"]])
    write_csv(ann / "MSRVTT_JSFUSION_test.csv", [["key", "vid_key", "video_id", "sentence"],
                                                 ["ret0", "msr2", "video2", "a cat, sleeping"],
                                                 ["ret1", "msr3", "video3", "a dog"]])
    touch(tmp_path / "videos", *(f"video{i}.mp4" for i in range(4)))
    return ann, str(tmp_path / "videos")


def raises_unchanged(path, match, *read):
    """read_split(*read) raises a DataError matching `match`, and the file at `path` is left as it was."""
    before = open(path, "rb").read()
    with pytest.raises(data.DataError, match=match) as e:
        data.read_split(*read)
    assert open(path, "rb").read() == before
    return str(e.value)


# ---- annotation files --------------------------------------------------------------------------------

def test_csv_without_its_column(msrvtt):
    ann, videos = msrvtt
    path = ann / "MSRVTT_JSFUSION_test.csv"
    write_csv(path, [["key", "vid_key", "video_id"], ["ret0", "msr2", "video2"]])
    msg = raises_unchanged(path, "no 'sentence' column", "msrvtt", "test", str(ann), videos)
    assert msg == (f"{path} has no 'sentence' column (columns: key, vid_key, video_id): this file comes from "
                   f"{MSRVTT} (README, 'Data sets')")


@pytest.mark.parametrize("row, found", [(["ret1", "msr3", "video3"], "3 fields, the header has 4 .cut off"),
                                        (["ret1", "msr3", "video3", "a dog", "barks"], "5 fields.*unquoted")])
def test_csv_row_with_the_wrong_number_of_fields(msrvtt, row, found):
    ann, videos = msrvtt
    path = ann / "MSRVTT_JSFUSION_test.csv"
    write_csv(path, [["key", "vid_key", "video_id", "sentence"], ["ret0", "msr2", "video2", "a cat"], row])
    raises_unchanged(path, f"MSRVTT_JSFUSION_test.csv line 3 has {found}", "msrvtt", "test", str(ann), videos)


def test_csv_cut_off_inside_a_quoted_caption(msrvtt):
    ann, videos = msrvtt
    path = ann / "MSRVTT_JSFUSION_test.csv"
    path.write_text('key,vid_key,video_id,sentence\nret0,msr2,video2,"a cat, sle')
    raises_unchanged(path, r"MSRVTT_JSFUSION_test.csv is not valid CSV at line 2 \(unexpected end of data; cut off\?\)",
                     "msrvtt", "test", str(ann), videos)


def test_empty_csv_and_empty_list(msrvtt, tmp_path):
    ann, videos = msrvtt
    (ann / "MSRVTT_train.9k.csv").write_bytes(b"")
    raises_unchanged(ann / "MSRVTT_train.9k.csv", r"MSRVTT_train.9k.csv is empty \(no header line\): this file "
                     f"comes from {MSRVTT}", "msrvtt", "train", str(ann), videos)
    (tmp_path / "test_list.txt").write_text("\n\n")
    raises_unchanged(tmp_path / "test_list.txt", r"test_list.txt is empty \(no video ids\).*msvd_data.zip",
                     "msvd", "test", str(tmp_path), videos)


def test_json_cut_off_empty_or_malformed(msrvtt):
    ann, videos = msrvtt
    path = ann / "MSRVTT_data.json"
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    raises_unchanged(path, r"MSRVTT_data.json is not valid JSON: .* at line 1, column \d+ where the file ends "
                     rf"\(cut off\?\): this file comes from {MSRVTT}", "msrvtt", "train", str(ann), videos)
    path.write_bytes(b"")  # UMP_TVR's repository holds a 0-byte MSRVTT_data.json
    raises_unchanged(path, r"MSRVTT_data.json is empty \(0 bytes; UMP_TVR's repository holds an empty placeholder",
                     "msrvtt", "train", str(ann), videos)
    path.write_text('{"sentences": [\n{"video_id": "video0", "caption": "x"}\n{"video_id": "video1"}]}')
    msg = raises_unchanged(path, r"not valid JSON: Expecting ',' delimiter at line 3, column 1", "msrvtt", "train",
                           str(ann), videos)
    assert "cut off" not in msg


def test_json_item_without_its_key(msrvtt, tmp_path):
    ann, videos = msrvtt
    path = ann / "MSRVTT_data.json"
    json.dump({"sentences": [{"video_id": "video0", "caption": "x"}, {"video_id": "video1", "text": "y"}]},
              open(path, "w"))
    raises_unchanged(path, r"MSRVTT_data.json has no 'caption' key in sentences\[1\] \(keys: video_id, text\): "
                     f"this file comes from {MSRVTT}", "msrvtt", "train", str(ann), videos)
    json.dump({"videos": []}, open(path, "w"))
    raises_unchanged(path, "no 'sentences' key in the top-level object", "msrvtt", "train", str(ann), videos)
    (tmp_path / "test_list.txt").write_text("video2\n")  # DiDeMo: an item without its description
    json.dump([{"video": "video2", "times": [[0, 0]]}], open(tmp_path / "test_data.json", "w"))
    raises_unchanged(tmp_path / "test_data.json", r"test_data.json has no 'description' key in item 0 \(keys: "
                     r"video, times\).*DiDeMo", "didemo", "test", str(tmp_path), videos)
    json.dump({"v_video2": {"duration": 3.0}}, open(tmp_path / "val_1.json", "w"))  # ActivityNet
    raises_unchanged(tmp_path / "val_1.json", r"no 'sentences' key in \['v_video2'\].*ActivityNet",
                     "activitynet", "test", str(tmp_path), videos)


def test_pickle_cut_off_or_empty(tmp_path):
    (tmp_path / "test_list.txt").write_text("a\n")
    touch(tmp_path / "v", "a.avi")
    path = tmp_path / "raw-captions.pkl"
    whole = pickle.dumps({"a": [["a", "man", "cooks"]] * 20})
    path.write_bytes(whole[:len(whole) - 9])
    raises_unchanged(path, r"raw-captions.pkl cannot be unpickled \(.*cut off or damaged\?\): this file comes from "
                     "CLIP4Clip's msvd_data.zip", "msvd", "test", str(tmp_path), str(tmp_path / "v"))
    path.write_bytes(b"")
    raises_unchanged(path, r"raw-captions.pkl is empty \(0 bytes\)", "msvd", "test", str(tmp_path), str(tmp_path / "v"))
    pickle.dump({"a": "one caption, not a list"}, open(path, "wb"))
    raises_unchanged(path, r"has \['a'\] = str, expected a list of captions", "msvd", "test", str(tmp_path),
                     str(tmp_path / "v"))
    pickle.dump(collections.defaultdict(list, a=[["a", "man", "cooks"]]), open(path, "wb"))  # plain containers load
    assert data.read_split("msvd", "test", str(tmp_path), str(tmp_path / "v")).captions == ["a man cooks"]

    class Payload:  # a pickle that runs a command when loaded
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)
    pickle.dump({"a": [Payload()]}, open(path, "wb"))
    raises_unchanged(path, r"raw-captions.pkl asks to load (posix|nt).system when unpickled, which a caption file does "
                     r"not contain \(refused", "msvd", "test", str(tmp_path), str(tmp_path / "v"))
    assert not (tmp_path / "ran").exists()
    os.remove(path)  # UMP_TVR's format
    (tmp_path / "captions_msvd.json").write_bytes(b"")
    raises_unchanged(tmp_path / "captions_msvd.json", r"captions_msvd.json is empty \(0 bytes\): this file comes "
                     "from CLIP4Clip's msvd_data.zip .* or UMP_TVR's data/MSVD", "msvd", "test", str(tmp_path),
                     str(tmp_path / "v"))


def test_missing_annotation_files_say_where_they_come_from(msrvtt, tmp_path):
    ann, videos = msrvtt
    os.remove(ann / "MSRVTT_data.json")
    with pytest.raises(data.DataError, match=f"MSRVTT_data.json not found in --data_path {ann}: check "
                       f"--data_path; the file comes from {MSRVTT}"):
        data.read_split("msrvtt", "train", str(ann), videos)
    with pytest.raises(data.DataError, match="--data_path is not set: it is the folder holding MSRVTT_train.9k.csv"):
        data.read_split("msrvtt", "train", None, videos)
    (tmp_path / "test_list.txt").write_text("video2\n")
    with pytest.raises(data.DataError, match="neither raw-captions.pkl nor captions_msvd.json is in --data_path.*"
                       "CLIP4Clip's msvd_data.zip .raw-captions.pkl. or UMP_TVR's data/MSVD .captions_msvd.json."):
        data.read_split("msvd", "test", str(tmp_path), videos)


def test_listed_video_without_captions(msrvtt):
    ann, videos = msrvtt
    write_csv(ann / "MSRVTT_train.9k.csv", [["video_id"], ["video0"], ["video1"], ["video7"]])
    raises_unchanged(ann / "MSRVTT_data.json", "MSRVTT_data.json has no caption for 1 of the 3 train videos, e.g. "
                     "video7", "msrvtt", "train", str(ann), videos)


# ---- duplicates and empty captions -------------------------------------------------------------------

def test_test_video_listed_twice_is_an_error(msrvtt, tmp_path):
    ann, videos = msrvtt
    path = ann / "MSRVTT_JSFUSION_test.csv"
    rows = [["key", "vid_key", "video_id", "sentence"], ["ret0", "msr2", "video2", "a cat"],
            ["ret1", "msr3", "video3", "a dog"], ["ret0", "msr2", "video2", "a cat"]]
    write_csv(path, rows)  # the same row twice: R@k would count video2's caption twice
    raises_unchanged(path, "MSRVTT_JSFUSION_test.csv lists 1 test video more than once .video2 at line 2, line 4.: "
                     "a video listed twice counts its captions twice and shifts the metrics; delete the repeated "
                     f"lines: this file comes from {MSRVTT}", "msrvtt", "test", str(ann), videos)
    write_csv(path, rows[:3] + [["ret2", "msr3", "video3", "another dog"]])  # same video, another caption
    raises_unchanged(path, "video3 at line 3, line 4", "msrvtt", "test", str(ann), videos)
    (tmp_path / "test_list.txt").write_text("video2\nvideo3\n\nvideo2\n")  # MSVD's list: blank lines count
    json.dump({"video2": ["a cat"], "video3": ["a dog"]}, open(tmp_path / "captions_msvd.json", "w"))
    raises_unchanged(tmp_path / "test_list.txt", "test_list.txt lists 1 test video more than once .video2 at line "
                     "1, line 4.", "msvd", "test", str(tmp_path), videos)
    (tmp_path / "test_list.txt").write_text("video2\nvideo3\n")  # a JSON key twice: json would keep the last
    (tmp_path / "captions_msvd.json").write_text('{"video2": ["a cat"], "video3": ["a dog"], "video2": ["x"]}')
    raises_unchanged(tmp_path / "captions_msvd.json", "captions_msvd.json gives the key 'video2' twice",
                     "msvd", "test", str(tmp_path), videos)
    (tmp_path / "val_1.json").write_text(json.dumps({"v_video2": {"sentences": ["a"]}, "video2": {"sentences": ["b"]}}))
    raises_unchanged(tmp_path / "val_1.json", "val_1.json lists 1 test video more than once .video2 at key "
                     "'v_video2', key 'video2'.", "activitynet", "test", str(tmp_path), videos)


def test_duplicates_allowed_where_the_data_has_them(msrvtt, tmp_path):
    """A train list may repeat (it weights that video, as CLIP4Clip reads it); MSVD's test annotators wrote
    the same sentence for one video 3,730 times, and published numbers count every one."""
    ann, videos = msrvtt
    write_csv(ann / "MSRVTT_train.9k.csv", [["video_id"], ["video0"], ["video1"], ["video0"]])
    assert len(data.read_split("msrvtt", "train", str(ann), videos).captions) == 6
    (tmp_path / "test_list.txt").write_text("video2\n")
    json.dump({"video2": ["a cat", "a cat", "a kitten"]}, open(tmp_path / "captions_msvd.json", "w"))
    assert data.read_split("msvd", "test", str(tmp_path), videos).captions == ["a cat", "a cat", "a kitten"]


def test_empty_captions_counted_and_dropped(msrvtt, tmp_path, capsys):
    ann, videos = msrvtt
    json.dump({"sentences": [{"video_id": "video0", "caption": "a man"}, {"video_id": "video0", "caption": " "},
                             {"video_id": "video1", "caption": ""}, {"video_id": "video1", "caption": "a dog"}]},
              open(ann / "MSRVTT_data.json", "w"))
    split = data.read_split("msrvtt", "train", str(ann), videos)
    assert split.captions == ["a man", "a dog"] and split.caption_video == [0, 1]
    assert f"WARNING: {ann / 'MSRVTT_data.json'}: 2 empty train captions dropped; 2 left" in capsys.readouterr().err
    write_csv(ann / "MSRVTT_JSFUSION_test.csv", [["key", "vid_key", "video_id", "sentence"],
                                                 ["ret0", "msr2", "video2", "a cat"], ["ret1", "msr3", "video3", ""]])
    with pytest.raises(data.DataError, match="MSRVTT_JSFUSION_test.csv has no non-empty caption for 1 of the 2 test "
                       "videos, e.g. video3"):  # 1k-A has one caption per video: nothing would be left for it
        data.read_split("msrvtt", "test", str(ann), videos)
    assert "1 empty test caption dropped; 1 left" in capsys.readouterr().err


# ---- MSVD: CLIP4Clip's pickle and UMP_TVR's JSON -----------------------------------------------------

def test_msvd_pickle_and_json_give_the_same_split(tmp_path):
    words = {"-4wsuPCjDBc_5_15": [["a", "squirrel", "eats"], ["a", "chipmunk", "is", "eating"],
                                  ["a", "squirrel", "eats"]],
             "zv2RIbUsnSw_159_165": [["a", "cat", "plays"]], "vid_train": [["a", "man", "cooks"]]}
    folders = {"pkl": tmp_path / "clip4clip", "json": tmp_path / "ump"}
    for kind, folder in folders.items():
        folder.mkdir()
        (folder / "test_list.txt").write_text("-4wsuPCjDBc_5_15\nzv2RIbUsnSw_159_165\n")
        (folder / "train_list.txt").write_text("vid_train\n")
        if kind == "pkl":  # id -> word lists
            pickle.dump(words, open(folder / "raw-captions.pkl", "wb"))
        else:  # id -> the same captions as strings
            json.dump({v: [" ".join(c) for c in caps] for v, caps in words.items()},
                      open(folder / "captions_msvd.json", "w"))
    touch(tmp_path / "YouTubeClips", *(f"{v}.avi" for v in words))
    for split in ("test", "train"):
        a, b = (data.read_split("msvd", split, str(folders[k]), str(tmp_path / "YouTubeClips"))
                for k in ("pkl", "json"))
        assert a == b
    assert a.captions == ["a man cooks"] and len(b.videos) == 1
    test = data.read_split("msvd", "test", str(folders["json"]), str(tmp_path / "YouTubeClips"))
    assert test.captions == ["a squirrel eats", "a chipmunk is eating", "a squirrel eats", "a cat plays"]
    assert test.caption_video == [0, 0, 0, 1]
    # both files present: the pickle (CLIP4Clip's, the reference) is read
    (folders["pkl"] / "captions_msvd.json").write_text('{"-4wsuPCjDBc_5_15": ["other"], "zv2RIbUsnSw_159_165": ["x"]}')
    assert data.read_split("msvd", "test", str(folders["pkl"]), str(tmp_path / "YouTubeClips")) == test


# ---- the start-up check of the videos ----------------------------------------------------------------

@pytest.fixture
def videos(tmp_path):
    """good0-2 decode; empty is 0 bytes, junk is not a video, cut is an mp4 whose index (moov, at the end) was cut
    off, zeroed an mp4 whose frames were overwritten with zeros; short.avi is an MJPG file cut at 60%: its header
    says 24 frames, it holds fewer, and it still loads."""
    folder = tmp_path / "videos"
    folder.mkdir()
    frames = [np.full((32, 48, 3), 10 * k, np.uint8) for k in range(24)]
    for k in range(3):
        data.write_video(str(folder / f"good{k}.mp4"), frames)
    whole = (folder / "good0.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(whole[:len(whole) // 2])
    start, end = whole.find(b"mdat") + 4, whole.find(b"moov") - 4  # the frames lie between, the index after
    (folder / "zeroed.mp4").write_bytes(whole[:start] + bytes(end - start) + whole[end:])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "junk.mp4").write_bytes(b"\x00not a video" * 50)
    import cv2
    writer = cv2.VideoWriter(str(folder / "short.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 8, (48, 32))
    for f in frames:
        writer.write(f)
    writer.release()
    whole = (folder / "short.avi").read_bytes()
    (folder / "short.avi").write_bytes(whole[:len(whole) * 6 // 10])
    names = ["good0.mp4", "cut.mp4", "good1.mp4", "empty.mp4", "short.avi", "junk.mp4", "zeroed.mp4", "good2.mp4"]
    return data.Split("fixture-test", [str(folder / n) for n in names], names, list(range(len(names))))


def test_check_videos_names_every_unreadable_video_at_once(videos, tmp_path):
    bad = data.find_unreadable(videos.videos)
    assert [(os.path.basename(v), why) for v, why in bad] == [
        ("cut.mp4", "does not open as a video (cut off, damaged, or not a video)"),
        ("empty.mp4", "is empty (0 bytes)"),
        ("junk.mp4", "does not open as a video (cut off, damaged, or not a video)"),
        ("zeroed.mp4", "opens, but its first frame does not decode")]
    before = {v: open(v, "rb").read() for v in videos.videos}
    report = tmp_path / "out" / "bad_videos.txt"
    with pytest.raises(data.DataError) as e:
        data.check_videos(videos, report=str(report), show=2)
    msg = str(e.value)
    assert msg.startswith(f"4 of 8 fixture-test videos cannot be read: {bad[0][0]} does not open as a video")
    assert "empty.mp4 is empty (0 bytes)" in msg and "junk.mp4" not in msg  # first `show`, then where the rest are
    assert f"(all 4 listed in {report}). Re-download or re-encode them, or move them out of --video_path" in msg
    assert report.read_text().splitlines() == [f"{v}\t{why}" for v, why in bad]
    assert {v: open(v, "rb").read() for v in videos.videos} == before  # nothing touched
    with pytest.raises(data.DataError, match=r"\(and 2 more: `python data.py --check"):
        data.check_videos(videos, show=2)
    good = data.Split("ok", [v for v in videos.videos if "good" in v or "short" in v], ["x"] * 4, [0, 1, 2, 3])
    assert data.check_videos(good, report=str(tmp_path / "none.txt")) is None
    assert not (tmp_path / "none.txt").exists()
    assert len(data.read_frames(videos.videos[4], 12, train=False)) > 0  # short.avi passed, and it does load


def test_check_videos_reads_frame_cache_headers(videos, tmp_path):
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    good = videos.videos[0]
    assert data._cache_one((good, data.cache_file(cache, good), 32, 0, None)) is None
    assert data.probe_video(good, cache) is None
    whole = open(data.cache_file(cache, good), "rb").read()
    open(data.cache_file(cache, good), "wb").write(whole[:len(whole) // 2])  # a cache file cut off
    assert data.probe_video(good, cache).startswith(f"has a damaged frame cache {data.cache_file(cache, good)} "
                                                    "(ValueError:")
    np.save(data.cache_file(cache, good), np.zeros((0, 3, 32, 32), np.uint8))
    assert "holding uint8 [0, 3, 32, 32], not uint8 [frames, 3, size, size]" in data.probe_video(good, cache)
    assert data.probe_video(videos.videos[3], cache) == "is empty (0 bytes)"  # no cache file: the video is opened


def run_data_py(monkeypatch, *args):
    """`python data.py ARGS` in this process (runpy: no second torch import) -> its exit status."""
    monkeypatch.setattr(sys, "argv", ["data.py", *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "data.py"), run_name="__main__")
    return e.value.code


def test_check_command_writes_the_list(tmp_path, monkeypatch, capsys):
    ann, folder = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir(), folder.mkdir()
    write_csv(ann / "MSRVTT_JSFUSION_test.csv", [["key", "vid_key", "video_id", "sentence"]]
              + [[f"ret{i}", f"msr{i}", f"video{i}", f"caption {i}"] for i in range(3)])
    data.write_video(str(folder / "video0.mp4"), [np.zeros((16, 16, 3), np.uint8)] * 4)
    (folder / "video1.mp4").write_bytes(b"")
    (folder / "video2.mp4").write_bytes(b"garbage" * 30)
    out = tmp_path / "bad.txt"
    flags = ["--check", "--data", "msrvtt", "--split", "test", "--data_path", str(ann), "--video_path", str(folder)]
    assert run_data_py(monkeypatch, *flags, "--out", str(out), "--workers", "2") == 1  # 2 worker processes
    printed = capsys.readouterr().out
    assert "2 of 3 msrvtt test videos cannot be read" in printed and str(out) in printed
    assert [line.split("\t")[0] for line in out.read_text().splitlines()] == [str(folder / "video1.mp4"),
                                                                              str(folder / "video2.mp4")]
    os.remove(ann / "MSRVTT_JSFUSION_test.csv")
    assert run_data_py(monkeypatch, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MSRVTT_JSFUSION_test.csv not found") and err.count("\n") == 1
