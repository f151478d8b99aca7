"""Every annotation file data.py reads, saved as editors and spreadsheets save it: with a UTF-8 byte-order mark,
as UTF-16, with Windows line ends (each read as the plain file), with a Latin-1/cp1252 byte, empty, or cut off
(each one DataError naming the file and, for a bad byte, its line, its byte offset and the fix)."""
import codecs
import json
import os

import pytest

import data
from messages import assert_tells

ROW = "\t00.00.01.000\t00.00.02.000\t00.00.01.000\t00.00.02.000\t"  # LSMDC's 4 timestamps
# data set, split -> its files (name -> text) for two videos v1, v2; every caption file has a café
FORMATS = {
    ("msrvtt", "test"): {"MSRVTT_JSFUSION_test.csv": "key,vid_key,video_id,sentence\nr0,m1,v1,a dog\nr1,m2,v2,a café\n"},
    ("msrvtt", "train"): {"MSRVTT_train.9k.csv": "video_id\nv1\nv2\n", "MSRVTT_data.json": json.dumps(
        {"sentences": [{"video_id": "v1", "caption": "a dog"}, {"video_id": "v2", "caption": "a café"}]}, indent=1,
        ensure_ascii=False)},
    ("msvd", "test"): {"test_list.txt": "v1\nv2\n", "captions_msvd.json": '{"v1": ["a dog"],\n "v2": ["a café"]}'},
    ("vatex", "test"): {"test_list.txt": "v1\nv2\n", "ref_captions.json": '{"v1": ["a dog"],\n "v2": ["a café"]}'},
    ("didemo", "test"): {"test_list.txt": "v1\nv2\n", "test_data.json": '[{"video": "v1", "description": "a dog"},\n'
                         '{"video": "v2", "description": "a café"}]'},
    ("activitynet", "test"): {"val_1.json": '{"v_v1": {"sentences": ["a dog"]},\n"v_v2": {"sentences": ["a café"]}}'},
    ("lsmdc", "test"): {"LSMDC16_challenge_1000_publictect.csv": f"v1{ROW}a dog\nv2{ROW}a café\n"},
    ("webvid", "test"): {"results_2M_val.csv": "videoid,contentUrl,duration,page_dir,name\n1,u,d,p,a dog\n2,u,d,p,a café\n"},
}
IDS = [" ".join(k) for k in FORMATS]


def read(tmp_path, data_set, split, files):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    for v in ("v1.mp4", "v2.mp4", "p/1.mp4", "p/2.mp4"):
        os.makedirs(os.path.dirname(tmp_path / "videos" / v), exist_ok=True)
        (tmp_path / "videos" / v).touch()
    return data.read_split(data_set, split, str(tmp_path), str(tmp_path / "videos"))


SAVED_AS = dict(bom=lambda t: codecs.BOM_UTF8 + t.encode(), utf16=lambda t: t.encode("utf-16"),
                crlf=lambda t: t.replace("\n", "\r\n").encode())


@pytest.mark.parametrize("saved_as", SAVED_AS)
@pytest.mark.parametrize("key", FORMATS, ids=IDS)
def test_byte_order_marks_and_crlf_read_as_the_plain_file(tmp_path, key, saved_as):
    plain = read(tmp_path / "plain", *key, {n: t.encode() for n, t in FORMATS[key].items()})
    assert plain.captions == ["a dog", "a café"]
    for name in FORMATS[key]:  # one file saved otherwise at a time
        files = {n: SAVED_AS[saved_as](t) if n == name else t.encode() for n, t in FORMATS[key].items()}
        split = read(tmp_path / saved_as / name, *key, files)
        assert (split.captions, split.caption_video) == (plain.captions, plain.caption_video), name


@pytest.mark.parametrize("key", FORMATS, ids=IDS)
def test_a_latin1_byte_is_named_by_line_and_offset(tmp_path, key):
    name, text = next((n, t) for n, t in FORMATS[key].items() if "é" in t)
    at = text.index("é")
    path = tmp_path / name
    with pytest.raises(data.DataError) as e:
        read(tmp_path, *key, {n: t.encode("cp1252" if n == name else "utf-8") for n, t in FORMATS[key].items()})
    assert_tells(str(e.value), path, "not UTF-8", f"line {text[:at].count(chr(10)) + 1}",
                 f"byte offset {len(text[:at].encode())}", "'é'", "UTF-8", "iconv")


@pytest.mark.parametrize("key", FORMATS, ids=IDS)
def test_empty_and_cut_off_files(tmp_path, key):
    for name, text in FORMATS[key].items():
        for kind, raw in (("empty", b""), ("bom only", codecs.BOM_UTF8), ("cut", text.encode()[:len(text) // 2])):
            if kind == "cut" and not name.endswith(".json"):
                continue  # a cut-off list or CSV is a shorter file (data.py checks every listed video)
            files = {n: raw if n == name else t.encode() for n, t in FORMATS[key].items()}
            with pytest.raises(data.DataError) as e:
                read(tmp_path / kind / name, *key, files)
            assert_tells(str(e.value), tmp_path / kind / name / name)
