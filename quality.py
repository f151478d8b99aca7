"""quality.py: every method trained on the synthetic set over several seeds through train.py, its last evaluation
as mean ± population std: the tables of docs/results.md and docs/results-synthetic.md. Run by bench.py:

    python bench.py quality                                   # every method, seeds 0,1,2, one run at a time
    python bench.py quality --methods ump,dgl --seeds 0,1,2 --jobs 2
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time


def quality(args):
    """-> rows of mean ± population std of each method's last evaluation over the seeds.

    Runs go `--jobs` at a time, the CPU threads split between them. A finished run leaves final_eval.json in its
    directory and is not trained again, so an interrupted `quality` picks up where it stopped."""
    runs, queue, running = {}, [], []
    for name in args.methods.split(","):
        method, extra = (name.split("-")[0], ["--latent", "linear"]) if name == "dgl-linear" else (name, [])
        for seed in args.seeds.split(","):
            out = os.path.join(args.out, f"quality_{name}_seed{seed}")
            runs[name, seed] = out
            if not os.path.exists(os.path.join(out, "final_eval.json")):
                queue.append((out, ["train.py", "--method", method, "--seed", seed, "--output_dir", out] + extra))
    env = dict(os.environ)  # one job at a time: exactly the command a user runs, timed as such
    if args.jobs > 1:  # several: the cores split between them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    while queue or running:
        while queue and len(running) < args.jobs:
            out, cmd = queue.pop(0)
            shutil.rmtree(out, ignore_errors=True)  # an unfinished run starts over: its log would mix two runs
            os.makedirs(out)
            print("python " + " ".join(cmd), flush=True)
            log = open(os.path.join(out, "stdout.txt"), "w")
            started = (time.time(), os.getloadavg()[0])
            running.append((out, cmd, started, subprocess.Popen([sys.executable] + cmd, stdout=log,
                                                                stderr=subprocess.STDOUT, env=env)))
        time.sleep(1)
        for job in [j for j in running if j[3].poll() is not None]:
            running.remove(job)
            out, cmd, (t0, load0), proc = job
            if proc.returncode:
                sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); its output is in {out}/stdout.txt")
            # the last evaluation, the whole run's wall time and the 1-minute load average at its start and
            # end: a time means little without the load it was measured under
            load = [round(load0, 1), round(os.getloadavg()[0], 1)]
            final = dict(eval_rows(out)[-1], wall_s=round(time.time() - t0, 1), load=load)
            json.dump(final, open(os.path.join(out, "final_eval.json"), "w"))
    rows = []
    for name in args.methods.split(","):
        finals = [json.load(open(os.path.join(runs[name, s], "final_eval.json"))) for s in args.seeds.split(",")]
        metrics = [{f"{d} {k}": v for d in ("t2v", "v2t") for k, v in e[d].items()} for e in finals]
        for m, e in zip(metrics, finals):
            if "temporal" in e:  # the synthetic set's time-reversed pairs
                m["pair acc"] = e["temporal"]["pair_acc"]
            if "wall_s" in e:
                m["wall min"] = e["wall_s"] / 60
        stats = {k: (statistics.mean(m[k] for m in metrics), statistics.pstdev(m[k] for m in metrics))
                 for k in metrics[0] if all(k in m for m in metrics)}
        loads = [x for e in finals for x in e.get("load", [])]
        extra = " --latent linear" if name == "dgl-linear" else ""
        rows.append(dict(method=name, seeds=args.seeds, stats=stats,
                         load=f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?",
                         command=f"python train.py --method {name.split('-')[0]}{extra} --seed S"))
    return rows


def eval_rows(out):
    """A run's eval rows: log.jsonl of a training run, or the eval-*.json record that an evaluation-only run
    (zeroshot trains nothing) writes instead."""
    log = os.path.join(out, "log.jsonl")
    if os.path.exists(log):
        return [json.loads(l) for l in open(log) if '"event": "eval"' in l]
    return [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out)) if f.startswith("eval-")]


def quality_table(rows):
    keys = [k for k in ("t2v R@1", "t2v R@5", "t2v R@10", "t2v MdR", "v2t R@1", "v2t R@10", "pair acc", "wall min")
            if k in rows[0]["stats"]]
    lines = ["| method | " + " | ".join(keys) + " | load | command |", "|---|" + "---:|" * len(keys) + "---|---|"]
    for r in rows:
        cells = " | ".join(f"{r['stats'][k][0]:.1f} ± {r['stats'][k][1]:.1f}" for k in keys)
        lines.append(f"| {r['method']} | {cells} | {r['load']} | `{r['command']}` |")
    return "\n".join(lines)
