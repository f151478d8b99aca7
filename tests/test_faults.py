"""Faults injected into train.py runs, each with the message the user sees and what is kept (docs/faults.md):
signals mid-epoch, a huge lr, two runs on one folder, changed flags on --resume, bad flags and files, a failing
evaluation, and the --help / alias / warning side of the flags."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import checks
import clip
import data
import methods
import retrieval
import run_folder
import synthetic
import train
from conftest import make_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


def flags(setup, out, *extra, method="ump"):
    """ump (dropout) on the tiny set: 9 steps of 8 pairs per epoch, 2 frames."""
    return ["--method", method, "--data_path", str(setup / "synthetic"), "--clip", str(setup / "clip.pt"),
            "--output_dir", str(out), "--num_workers", "0", "--max_frames", "2", "--batch_size", "8",
            "--epochs", "1", "--save_every", "0", *extra]


def error(capsys, argv, status=2):
    """Run train.main(argv), expect it to exit with `status`: -> its one `error:` line."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == status
    err = capsys.readouterr().err
    lines = re.findall(r"error: [^\n]*", err)  # (a progress bar may leave its line unfinished)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def rows(out, *events):
    return [r for r in map(json.loads, open(out / "log.jsonl")) if r["event"] in events]


def losses(out):
    return [(r["step"], r["loss"]) for r in rows(out, "train")]


def state(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def test_sigterm_mid_epoch_saves_and_the_printed_command_resumes_exactly(setup, tmp_path, capsys):
    """SIGTERM (a scheduler's pre-emption) in a subprocess with worker processes: the step finishes, the
    checkpoint is written, exit 143 with the command that resumes; a second run meanwhile is kept out."""
    out = tmp_path / "cut"
    argv = flags(setup, out, "--num_workers", "2", "--log_every", "1", "--batch_size", "4")  # 18 steps
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (out / "log.jsonl").exists() or not rows(out, "train"):  # its first step is done
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        line = error(capsys, flags(setup, out))  # meanwhile, a second run into the same folder
        assert re.search("is in use by another run|holds a run|was written by another run while", line), line
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert "SIGTERM: finishing this step, then writing a checkpoint" in stderr
    ck = state(out)
    assert ck["epoch"] == 0 and 0 < ck["batch"] < 18 and ck["step"] == ck["batch"]  # mid-epoch
    lines = stdout.splitlines()
    command = lines[[i for i, x in enumerate(lines) if "continue with" in x][0] + 1].strip()
    assert command.startswith("python train.py") and command.endswith("--resume")
    train.main(shlex.split(command)[2:])  # the command as printed
    train.main(flags(setup, tmp_path / "whole", "--log_every", "1", "--batch_size", "4"))
    assert losses(out) == losses(tmp_path / "whole")  # no row twice, none lost, all equal
    for name, w in state(tmp_path / "whole")["model"].items():
        assert torch.equal(w, state(out)["model"][name]), name
    assert not (out / "lock").exists()


def test_sigint_finishes_the_step_and_a_second_quits(setup, tmp_path, capsys, monkeypatch):
    record, handler = run_folder.Folder.record, signal.getsignal(signal.SIGINT)

    def interrupting(times, at):  # Ctrl-C `times` times as step `at` is logged, before the run checks for a stop
        def f(self, **row):
            for _ in range(times if row.get("event") == "train" and row["step"] == at else 0):
                os.kill(os.getpid(), signal.SIGINT)
            return record(self, **row)
        return f

    monkeypatch.setattr(run_folder.Folder, "record", interrupting(1, at=3))
    with pytest.raises(SystemExit) as e:
        train.main(flags(setup, tmp_path, "--log_every", "1"))
    out, err = capsys.readouterr()
    assert e.value.code == 130 and "KeyboardInterrupt" not in err and "SIGINT: finishing this step" in err
    assert (state(tmp_path)["step"], state(tmp_path)["batch"]) == (3, 3)
    assert "stopped by SIGINT at step 3" in out and "--resume" in out
    monkeypatch.setattr(run_folder.Folder, "record", interrupting(2, at=6))
    with pytest.raises(SystemExit) as e:
        train.main(flags(setup, tmp_path, "--resume", "--log_every", "1"))
    assert e.value.code == 130 and "SIGINT: stopped" in capsys.readouterr().err
    assert state(tmp_path)["step"] == 3 and not (tmp_path / "lock").exists()  # the last checkpoint stays
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_resume_command():
    argv = ["--method", "ump", "--max_steps", "4", "--overwrite", "--max_steps=5", "--output_dir", "out dir"]
    assert run_folder.resume_command(argv, 1) == "python train.py --method ump --output_dir 'out dir' --resume"
    assert run_folder.resume_command(["--resume"], 4) == "torchrun --standalone --nproc_per_node=4 train.py --resume"
    assert run_folder.resume_command([], 8, 4).startswith("torchrun --nnodes=2 --nproc_per_node=4 <your rendezvous flags> ")


def test_huge_lr_stops_at_the_first_non_finite_step(setup, tmp_path, capsys):
    line = error(capsys, flags(setup, tmp_path, "--lr", "1e6", "--save_every", "1"), status=1)
    step = int(re.search(r"non-finite (?:loss|gradient) at step (\d+) \(lr [0-9.e+]+\): try a lower --lr", line)[1])
    ck = state(tmp_path)  # the checkpoint of the step before, finite
    assert ck["step"] == step - 1 and all(torch.isfinite(t).all() for t in ck["model"].values())
    assert not rows(tmp_path, "eval")


def test_non_finite_weights_are_never_saved(setup, tmp_path):
    method = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(method.parameters())
    args = train.parse_args(flags(setup, tmp_path))[0]
    saver = checkpoints.Checkpoints(str(tmp_path / "checkpoint.pt"), method, opt, torch.amp.GradScaler("cpu", enabled=False), args)
    saver.save(dict(step=1))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    method.weight.data[0, 0] = float("nan")
    with pytest.raises(checks.RunError, match=r"not writing .*: 1 trainable tensors are not finite \(\['weight'\]\)"):
        saver.save(dict(step=2))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_one_run_per_folder(setup, tmp_path, capsys):
    train.main(flags(setup, tmp_path, "--max_steps", "2"))
    kept = {f: (tmp_path / f).read_bytes() for f in ("checkpoint.pt", "log.jsonl")}
    line = error(capsys, flags(setup, tmp_path))  # a new run (an ablation, say) into the same default folder
    assert "holds a run" in line and "pass --resume to continue it or --overwrite to replace it" in line
    assert {f: (tmp_path / f).read_bytes() for f in kept} == kept
    # a lock left by a live process keeps a run out; one of a dead process is taken over
    (tmp_path / "lock").write_text(f"{os.uname().nodename} {os.getpid()}")
    assert "is in use by another run" in error(capsys, flags(setup, tmp_path, "--resume"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "lock").write_text(f"{os.uname().nodename} {dead.pid}")
    (tmp_path / "checkpoint.pt.tmp12345").write_bytes(b"half a checkpoint")  # a killed checkpoint write
    train.main(flags(setup, tmp_path, "--overwrite"))
    err = capsys.readouterr().err
    assert f"its run (pid {dead.pid}) died; taking the folder over" in err and "removed checkpoint.pt.tmp12345" in err
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "log.jsonl", "retrievals.png"]  # no lock, no tmp
    assert [r["event"] for r in rows(tmp_path, "start", "resume")] == ["start"]  # the old log was replaced
    # --eval_only writes its own record, never into the training log
    log = (tmp_path / "log.jsonl").read_bytes()
    metrics = train.main(flags(setup, tmp_path, "--eval_only", "--checkpoint", str(tmp_path / "checkpoint.pt")))
    assert (tmp_path / "log.jsonl").read_bytes() == log
    record, = [f for f in os.listdir(tmp_path) if f.startswith("eval-")]
    assert json.load(open(tmp_path / record))["t2v"] == rows(tmp_path, "eval")[-1]["t2v"] == pytest.approx(metrics["t2v"])


def test_a_checkpoint_written_between_the_checks_and_the_lock_is_not_overwritten(setup, tmp_path):
    folder = run_folder.Folder(train.parse_args(flags(setup, tmp_path))[0], {})  # checks pass: no run there yet
    torch.save({}, tmp_path / "checkpoint.pt")  # meanwhile another run writes its first checkpoint
    with pytest.raises(checks.RunError, match="was written by another run while this one started"):
        folder.claim(overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # its lock released, the other run's file kept


def test_resume_refuses_changed_flags_and_drops_the_rows_it_redoes(setup, tmp_path, capsys):
    train.main(flags(setup, tmp_path, "--max_steps", "4", "--log_every", "2"))
    line = error(capsys, flags(setup, tmp_path, "--resume", "--lr", "1", "--max_frames", "3"))
    assert "--resume with flags that differ from the checkpoint's run: --max_frames 3 (checkpoint: 2), " \
           "--lr 1.0 (checkpoint: 0.001)" in line and "may change" in line
    assert "--batch_size" in error(capsys, flags(setup, tmp_path, "--resume", "--batch_size", "4"))
    with open(tmp_path / "log.jsonl", "a") as f:  # what a run killed after its checkpoint logged, cut mid-line
        f.write(json.dumps(dict(event="train", step=6, loss=1.0)) + "\n" + '{"event": "tra')
    train.main(flags(setup, tmp_path, "--resume", "--epochs", "2", "--log_every", "3"))  # these may change
    resumed, = rows(tmp_path, "resume")
    assert resumed["dropped_rows"] == 2 and resumed["changed"]["epochs"] == [1, 2] and resumed["step"] == 4
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 4, 6, 9, 12, 15, 18]  # step 1: always a row


def test_failed_evaluation_keeps_the_epoch(setup, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise data.VideoError("cannot open video /data/video7.mp4")

    monkeypatch.setattr(retrieval, "evaluate", broken)
    line = error(capsys, flags(setup, tmp_path), status=1)
    assert "evaluation after epoch 1 failed (cannot open video /data/video7.mp4)" in line
    assert "the epoch's training is kept" in line and "--resume` evaluates it" in line
    assert (state(tmp_path)["epoch"], state(tmp_path)["batch"], state(tmp_path)["step"]) == (1, 0, 9)
    monkeypatch.undo()
    metrics = train.main(flags(setup, tmp_path, "--resume"))  # evaluates the kept epoch, nothing to train
    assert rows(tmp_path, "eval")[-1]["step"] == 9 and rows(tmp_path, "eval")[-1]["t2v"] == metrics["t2v"]


@pytest.mark.parametrize("extra, message", [
    (["--max_frames", "0"], "--max_frames 0: a clip needs at least 1 frame"),
    (["--batch_size", "0"], "--batch_size 0: >= 1"),
    (["--batch_size", "6", "--gradient_accumulation_steps", "4"], "divisible by ranks x --gradient_accumulation_steps"),
    (["--max_words", "2"], "--max_words 2: [SOT] and [EOT] take 2 tokens"),
    (["--lr", "-0.001"], "--lr -0.001: a learning rate is positive and finite"),
    (["--lr", "nan"], "--lr nan"), (["--noclip_lr", "inf"], "--lr inf"),
    (["--clip_lr", "0"], "--clip_lr 0.0: positive"),
    (["--epochs", "0"], "--epochs 0: train at least 1 epoch"),
    (["--warmup_proportion", "1.5"], "--warmup_proportion 1.5"),
    (["--save_every", "-1"], "argument --save_every: invalid save_interval value: '-1'"),
    (["--resume", "--overwrite"], "--resume continues the run in --output_dir, --overwrite replaces it"),
    (["--checkpoint", __file__], "--checkpoint is what --eval_only evaluates"),
    (["--eval_only", "--checkpoint", "/no/such.pt"], "--checkpoint /no/such.pt: no such file"),
    (["--num_frame", "3"], "unrecognized arguments: --num_frame 3"),
])
def test_flag_errors(setup, tmp_path, extra, message, capsys):
    assert message in error(capsys, flags(setup, tmp_path, *extra))
    assert not tmp_path.exists() or not os.listdir(tmp_path)  # a failed start leaves no files


def test_checks_before_anything_slow(tmp_path, capsys, monkeypatch):
    """Method constraints are checked on a meta-device stand-in of the towers (named CLIP, tiny CLIP), and the
    data paths before any CLIP is loaded: no download, no synthetic set generated, no folder made."""
    monkeypatch.setattr(clip, "load", lambda *a, **k: pytest.fail("CLIP loaded before the checks"))
    monkeypatch.setattr(synthetic, "ensure_synthetic", lambda *a, **k: pytest.fail("synthetic set generated"))
    out = ["--output_dir", str(tmp_path / "out")]
    assert "K_d=13: STS runs in the last K_d of the 12 video layers" in error(
        capsys, ["--method", "ump", "--data", "msrvtt", "--clip", "ViT-B/32", "--K_d", "13", *out])
    assert "K_d=6: STS runs in the last K_d of the 2 video layers" in error(capsys, ["--method", "ump", "--K_d", "6", *out])
    assert "--eval_only would evaluate an untrained dgl: pass --checkpoint" in error(
        capsys, ["--method", "dgl", "--eval_only", *out])
    line = error(capsys, ["--method", "ump", "--data", "msrvtt", "--data_path", str(tmp_path / "none"), *out])
    assert "not found in --data_path" in line
    assert not (tmp_path / "out").exists()


def test_unreadable_test_video_and_clip_file_stop_the_start(setup, tmp_path, capsys):
    import shutil
    shutil.copytree(setup / "synthetic", tmp_path / "set")
    test_video = sorted(data.read_split("synthetic", "test", str(tmp_path / "set")).videos)[0]
    open(test_video, "wb").close()  # 0 bytes
    argv = flags(setup, tmp_path / "out", "--data_path", str(tmp_path / "set"))
    line = error(capsys, argv)
    assert "1 of 8 synthetic-test videos cannot be read" in line and test_video in line
    assert not (tmp_path / "out").exists()  # found before any training step, nothing written
    (tmp_path / "clip.txt").write_text("not a model")
    assert str(tmp_path / "clip.txt") in error(capsys, flags(setup, tmp_path / "out", "--clip", str(tmp_path / "clip.txt")))


@pytest.mark.parametrize("content, message", [
    (lambda good: good[:len(good) // 2], "is truncated or not a torch checkpoint (written by train.py?)"),
    (lambda good: os.urandom(4096), "is truncated or not a torch checkpoint (written by train.py?)"),
    (lambda good: b"", "(0 bytes) is truncated or not a torch checkpoint"),
    (lambda good: b"step,loss\n1,2.0\n", "is truncated or not a torch checkpoint"),
])
def test_bad_checkpoint_files(setup, tmp_path, capsys, content, message):
    ck = tmp_path / "ck.pt"
    torch.save(dict(model={"w": torch.zeros(100)}), ck)
    ck.write_bytes(content(ck.read_bytes()))
    for flag in ("--checkpoint", "--init"):
        eval_only = ["--eval_only"] if flag == "--checkpoint" else []
        line = error(capsys, flags(setup, tmp_path / "out", *eval_only, flag, str(ck)))
        assert f"{flag} {ck}" in line and message in line and "weights_only" not in line


def test_checkpoint_files_of_the_wrong_kind(setup, tmp_path, capsys):
    torch.save(make_tiny_clip().state_dict(), tmp_path / "sd.pt")  # a state dict is fine for --init only
    line = error(capsys, flags(setup, tmp_path / "a", "--eval_only", "--checkpoint", str(tmp_path / "sd.pt")))
    assert "holds a dict without model, not a checkpoint of train.py" in line
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    assert "holds a Tensor, not a checkpoint" in error(capsys, flags(setup, tmp_path / "b", "--init", str(tmp_path / "t.pt")))
    torch.save({"x.weight": torch.zeros(3)}, tmp_path / "other.pt")
    line = error(capsys, flags(setup, tmp_path / "c", "--init", str(tmp_path / "other.pt")))
    assert "none of its 1 tensors (x.weight) is one of this model" in line


def test_init_names_the_keys_it_leaves_out(setup, tmp_path, capsys):
    pre = ["--method", "simvtp", "--data_path", str(setup / "synthetic"), "--num_workers", "0", "--max_frames", "2",
           "--batch_size", "24", "--max_steps", "1"]
    train.main(pre + ["--stage", "pretrain", "--output_dir", str(tmp_path / "pre")])
    capsys.readouterr()
    train.main(pre + ["--output_dir", str(tmp_path / "ft"), "--init", str(tmp_path / "pre" / "checkpoint.pt")])
    line, = [x for x in capsys.readouterr().out.splitlines() if x.startswith("--init")]
    assert re.search(r"\d+ tensors loaded; \d+ unused \(pretraining-only modules, not built for fine-tuning\): "
                     r".*decoder\.\* \(\d+\)", line)


def test_help_shows_every_flag_and_the_methods_defaults(capsys):
    text = {}
    for name, argv in (("ump", ["--method", "ump", "--help"]), ("none", ["--help"])):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 0
        text[name] = capsys.readouterr().out
        assert "None" not in text[name]
        for flag in ("--seed", "--num_workers", "--batch_size_val", "--log_every", "--device", "--save_every",
                     "--lr", "--clip_lr", "--max_frames", "--output_dir", "--resume", "--overwrite"):
            assert re.search(rf"\n  {flag}[^\n]*(\n {{20,}}|  )\S", text[name]), (name, flag)  # a help text follows
    ump, none = (" ".join(text[k].split()) for k in ("ump", "none"))  # unwrapped
    assert "new (non-CLIP) parameters (default 0.001)" in ump and "dropout (default 42)" in ump and "--K_d K_D" in ump
    assert "of trainable CLIP parameters (default none: no CLIP weight trains)" in ump
    assert "(default: set by --method)" in none and "shows M's defaults" in none


def test_aliases_and_idle_flag_warnings(tmp_path, capsys):
    args, cls, given = train.parse_args(["--method", "ump", "--num_frames", "3", "--num_epochs", "4", "--noclip_lr", "0.5"])
    assert (args.frames, args.epochs, args.lr) == (3, 4, 0.5) and {"frames", "epochs", "lr"} <= given
    said = []
    for argv, warning in ((["--method", "ump", "--clip_lr", "1e-3"], "--clip_lr has no effect for --method ump: no CLIP"),
                          (["--method", "dgl", "--coef_lr", "1e-3"], "--coef_lr has no effect for --method dgl"),
                          (["--method", "full", "--lr", "1e-3"], "--lr has no effect for --method full: every trainable"),
                          (["--method", "simvtp", "--clip", "ViT-B/32"], "--clip has no effect for --method simvtp")):
        methods.probe(*train.parse_args(argv), said.append)
        assert warning in said[-1] and said[-1].startswith("WARNING: ")
    methods.probe(*train.parse_args(["--method", "full", "--clip_lr", "1e-3"]), said.append)
    assert len(said) == 4  # --clip_lr means something for full
