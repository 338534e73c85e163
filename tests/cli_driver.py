"""Run ``fusion_bench`` command lines as separate processes that share one start-up.

``python cli_driver.py JOBS_JSON`` imports the host CLI once, then forks a child per job that runs
``_hydra_main()`` exactly as the ``fusion_bench`` script does and ends as that script would (exit
status, exit hooks, excepthook), with stdout and stderr together in the job's ``output`` file. A job
with ``"signal"`` gets that signal once its ``"signal_when"`` file exists. Prints one JSON list of
``{"rc", "seconds"}`` (rc as a shell reports it: 128 + signal for a killed child).
"""

import json
import os
import signal
import sys
import time

from fusion_bench.scripts.cli import _hydra_main  # the imports every job would pay


def child(args, output):
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["fusion_bench", *args]
    _hydra_main()
    sys.exit(0)  # what the script's end does; a SystemExit or error above ends the child the same way


def run(job):
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        child(job["args"], job["output"])
    sent = not job.get("signal")
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if not sent and os.path.exists(job["signal_when"]):
            os.kill(pid, getattr(signal, job["signal"]))
            sent = True
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    return {"rc": code if code >= 0 else 128 - code, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    print(json.dumps([run(job) for job in json.loads(sys.argv[1])]))
