"""--resume where it could not be exact (docs/faults.md): other data than the run's, a damaged or cut log.jsonl,
a training video that opens but does not decode, and a run with nothing left to do. Each refusal is one line
that leaves the checkpoint and the log as they were; where the run goes on, it equals the uninterrupted one."""
import json
import shutil

import cv2
import pytest

import data
import train
from fault_runs import error, flags, losses, rows, state
from messages import assert_tells

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


def kept(out):
    return {f: (out / f).read_bytes() for f in ("checkpoint.pt", "log.jsonl")}


def same_weights(a, b):
    return all(w.equal(state(b)["model"][n]) for n, w in state(a)["model"].items())


def zero_frames(path):
    """The video still opens (its header is whole, it counts its frames) but no frame decodes: the payload of
    its mdat box zeroed, as a bad sector or a cut download leaves it."""
    b = bytearray(path.read_bytes())
    i = b.find(b"mdat")
    size = int.from_bytes(b[i - 4:i], "big")
    b[i + 4:i - 4 + size] = bytes(size - 8)
    path.write_bytes(b)


def test_resume_is_exact_through_a_video_that_opens_but_does_not_decode(setup, tmp_path, capfd):
    """Its frames are drawn before its decoding fails; the first time it is met, a run tries it, later it skips
    it (known bad). A resumed run meets it anew: the substitute must draw the same frames either way."""
    syn = shutil.copytree(setup / "synthetic", tmp_path / "syn")
    zero_frames(syn / "videos" / "video3.mp4")
    cap = cv2.VideoCapture(str(syn / "videos" / "video3.mp4"))
    assert cap.isOpened() and cap.get(cv2.CAP_PROP_FRAME_COUNT) > 0
    with pytest.raises(data.VideoError):
        data.read_clip(str(syn / "videos" / "video3.mp4"), 2, train=True)
    two = ("--data_path", str(syn), "--epochs", "2", "--log_every", "1")
    train.main(flags(setup, tmp_path / "whole", *two, "--num_workers", "2"))  # workers share the known bad ones
    whole = capfd.readouterr()
    assert_tells(whole.err, "video3.mp4")  # said once, substituted
    assert_tells(whole.out, "training items replaced an unreadable video", "video3.mp4")
    cut = tmp_path / "cut"
    train.main(flags(setup, cut, *two, "--max_steps", "4"))  # mid-epoch 1
    train.main(flags(setup, cut, *two, "--resume", "--max_steps", "13"))  # over the epoch's end, into epoch 2
    train.main(flags(setup, cut, *two, "--resume"))
    assert losses(cut) == losses(tmp_path / "whole") and len(losses(cut)) == 18
    assert same_weights(cut, tmp_path / "whole")


def test_resume_refuses_other_data_and_names_what_changed(setup, tmp_path, capsys):
    syn, out = shutil.copytree(setup / "synthetic", tmp_path / "syn"), tmp_path / "run"
    argv = flags(setup, out, "--data_path", str(syn))
    train.main(argv + ["--max_steps", "2"])
    before, ann = kept(out), (syn / "MSRVTT_data.json").read_text()
    edited = json.loads(ann)
    edited["sentences"][0]["caption"] = "a red circle"  # one training caption edited
    (syn / "MSRVTT_data.json").write_text(json.dumps(edited))
    line = error(capsys, argv + ["--resume"])
    assert_tells(line, "--resume", "other data", "synthetic-train captions", "--data_path", "--output_dir")
    assert "videos" not in line and kept(out) == before
    (syn / "MSRVTT_data.json").write_text(ann)
    csv = (syn / "MSRVTT_train.9k.csv").read_text()
    (syn / "MSRVTT_train.9k.csv").write_text(csv.replace("video5\n", ""))  # one training video less
    line = error(capsys, argv + ["--resume"])
    assert_tells(line, "synthetic-train videos differ (23 now, 24 in the run)", "synthetic-train captions")
    assert kept(out) == before
    (syn / "MSRVTT_train.9k.csv").write_text(csv)  # the run's data again: it goes on, from step 2
    train.main(flags(setup, out, "--data_path", str(syn), "--resume"))
    assert state(out)["step"] == 9 and rows(out, "resume")[0]["step"] == 2


def test_resume_refuses_a_damaged_or_cut_log(setup, tmp_path, capsys):
    out, log = tmp_path / "run", tmp_path / "run" / "log.jsonl"
    train.main(flags(setup, out, "--max_steps", "6", "--log_every", "1"))
    before = kept(out)
    lines = before["log.jsonl"].splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:3]) + lines[3].replace(b'"train"', b'"tr\xe9in"') + b"".join(lines[4:]))
    line = error(capsys, flags(setup, out, "--resume", "--log_every", "1"))  # a Latin-1 byte in row 4
    assert_tells(line, log, "line 4", "non-UTF-8", f"mv {log} {log}.damaged", "step 6", "checkpoint is fine")
    assert (out / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]
    cut = before["log.jsonl"][:len(before["log.jsonl"]) * 2 // 3]  # cut mid-file: rows of steps <= 6 lost
    log.write_bytes(cut)
    line = error(capsys, flags(setup, out, "--resume", "--log_every", "1"))
    assert_tells(line, log, "rows are missing", "step 6", f"mv {log} {log}.damaged")
    assert log.read_bytes() == cut and (out / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]
    log.rename(f"{log}.damaged")  # the way on that the line gives: a new log, and it says so
    train.main(flags(setup, out, "--resume", "--log_every", "1"))
    assert_tells(capsys.readouterr().err, "WARNING", "no", log, "step 6")
    assert [r["step"] for r in rows(out, "resume", "train")] == [6, 7, 8, 9]
    log.write_bytes(before["log.jsonl"])  # the log restored: the run from step 6 equals an uninterrupted one
    (out / "checkpoint.pt").write_bytes(before["checkpoint.pt"])
    train.main(flags(setup, out, "--resume", "--log_every", "1"))
    train.main(flags(setup, tmp_path / "whole", "--log_every", "1"))
    assert losses(out) == losses(tmp_path / "whole") and same_weights(out, tmp_path / "whole")


def test_resume_with_nothing_left_to_do_says_so(setup, tmp_path, capsys):
    train.main(flags(setup, tmp_path))
    before, evaluated = kept(tmp_path), rows(tmp_path, "eval")[-1]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(flags(setup, tmp_path, "--resume"))
    assert e.value.code == 0
    said = capsys.readouterr().out
    assert_tells(said, "nothing to do", "finished", "step 9", "1 of 1 epochs done", tmp_path / "log.jsonl",
                 f"t2v R@1 {evaluated['t2v']['R@1']:.1f}", tmp_path / "retrievals.png", "--epochs")
    assert kept(tmp_path) == before  # no resume row, nothing rewritten
    train.main(flags(setup, tmp_path / "short", "--max_steps", "3"))
    with pytest.raises(SystemExit) as e:
        train.main(flags(setup, tmp_path / "short", "--resume", "--max_steps", "3"))
    assert e.value.code == 0 and state(tmp_path / "short")["step"] == 3
    assert_tells(capsys.readouterr().out, "nothing to do", "--max_steps 3", "step 3", "no evaluation")
