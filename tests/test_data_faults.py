"""data.py's readers on damaged annotation files: every fault is a DataError naming the file, the line, key or
column and the download; annotation files are never changed. (Damaged videos: test_frame_cache.py.)"""
import collections
import csv
import json
import os
import pickle
import re

import pytest

import data
from messages import assert_tells

MSRVTT, MSVD = data.ORIGINS["msrvtt"], data.ORIGINS["msvd"]  # the downloads the messages name


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


def raises_unchanged(path, read, *learn):
    """read_split(*read) raises a DataError whose message names the file at `path` and says each of `learn` (what
    is wrong and where, the fix, the download); the file is left as it was. -> the message"""
    before = open(path, "rb").read()
    with pytest.raises(data.DataError) as e:
        data.read_split(*read)
    msg = assert_tells(str(e.value), path, *learn)
    assert open(path, "rb").read() == before
    return msg


# ---- annotation files --------------------------------------------------------------------------------

def test_csv_without_its_column(msrvtt):
    ann, videos = msrvtt
    path = ann / "MSRVTT_JSFUSION_test.csv"
    write_csv(path, [["key", "vid_key", "video_id"], ["ret0", "msr2", "video2"]])
    raises_unchanged(path, ("msrvtt", "test", str(ann), videos), "'sentence'", "key, vid_key, video_id", MSRVTT)


@pytest.mark.parametrize("row, found", [(["ret1", "msr3", "video3"], ("3 fields", "cut off")),
                                        (["ret1", "msr3", "video3", "a dog", "barks"], ("5 fields", "unquoted"))])
def test_csv_row_with_the_wrong_number_of_fields(msrvtt, row, found):
    ann, videos = msrvtt
    path = ann / "MSRVTT_JSFUSION_test.csv"
    write_csv(path, [["key", "vid_key", "video_id", "sentence"], ["ret0", "msr2", "video2", "a cat"], row])
    raises_unchanged(path, ("msrvtt", "test", str(ann), videos), "line 3", *found)


def test_csv_cut_off_inside_a_quoted_caption(msrvtt):
    ann, videos = msrvtt
    path = ann / "MSRVTT_JSFUSION_test.csv"
    path.write_text('key,vid_key,video_id,sentence\nret0,msr2,video2,"a cat, sle')
    raises_unchanged(path, ("msrvtt", "test", str(ann), videos), "CSV", "line 2", "cut off")


def test_empty_csv_and_empty_list(msrvtt, tmp_path):
    ann, videos = msrvtt
    (ann / "MSRVTT_train.9k.csv").write_bytes(b"")
    raises_unchanged(ann / "MSRVTT_train.9k.csv", ("msrvtt", "train", str(ann), videos), "empty", MSRVTT)
    (tmp_path / "test_list.txt").write_text("\n\n")
    raises_unchanged(tmp_path / "test_list.txt", ("msvd", "test", str(tmp_path), videos), "empty", MSVD)


def test_json_cut_off_empty_or_malformed(msrvtt):
    ann, videos = msrvtt
    path, read = ann / "MSRVTT_data.json", ("msrvtt", "train", str(ann), videos)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    raises_unchanged(path, read, "JSON", "line 1, column", "cut off", MSRVTT)
    path.write_bytes(b"")  # UMP_TVR's repository holds a 0-byte MSRVTT_data.json
    raises_unchanged(path, read, "0 bytes", "UMP_TVR", "placeholder")
    path.write_text('{"sentences": [\n{"video_id": "video0", "caption": "x"}\n{"video_id": "video1"}]}')
    msg = raises_unchanged(path, read, "JSON", "Expecting ',' delimiter", "line 3, column 1")
    assert "cut off" not in msg


def test_json_item_without_its_key(msrvtt, tmp_path):
    ann, videos = msrvtt
    path, read = ann / "MSRVTT_data.json", ("msrvtt", "train", str(ann), videos)
    json.dump({"sentences": [{"video_id": "video0", "caption": "x"}, {"video_id": "video1", "text": "y"}]},
              open(path, "w"))
    raises_unchanged(path, read, "'caption'", "sentences[1]", "video_id, text", MSRVTT)  # the key, where, the keys
    json.dump({"videos": []}, open(path, "w"))
    raises_unchanged(path, read, "'sentences'", "top-level")
    (tmp_path / "test_list.txt").write_text("video2\n")  # DiDeMo: an item without its description
    json.dump([{"video": "video2", "times": [[0, 0]]}], open(tmp_path / "test_data.json", "w"))
    raises_unchanged(tmp_path / "test_data.json", ("didemo", "test", str(tmp_path), videos),
                     "'description'", "item 0", "video, times", data.ORIGINS["didemo"])
    json.dump({"v_video2": {"duration": 3.0}}, open(tmp_path / "val_1.json", "w"))  # ActivityNet
    raises_unchanged(tmp_path / "val_1.json", ("activitynet", "test", str(tmp_path), videos),
                     "'sentences'", "['v_video2']", data.ORIGINS["activitynet"])


def test_pickle_cut_off_or_empty(tmp_path):
    (tmp_path / "test_list.txt").write_text("a\n")
    touch(tmp_path / "v", "a.avi")
    path, read = tmp_path / "raw-captions.pkl", ("msvd", "test", str(tmp_path), str(tmp_path / "v"))
    whole = pickle.dumps({"a": [["a", "man", "cooks"]] * 20})
    path.write_bytes(whole[:len(whole) - 9])
    raises_unchanged(path, read, "unpickled", "cut off", MSVD)
    path.write_bytes(b"")
    raises_unchanged(path, read, "0 bytes")
    pickle.dump({"a": "one caption, not a list"}, open(path, "wb"))
    raises_unchanged(path, read, "['a']", "str", "list of captions")  # where, what it is, what it should be
    pickle.dump(collections.defaultdict(list, a=[["a", "man", "cooks"]]), open(path, "wb"))  # plain containers load
    assert data.read_split(*read).captions == ["a man cooks"]

    class Payload:  # a pickle that runs a command when loaded
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)
    pickle.dump({"a": [Payload()]}, open(path, "wb"))
    msg = raises_unchanged(path, read, "refused")
    assert re.search(r"\b(posix|nt)\.system\b", msg) and not (tmp_path / "ran").exists()  # what it asked to run
    os.remove(path)  # UMP_TVR's format
    (tmp_path / "captions_msvd.json").write_bytes(b"")
    raises_unchanged(tmp_path / "captions_msvd.json", read, "0 bytes", MSVD)


def test_missing_annotation_files_say_where_they_come_from(msrvtt, tmp_path):
    ann, videos = msrvtt
    os.remove(ann / "MSRVTT_data.json")
    for read, learn in [(("msrvtt", "train", str(ann), videos), ("MSRVTT_data.json", f"--data_path {ann}", MSRVTT)),
                        (("msrvtt", "train", None, videos), ("--data_path", "not set", "MSRVTT_train.9k.csv")),
                        (("msvd", "test", str(tmp_path), videos), ("raw-captions.pkl", "captions_msvd.json", MSVD))]:
        (tmp_path / "test_list.txt").write_text("video2\n")
        with pytest.raises(data.DataError) as e:
            data.read_split(*read)
        assert_tells(str(e.value), *learn)


def test_listed_video_without_captions_and_a_twin_that_is_no_test_video(msrvtt):
    ann, videos = msrvtt
    write_csv(ann / "MSRVTT_train.9k.csv", [["video_id"], ["video0"], ["video1"], ["video7"]])
    raises_unchanged(ann / "MSRVTT_data.json", ("msrvtt", "train", str(ann), videos),
                     "caption", "1 of the 3", "video7")
    write_csv(ann / "MSRVTT_JSFUSION_test.csv", [["key", "vid_key", "video_id", "sentence", "twin"],
                                                 ["ret0", "msr2", "video2", "a cat", "video3"],
                                                 ["ret1", "msr3", "video3", "a dog", "video9"]])
    raises_unchanged(ann / "MSRVTT_JSFUSION_test.csv", ("msrvtt", "test", str(ann), videos),
                     "twin", "video9", MSRVTT)


# ---- duplicates ---------------------------------------------------------------------------------------

def test_test_video_listed_twice_is_an_error(msrvtt, tmp_path):
    ann, videos = msrvtt
    path, read = ann / "MSRVTT_JSFUSION_test.csv", ("msrvtt", "test", str(ann), videos)
    rows = [["key", "vid_key", "video_id", "sentence"], ["ret0", "msr2", "video2", "a cat"],
            ["ret1", "msr3", "video3", "a dog"], ["ret0", "msr2", "video2", "a cat"]]
    write_csv(path, rows)  # the same row twice: R@k would count video2's caption twice
    raises_unchanged(path, read, "more than once", "video2", "line 2, line 4", "delete", MSRVTT)  # the fix: delete
    write_csv(path, rows[:3] + [["ret2", "msr3", "video3", "another dog"]])  # same video, another caption
    raises_unchanged(path, read, "video3", "line 3, line 4")
    read = ("msvd", "test", str(tmp_path), videos)
    (tmp_path / "test_list.txt").write_text("video2\nvideo3\n\nvideo2\n")  # MSVD's list: blank lines count
    json.dump({"video2": ["a cat"], "video3": ["a dog"]}, open(tmp_path / "captions_msvd.json", "w"))
    raises_unchanged(tmp_path / "test_list.txt", read, "more than once", "video2", "line 1, line 4")
    (tmp_path / "test_list.txt").write_text("video2\nvideo3\n")  # a JSON key twice: json would keep the last
    (tmp_path / "captions_msvd.json").write_text('{"video2": ["a cat"], "video3": ["a dog"], "video2": ["x"]}')
    raises_unchanged(tmp_path / "captions_msvd.json", read, "'video2'", "twice")
    (tmp_path / "val_1.json").write_text(json.dumps({"v_video2": {"sentences": ["a"]}, "video2": {"sentences": ["b"]}}))
    raises_unchanged(tmp_path / "val_1.json", ("activitynet", "test", str(tmp_path), videos), "more than once",
                     "'v_video2'", "'video2'")
