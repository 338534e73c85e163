"""Issue 29: through the real CLI, every bad input ends in one clear last line with exit status 1 and
nothing half written, and an interrupted run ends with its signal's status and the override that resumes.

The command lines run in processes forked after one shared start-up (tests/cli_driver.py), so each costs
its own work only, not the CLI's imports.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO_ROOT
from fusion_bench_statsmerging.utils.preflight import safetensors_problem

POOL = ["modelpool=clip_suite", "fabric.accelerator=cpu"]
RUN = ["method=statsmerging", *POOL, "method.batch_size=8", "method.data_fraction=0.25"]
SHORT = [*RUN, "method.max_steps=2"]
LONG = ["method.max_steps=60", "method.checkpoint_every=1"]  # signalled once its first checkpoint exists

# name -> (command line, what the last line starts with, what it holds besides)
BAD = {
    "empty_tasks": ([*SHORT, "modelpool.tasks=[]"], "error: tasks=[] selects no list of tasks",
                    ["tiny_colors", "tiny_stripes", "tiny_quadrant"]),
    "unknown_task": ([*SHORT, "modelpool.tasks=[tiny_nope]"], "error: Tasks ['tiny_nope'] are not in the suite", []),
    "truncated_expert": ([*SHORT, "modelpool.suite_dir={cut}"], "error: The model 'tiny_stripes' cannot be loaded from",
                         ["{cut}/experts/tiny_stripes/model.safetensors", "cut short"]),
    "truncated_expert_host_method": (["method=simple_average", *POOL, "modelpool.suite_dir={cut}"],
                                     "error: The model 'tiny_stripes' cannot be loaded from", ["cut short"]),
    "max_epochs_text": ([*RUN, "method.max_steps=null", "method.max_epochs=abc"],
                        "error: method.max_epochs must be a number (or null), got 'abc'.", []),
    "max_epochs_negative": ([*RUN, "method.max_steps=null", "method.max_epochs=-1"],
                            "error: max_epochs must be >= 0 (0: no training), got -1.", []),
    "lr_negative": ([*SHORT, "method.lr=-1"], "error: lr must be positive, got -1.", []),
    "batch_size_bool": ([*SHORT, "method.batch_size=true"], "error: method.batch_size must be an integer, got True.", []),
}


@pytest.fixture(scope="module")
def cut_suite(suite_dir, tmp_path_factory) -> Path:
    """The tiny suite with one expert's weight file cut in half (links for everything else)."""
    root = tmp_path_factory.mktemp("cut_suite")
    for path in suite_dir.rglob("*"):
        target = root / path.relative_to(suite_dir)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.name == "model.safetensors" and path.parent.name == "tiny_stripes":
            target.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            target.symlink_to(path)
    return root


@pytest.fixture(scope="module")
def cli(suite_dir, cut_suite, tmp_path_factory):
    """name -> (exit status, output lines, seconds, log_dir) of every command line below, run once."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    (tmp / "a_file").write_text("in the way")
    jobs = {name: {"args": [a.format(cut=cut_suite) for a in args]} for name, (args, _, _) in BAD.items()}
    jobs["log_dir_in_a_file"] = {"args": SHORT, "log_dir": tmp / "a_file" / "logs"}
    jobs["hub_offline"] = {"args": ["method=statsmerging", "modelpool=clip-vit-base-patch32_TA8",
                                    "taskpool=clip-vit-classification_TA8"]}
    for sig in ("SIGTERM", "SIGINT"):
        jobs[sig] = {"args": RUN + LONG, "signal": sig}
    jobs["resumed"] = {"args": RUN + LONG + [f"method.resume={tmp / 'SIGINT' / 'checkpoint.pt'}"]}
    for name, job in jobs.items():
        job.setdefault("log_dir", tmp / name)
        job["args"] = job["args"] + [f"path.log_dir={job['log_dir']}"]
        job["output"] = str(tmp / f"{name}.out")
        if "signal" in job:
            job["signal_when"] = str(job["log_dir"] / "checkpoint.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp / "hf_home"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", STATSMERGING_SUITE_DIR=str(suite_dir))
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "cli_driver.py"),
                           json.dumps([{**job, "log_dir": str(job["log_dir"])} for job in jobs.values()])],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: (r["rc"], Path(job["output"]).read_text().strip().splitlines(), r["seconds"], job["log_dir"])
            for (name, job), r in zip(jobs.items(), results)}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_ends_in_one_error_line_and_writes_no_result(cli, cut_suite, name):
    code, lines, _, log_dir = cli[name]
    _, start, held = BAD[name]
    assert code == 1, lines[-20:]
    assert lines[-1].startswith(start), lines[-20:]
    for text in held:
        assert text.format(cut=cut_suite) in lines[-1]
    assert sum(start[len("error: "):] in line for line in lines) <= 2  # Hydra's short report and ours
    assert not list(log_dir.glob("coefficients*")) and not (log_dir / "program_report.json").exists()


def test_output_folder_in_a_file_is_one_line_before_hydra_writes_anything(cli):
    code, lines, seconds, log_dir = cli["log_dir_in_a_file"]
    assert code == 1 and len(lines) == 1, lines[-20:]
    assert lines[0].startswith(f"error: Cannot create the output folder path.log_dir='{log_dir}'")
    assert "is a file, not a folder" in lines[0] and seconds < 30


def test_headline_command_without_the_hub_is_one_line_in_seconds_and_leaves_nothing(cli):
    code, lines, seconds, log_dir = cli["hub_offline"]
    assert code == 1 and len(lines) == 1, lines[-20:]
    assert lines[0].startswith("error: The Hugging Face hub cannot be reached")
    assert "statsmerging-prefetch modelpool=clip-vit-base-patch32_TA8 taskpool=clip-vit-classification_TA8" in lines[0]
    assert not log_dir.exists() and seconds < 30


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_interrupted_run_keeps_its_checkpoint_and_says_how_to_resume(cli, sig, code):
    rc, lines, _, log_dir = cli[sig]
    checkpoint = log_dir / "checkpoint.pt"
    assert rc == code, lines[-20:]
    assert lines[-1] == (f"interrupted: {sig}: the checkpoint is '{checkpoint}'; to go on, rerun the same "
                         f"command with method.resume={checkpoint}")
    assert checkpoint.is_file() or sig == "SIGINT"  # SIGINT's was taken (and removed) by the resumed run
    assert not (log_dir / "coefficients.pt").exists()
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines)


def test_the_printed_override_resumes_the_run(cli):
    rc, lines, _, log_dir = cli["resumed"]
    assert rc == 0, lines[-20:]
    report = json.loads((log_dir / "statsmerging_report.json").read_text())
    assert report["history"][0]["step"] == 0 and report["history"][-1]["step"] == 59  # carried over
    assert not (cli["SIGINT"][3] / "checkpoint.pt").exists()  # the finished run's result replaces it


def test_safetensors_problem_reads_the_header_only(suite_dir, tmp_path):
    whole = suite_dir / "experts" / "tiny_colors" / "model.safetensors"
    assert safetensors_problem(whole) is None and load_file(str(whole))
    data = whole.read_bytes()
    for size, reason in ((4, "header is incomplete"), (100, "header is incomplete"),
                         (len(data) - 1, "was cut short (an interrupted download")):
        (tmp_path / "cut.safetensors").write_bytes(data[:size])
        assert reason in safetensors_problem(tmp_path / "cut.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(len(b"nope").to_bytes(8, "little") + b"nope")
    assert "not safetensors JSON" in safetensors_problem(tmp_path / "cut.safetensors")
