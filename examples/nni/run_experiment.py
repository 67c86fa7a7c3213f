"""Run the SigmaB NNI experiment (search_space.json, trial.py) with nothing listening beyond loopback.

NNI's manager serves its REST API and web portal on every interface and has no host option. This
launcher therefore re-runs itself inside a private network namespace (Linux ``unshare --net``)
whose only interface is ``lo``: the manager listens there, reachable from nowhere else, and the
namespace disappears with it. Where a namespace cannot be made, it refuses to start rather than
expose the port. It drives ``nni.experiment.Experiment`` (TPE, local training service), waits for
the trials, writes ``summary.json`` (each trial's status, parameters, intermediate and final
metrics) and stops the manager.

    python examples/nni/run_experiment.py --trials 8 --out runs/nni -- --data digits --epochs 3
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSIDE = "SIGMAB_NNI_NETNS"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--tuner", default="TPE", help="an NNI built-in tuner (TPE, Random, Anneal, ...)")
    ap.add_argument("--port", type=int, default=8080, help="the manager's port inside the private namespace")
    ap.add_argument("--out", default="runs/nni")
    ap.add_argument("trial_args", nargs=argparse.REMAINDER, help="after --: arguments of trial.py")
    a = ap.parse_args(argv)
    a.trial_args = [x for x in a.trial_args if x != "--"]
    return a


def main(argv=None) -> int:
    if os.environ.get(INSIDE) == "1":
        return run(parse(argv))
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--net", "true"], capture_output=True).returncode != 0:
        sys.stderr.write("error: cannot create a private network namespace (Linux `unshare --net` with the needed "
                         "privileges); NNI's manager would listen on every interface, so the experiment was not "
                         "started. Run nnictl on a firewalled machine instead (see README).\n")
        return 2
    inner = " ".join(shlex.quote(x) for x in [sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])])
    cmd = [unshare, "--net", "--", "sh", "-c", f"ip link set lo up && {INSIDE}=1 exec {inner}"]
    return subprocess.run(cmd).returncode


def _value(data):
    while isinstance(data, str):
        data = json.loads(data)
    return data


def run(a) -> int:
    from nni.experiment import Experiment

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    exp = Experiment("local")
    exp.config.experiment_name = "sigmab"
    exp.config.experiment_working_directory = str(out / "nni-experiments")
    exp.config.trial_command = " ".join(shlex.quote(x) for x in [sys.executable, "trial.py", *a.trial_args])
    exp.config.trial_code_directory = str(HERE)
    exp.config.search_space = json.loads((HERE / "search_space.json").read_text())
    exp.config.tuner.name = a.tuner
    exp.config.tuner.class_args = {"optimize_mode": "maximize"}
    exp.config.max_trial_number = a.trials
    exp.config.trial_concurrency = 1
    try:
        ok = exp.run(port=a.port, wait_completion=True)
        trials = []
        for job in exp.list_trial_jobs():
            metrics = exp.get_job_metrics(job.trialJobId).get(job.trialJobId, [])
            trials.append({"id": job.trialJobId, "status": job.status,
                           "parameters": job.hyperParameters[0].parameters if job.hyperParameters else None,
                           "intermediate": [_value(m.data) for m in metrics if m.type == "PERIODICAL"],
                           "final": [_value(m.data) for m in metrics if m.type == "FINAL"]})
    finally:
        exp.stop()
    summary = {"succeeded": bool(ok), "trials": trials}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for t in trials:
        final = t["final"][-1] if t["final"] else None
        print(f"{t['id']}: {t['status']}  {json.dumps(t['parameters'])} -> {final}")
    return 0 if ok and trials and all(t["status"] == "SUCCEEDED" for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
