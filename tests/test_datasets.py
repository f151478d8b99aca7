"""data.py readers for MSVD, VATEX, DiDeMo, ActivityNet, LSMDC on tiny fixtures in each set's real file format.
Video files are empty stand-ins: readers only check that they exist."""
import json
import os
import pickle

import pytest

import data


def touch(root, *names):
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()


def names(split):
    return [os.path.basename(v) for v in split.videos]


def test_msvd_token_list_captions_multi_caption_test(tmp_path):
    (tmp_path / "train_list.txt").write_text("vid_a\n")
    (tmp_path / "test_list.txt").write_text("-4wsuPCjDBc_5_15\nzv2RIbUsnSw_159_165\n\n")
    captions = {"vid_a": [["a", "man", "cooks"]],
                "-4wsuPCjDBc_5_15": [["a", "woman", "is", "slicing", "an", "onion"], ["someone", "cuts", "onion"]],
                "zv2RIbUsnSw_159_165": [["a", "cat", "plays"]]}
    pickle.dump(captions, open(tmp_path / "raw-captions.pkl", "wb"))
    touch(tmp_path / "YouTubeClips", "vid_a.avi", "-4wsuPCjDBc_5_15.avi", "zv2RIbUsnSw_159_165.avi")
    test = data.read_split("msvd", "test", str(tmp_path), str(tmp_path / "YouTubeClips"))
    assert names(test) == ["-4wsuPCjDBc_5_15.avi", "zv2RIbUsnSw_159_165.avi"]
    assert test.captions == ["a woman is slicing an onion", "someone cuts onion", "a cat plays"]
    assert test.caption_video == [0, 0, 1]  # two captions point at one video
    assert data.read_split("msvd", "train", str(tmp_path), str(tmp_path / "YouTubeClips")).captions == ["a man cooks"]



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

def test_vatex_ref_captions(tmp_path):
    (tmp_path / "train_list.txt").write_text("Ptf_2VRj-V0_000122_000132\n")
    (tmp_path / "test_list.txt").write_text("--07WQ2iBlw_000001_000011\n")
    json.dump({"Ptf_2VRj-V0_000122_000132": ["A man throws a ball.", "A boy plays catch."],
               "--07WQ2iBlw_000001_000011": ["Two people dance.", "A couple dances.", "People dance outside."]},
              open(tmp_path / "ref_captions.json", "w"))
    touch(tmp_path / "videos", "Ptf_2VRj-V0_000122_000132.mp4", "--07WQ2iBlw_000001_000011.mp4")
    test = data.read_split("vatex", "test", str(tmp_path), str(tmp_path / "videos"))
    assert test.captions == ["Two people dance.", "A couple dances.", "People dance outside."]
    assert test.caption_video == [0, 0, 0] and names(test) == ["--07WQ2iBlw_000001_000011.mp4"]
    assert len(data.read_split("vatex", "train", str(tmp_path), str(tmp_path / "videos")).captions) == 2


def test_didemo_paragraph_with_times_and_extensions(tmp_path):
    ids = ["10015567@N08_3655084291_d8b58466fa.mov", "99996214@N00_5277035407_bb8738f945.3gp"]
    (tmp_path / "test_list.txt").write_text("\n".join(ids) + "\n")
    json.dump([{"video": ids[0], "description": "a dog jumps. ", "times": [[0, 0], [0, 1], [0, 0], [0, 0]],
                "annotation_id": 1},
               {"video": "not_listed.mp4", "description": "ignored", "times": [[1, 1]]},
               {"video": ids[0], "description": "the dog lands", "times": [[2, 3], [2, 2], [2, 3], [3, 3]]},
               {"video": ids[1], "description": "camera pans left", "times": [[4, 5]]}],
              open(tmp_path / "test_data.json", "w"))
    # one copy as named, the other re-encoded with '.mp4' appended (both occur in circulating copies)
    touch(tmp_path / "videos", ids[0], ids[1] + ".mp4")
    test = data.read_split("didemo", "test", str(tmp_path), str(tmp_path / "videos"))
    assert test.captions == ["a dog jumps. the dog lands", "camera pans left"]  # paragraph <-> whole video
    assert test.caption_video == [0, 1] and names(test) == [ids[0], ids[1] + ".mp4"]
    assert test.max_seconds == 31  # annotations cover the first 30 s: frames come from 0-31 s (CLIP4Clip)


def test_activitynet_v_prefix_and_paragraphs(tmp_path):
    json.dump({"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                                 "sentences": ["A young woman is seen standing in a room.",
                                               " She then begins to dance."]},
               "v_-0aVbY-7hEw": {"duration": 40.0, "timestamps": [[0, 40.0]], "sentences": ["A man shaves. "]}},
              open(tmp_path / "val_1.json", "w"))
    touch(tmp_path / "videos", "sub/QOlSCBRmfWY.mkv", "-0aVbY-7hEw.mp4", "-0aVbY-7hEw.description")
    test = data.read_split("activitynet", "test", str(tmp_path), str(tmp_path / "videos"))
    assert names(test) == ["QOlSCBRmfWY.mkv", "-0aVbY-7hEw.mp4"]  # file name = id without 'v_', any extension
    assert test.captions == ["A young woman is seen standing in a room. She then begins to dance.", "A man shaves."]
    with pytest.raises(data.DataError, match="train.json not found"):
        data.read_split("activitynet", "train", str(tmp_path), str(tmp_path / "videos"))


def test_lsmdc_tab_separated_rows(tmp_path):
    rows = ["1001_Flight_00.00.56.114-00.00.58.132\t00.00.56.114\t00.00.58.132\t00.00.56.114\t00.00.58.132\t"
            "SOMEONE, \"a pilot\", wakes up.",
            "1001_Flight_00.01.00.000-00.01.02.000\t00.01.00.000\t00.01.02.000\t00.01.00.000\t00.01.02.000\t"
            "He looks out.",
            "1001_Flight_00.00.56.114-00.00.58.132\t00.00.56.114\t00.00.58.132\t00.00.56.114\t00.00.58.132\t"
            "SOMEONE rubs his eyes."]
    (tmp_path / "LSMDC16_annos_training.csv").write_text("\n".join(rows) + "\n")
    touch(tmp_path / "avi", "1001_Flight/1001_Flight_00.00.56.114-00.00.58.132.avi",
          "1001_Flight/1001_Flight_00.01.00.000-00.01.02.000.avi")
    train = data.read_split("lsmdc", "train", str(tmp_path), str(tmp_path / "avi"))
    assert train.captions == ['SOMEONE, "a pilot", wakes up.', "He looks out.", "SOMEONE rubs his eyes."]
    assert train.caption_video == [0, 1, 0]  # a clip id repeats: one video, two captions
    assert names(train)[0] == "1001_Flight_00.00.56.114-00.00.58.132.avi"
    (tmp_path / "LSMDC16_challenge_1000_publictect.csv").write_text(rows[1] + "\nbroken row without tabs\n")
    with pytest.raises(data.DataError, match="publictect.csv line 2 has 1 tab-separated fields, expected 6"):
        data.read_split("lsmdc", "test", str(tmp_path), str(tmp_path / "avi"))


def test_webvid_csv_page_dirs_and_missing_downloads(tmp_path, capsys):
    (tmp_path / "results_2M_val.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "31353427,https://x/1.mp4,PT00H00M19S,016401_016450,\"Aerial, shot of a city\"\n"
        "8131,https://x/2.mp4,PT00H00M09S,000001_000050,Never downloaded\n")
    touch(tmp_path / "videos", "016401_016450/31353427.mp4", "000001_000050/31353427.mp4")
    with pytest.raises(data.DataError, match=r"1 of 2 webvid test videos are missing .*000001_000050/8131\.mp4"):
        data.read_split("webvid", "test", str(tmp_path), str(tmp_path / "videos"))
    split = data.read_split("webvid", "test", str(tmp_path), str(tmp_path / "videos"), allow_missing=True)
    assert split.captions == ["Aerial, shot of a city"] and split.videos[0].endswith("016401_016450/31353427.mp4")
    assert "using the 1 present videos only" in capsys.readouterr().err


def test_missing_files_reported_for_every_reader(tmp_path):
    (tmp_path / "test_list.txt").write_text("a\nb\n")
    pickle.dump({"a": [["x"]], "b": [["y"]]}, open(tmp_path / "raw-captions.pkl", "wb"))
    touch(tmp_path / "v", "a.avi")
    with pytest.raises(data.DataError, match=r"1 of 2 msvd test videos are missing .* e\.g\. b\."):
        data.read_split("msvd", "test", str(tmp_path), str(tmp_path / "v"))
    with pytest.raises(data.DataError, match="not a directory"):
        data.read_split("msvd", "test", str(tmp_path), str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match="ref_captions.json not found in --data_path"):
        data.read_split("vatex", "test", str(tmp_path), str(tmp_path / "v"))
