"""Slurm overheads on a real cluster (the local one of launch/dev_cluster.sh, or any other).

1. Scheduling overhead of the four-stage chain: the tiny pipeline through `launch/submit.py
   cluster=slurm`, its artifacts polled at 20 Hz. Per transition, from the end of a stage (its
   manifest appears) to the next stage's job running our code (its first log line) and to its
   first unit of work (a training step, an encoded shard; evaluate writes nothing before its report).
2. Cost of one preemption: stage 1 is stopped at a random step by `scancel --signal=USR1` (time-limit
   path: checkpoint, `scontrol requeue`) and by a real partition preemption (SIGTERM from a job in a
   higher-priority partition); the cost is the time from the signal to the resumed job's first step.

    eval "$(launch/dev_cluster.sh up)"; python benchmarks/bench_slurm.py [--nodes 4] [--repeats 2]

Target: each under 20 s on the local cluster.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.stagerun import env, tiny_overrides  # noqa: E402  (the same tiny setting as the tests)
from tsvae_dist.layout import STAGES  # noqa: E402

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \[rank 0\] tsvae_dist.pipeline.task: (\w+): Slurm job")


def _first_metrics(run_dir: Path, stage: str, after: int = 0) -> bool:
    path = run_dir / stage / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return bool(lines) and json.loads(lines[-1])["step"] > after


def _first_shard(run_dir: Path) -> bool:
    latents = run_dir / "encode" / "latents"
    return any(latents.glob("*/*.done"))


def _job_started(folder: Path) -> dict[str, float]:
    """stage -> time its rank 0 first ran our code (StageTask's first log line), from the task logs."""
    out: dict[str, float] = {}
    for log in sorted(folder.glob("*_0_log.err")):
        for line in log.read_text(errors="replace").splitlines():
            if (m := _LOG_TIME.match(line)) and m.group(2) not in out:
                out[m.group(2)] = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return out


def chain_overhead(work: Path, nodes: int, extra: list[str]) -> dict[str, dict[str, float]]:
    run_dir = work / "chain"
    overrides = [*tiny_overrides(work / "data", run_dir, **{"stage1.loader.streams": nodes,
                                                            "stage2.loader.streams": nodes}),
                 "cluster=slurm", f"nodes={nodes}", "cluster.tasks_per_node=1", "cluster.poll_s=1", *extra]
    proc = subprocess.Popen([sys.executable, "launch/submit.py", *overrides], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_work = {
        "stage1": lambda: _first_metrics(run_dir, "stage1"),
        "encode": lambda: _first_shard(run_dir),
        "stage2": lambda: _first_metrics(run_dir, "stage2"),
    }
    seen: dict[str, float] = {}
    while proc.poll() is None:
        now = time.time()
        for stage in STAGES:
            if f"{stage}_end" not in seen and (run_dir / stage / "MANIFEST.json").exists():
                seen[f"{stage}_end"] = now
            if stage in first_work and f"{stage}_work" not in seen and first_work[stage]():
                seen[f"{stage}_work"] = now
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"the pipeline failed:\n{out[-3000:]}")
    folder = Path(json.loads((run_dir / "slurm_jobs.json").read_text())["submissions"][-1]["log_folder"])
    started = _job_started(folder)
    result = {}
    for before, after in zip(STAGES, STAGES[1:], strict=False):
        end = seen[f"{before}_end"]
        row = {"to_job_running_s": round(started[after] - end, 2)}
        if f"{after}_work" in seen:
            row["to_first_work_s"] = round(seen[f"{after}_work"] - end, 2)
        result[f"{before}->{after}"] = row
    return result


def _wait(what: str, check, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def preemption_cost(work: Path, nodes: int, urgent: list[str], rng: random.Random,
                    repeats: int) -> dict[str, list]:
    run_dir = work / "preempt"
    overrides = [*tiny_overrides(work / "data", run_dir, **{"stage1.epochs": 60, "stage1.log_every_steps": 1,
                                                            "stage1.checkpoint_every_steps": 100000}),
                 "cluster=dev", f"nodes={nodes}", "cluster.wait=false", f"stage1.loader.streams={nodes}",
                 "+cluster.stage_overrides.encode.extra_sbatch={hold:true}"]  # the rest of the chain waits
    proc = subprocess.run([sys.executable, "launch/submit.py", *overrides], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"submission failed:\n{proc.stdout}\n{proc.stderr}")
    record = json.loads((run_dir / "slurm_jobs.json").read_text())["submissions"][-1]
    job = record["jobs"]["stage1"]
    log = Path(record["log_folder"]) / f"{job}_0_log.err"
    metrics = run_dir / "stage1" / "metrics.jsonl"

    def step() -> int:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return json.loads(lines[-1])["step"] if lines else 0

    def stops() -> list[int]:
        text = log.read_text(errors="replace") if log.exists() else ""
        return [int(s) for s in re.findall(r"stage1: stopped by SIG\w+ at step (\d+)", text)]

    results: dict[str, list] = {"usr1_requeue_s": [], "partition_preemption_s": []}
    try:
        for kind in ["usr1_requeue_s"] * repeats + ["partition_preemption_s"] * repeats:
            target = step() + rng.randint(5, 15)
            _wait(f"step {target}", lambda t=target: step() >= t)
            before = len(stops())
            t_signal = time.time()
            if kind == "usr1_requeue_s":
                subprocess.run(["scancel", "--signal=USR1", job], check=True, env=env())
            else:
                subprocess.run(["sbatch", *urgent, f"--output={work / 'urgent.out'}", "--wrap=sleep 1"], check=True,
                               env=env(), capture_output=True)
            _wait("the stop", lambda b=before: len(stops()) > b)
            stopped_at = stops()[-1]
            # The resumed job's first step writes step stopped_at + 1.
            _wait("the resumed job's first step", lambda s=stopped_at: step() > s)
            results[kind].append(round(time.time() - t_signal, 2))
    finally:
        subprocess.run([sys.executable, "launch/submit.py", *overrides, "action=cancel"], cwd=REPO, env=env(),
                       capture_output=True, timeout=300)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4, help="nodes per stage of the chain (1 task each)")
    parser.add_argument("--preempt-nodes", type=int, default=2, help="nodes of the preempted stage-1 job")
    parser.add_argument("--urgent", default="--partition=urgent --nodes=4 --exclusive",
                        help="sbatch options of a job that preempts the stage-1 job (all nodes, higher tier)")
    parser.add_argument("--repeats", type=int, default=2, help="preemptions of each kind")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random preemption steps")
    parser.add_argument("--extra", nargs="*", default=[], help="further overrides for the chain run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_slurm_", dir=REPO / ".cache" if (REPO / ".cache").is_dir()
                                     else None) as tmp:
        work = Path(tmp)
        chain = chain_overhead(work, args.nodes, args.extra)
        print(json.dumps({"chain": chain}), flush=True)
        preempt = preemption_cost(work, args.preempt_nodes, args.urgent.split(), random.Random(args.seed),
                                  args.repeats)
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "chain_nodes": args.nodes, "chain": chain, "preempt_nodes": args.preempt_nodes, "preemption": preempt}
    print(json.dumps(report, indent=2))
    worst_chain = max(max(row.values()) for row in chain.values())
    print(f"chain: worst stage-end -> next stage's first work {worst_chain:.1f} s (target < 20 s)")
    for kind, values in preempt.items():
        print(f"{kind}: signal -> resumed first step, median {statistics.median(values):.1f} s "
              f"over {len(values)} (target < 20 s)")


if __name__ == "__main__":
    main()
