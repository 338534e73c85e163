"""Running one row: the child ``fusion_bench`` process, its overrides, limits and measurements.

:func:`launch` starts ``python -m fusion_bench_statsmerging.compare --_child STATS CACHE -- OVERRIDES``
in the row's run directory (its own process group, killed as a whole on timeout or interrupt);
:func:`child_main` is that child: the host CLI in-process, then its peak RSS and CUDA memory
written to ``STATS``. :func:`skipped_row` and :func:`config_file` handle rows that do not run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .budget import Budget, budget_note, matched_overrides, override_value, row_budget
from .report import collect_report, error_tail
from .rows import CUSTOM, OUR_PROTOCOLS, SUITE_BUILDERS, MethodSpec


# --------------------------------------------------------------------------- child launcher
CHILD_FLAG = "--_child"


def _child_stats(wall_s: float, exit_code: int) -> Dict[str, Any]:
    """Peak memory of this process (and of its waited-for workers), measured from inside."""
    kib = 1.0 if sys.platform != "darwin" else 1 / 1024.0  # ru_maxrss: KiB on Linux, bytes on macOS
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1024.0
    kids_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 1024.0
    stats: Dict[str, Any] = {"exit_code": exit_code, "inner_wall_s": wall_s,
                             "peak_rss_mib": self_rss, "peak_rss_children_mib": kids_rss,
                             "peak_cuda_mib": None, "cuda_devices": []}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = []
        for i in range(torch.cuda.device_count()):
            devices.append({"device": i,
                            "max_allocated_mib": torch.cuda.max_memory_allocated(i) / 2**20,
                            "max_reserved_mib": torch.cuda.max_memory_reserved(i) / 2**20})
        stats["cuda_devices"] = devices
        stats["peak_cuda_mib"] = max(d["max_allocated_mib"] for d in devices) if devices else None
    return stats


def child_main(argv: Sequence[str]) -> int:
    """``--_child STATS CACHE_DIR -- OVERRIDES...``: run the host CLI here, then record stats."""
    stats_path, cache_dir = argv[1], argv[2]
    overrides = list(argv[4:]) if len(argv) > 3 and argv[3] == "--" else list(argv[3:])
    start, exit_code = time.perf_counter(), 1
    try:
        # The host caches zero-shot heads under ./outputs/cache keyed by model *path*; one
        # cache per comparison keeps a rebuilt suite at the same path from reading stale heads.
        from fusion_bench.utils.cache_utils import set_default_cache_dir

        set_default_cache_dir(cache_dir)
        from fusion_bench.scripts.cli import _hydra_main

        sys.argv = ["fusion_bench", *overrides]
        _hydra_main()
        exit_code = 0
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the parent reads the traceback from stderr
        traceback.print_exc()
        exit_code = 1
    finally:
        Path(stats_path).write_text(json.dumps(_child_stats(time.perf_counter() - start, exit_code)))
    return exit_code


# --------------------------------------------------------------------------- running
@dataclasses.dataclass
class Context:
    """Everything shared by the runs of one comparison."""

    out: Path
    modelpool: str
    taskpool: str
    extra_overrides: List[str]
    per_method: Dict[str, List[str]]
    env: Dict[str, str]
    timeout: float
    fast: bool
    fast_steps: int
    jobs: int = 1  # runs at a time
    budget: Optional[Budget] = None  # a common budget for every trained row (--budget), else each row's own

    @property
    def cache_dir(self) -> Path:
        return self.out / "cache"

    def run_dir(self, key: str) -> Path:
        return self.out / "runs" / key


_PLACEHOLDER = re.compile(r"(?<!\$)\{(run_dir|cache_dir|out|fast_steps)\}")


def _fill(template: str, values: Mapping[str, str]) -> str:
    """Substitute our placeholders only, leaving Hydra's ``${...}`` interpolations alone."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _hydra_value(path: Path) -> str:
    """Quote a path for a Hydra override when it has characters the override grammar parses."""
    text = str(path)
    if re.fullmatch(r"[\w/.\-+~]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def placeholder_values(spec: MethodSpec, ctx: Context) -> Dict[str, str]:
    """Absolute paths for the placeholders: children run with their run dir as cwd."""
    return {"run_dir": str(ctx.run_dir(spec.key).resolve()), "cache_dir": str(ctx.cache_dir.resolve()),
            "out": str(ctx.out.resolve()), "fast_steps": str(ctx.fast_steps)}


def command_line(overrides: Sequence[str], env: Mapping[str, str]) -> str:
    """The equivalent shell command, with the environment the comparison added."""
    return shlex.join([*(f"{k}={v}" for k, v in env.items()), "fusion_bench", *overrides])


def build_overrides(spec: MethodSpec, ctx: Context) -> List[str]:
    """The Hydra overrides of one run: pools, method, fast-mode, user extras, then log paths
    last so every run writes into ``runs/<key>/`` whatever the user passed."""
    run_dir = ctx.run_dir(spec.key).resolve()
    values = placeholder_values(spec, ctx)
    overrides = [f"modelpool={ctx.modelpool}", f"taskpool={ctx.taskpool}"]
    overrides += [_fill(o, values) for o in spec.overrides]
    if ctx.budget is not None and spec.matched:
        overrides += matched_overrides(spec.matched, spec.probes, ctx.budget)
    if ctx.fast:
        overrides += [_fill(o, values) for o in spec.fast_overrides]
    overrides += [_fill(o, values) for o in ctx.extra_overrides]
    overrides += [_fill(o, values) for o in ctx.per_method.get(spec.key, [])]
    overrides += [f"path.log_dir={_hydra_value(run_dir)}",
                  f"report_save_path={_hydra_value(run_dir / 'program_report.json')}"]
    return overrides


def row_protocol(spec: MethodSpec, overrides: Sequence[str]) -> str:
    """The data-protocol text of a row, following a ``method.protocol=...`` override if any."""
    if spec.protocol_key is None:
        return spec.protocol
    found = override_value(overrides, spec.protocol_key)
    value = spec.default_protocol_value if found is None else found
    return OUR_PROTOCOLS.get(value or "", f"{CUSTOM}: {spec.protocol_key}={value}")


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a timed-out child and its data-loader workers (its own process group only)."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return
            time.sleep(0.1)


def _wait(proc: subprocess.Popen, timeout: float) -> Tuple[Optional[int], Optional[float]]:
    """Wait for the child with ``wait4`` so its own peak RSS is known even if it is killed
    before its launcher can write stats. Returns (exit code or None on timeout, RSS MiB)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024.0
        if time.monotonic() > deadline:
            _kill_group(proc)
            return None, None
        time.sleep(0.2)


# Children running now, so an interrupted parallel comparison (--jobs) can stop them all:
# the launcher threads cannot receive the parent's signal themselves.
_LIVE: set = set()
_LIVE_LOCK = threading.Lock()


def _kill_live() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _kill_group(proc)


def launch(spec: MethodSpec, ctx: Context) -> Dict[str, Any]:
    """Run one method in a child ``fusion_bench`` process and collect its row."""
    run_dir = ctx.run_dir(spec.key)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = build_overrides(spec, ctx)
    for d in spec.make_dirs:
        Path(_fill(d, placeholder_values(spec, ctx))).mkdir(parents=True, exist_ok=True)
    stats_path = run_dir / "child_stats.json"
    cmd = [sys.executable, "-m", "fusion_bench_statsmerging.compare", CHILD_FLAG, str(stats_path),
           str(ctx.cache_dir.resolve()), "--", *overrides]
    env = {**os.environ, **ctx.env}
    env.setdefault("HYDRA_FULL_ERROR", "1")  # the error, not Hydra's hint, ends stderr
    if ctx.jobs > 1:  # share the cores instead of every child starting one thread per core
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ctx.jobs)))
    row: Dict[str, Any] = {"key": spec.key, "label": spec.label, "kind": spec.kind,
                           "protocol": row_protocol(spec, overrides), "overrides": overrides,
                           "command": command_line(overrides, ctx.env), "run_dir": str(run_dir),
                           "settings": row_settings(spec, ctx)}
    start = time.perf_counter()
    # cwd = run dir: the host writes relative files (AdaMerging's merging_weights.pt, ./outputs).
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            code, wait_rss = _wait(proc, ctx.timeout)
        except BaseException:  # Ctrl-C: the child has its own session and would outlive us
            _kill_group(proc)
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    row["wall_time_s"] = time.perf_counter() - start
    row.update(_read_stats(stats_path, wait_rss))
    stderr = (run_dir / "stderr.log").read_text(errors="replace")
    if code is None:
        row.update(status="timeout", error=f"timed out after {ctx.timeout:g} s",
                   error_tail=error_tail(stderr))
        return row
    row.update(collect_report(spec, run_dir, code, stderr))
    row["budget"] = row_budget(spec.budget, run_dir, overrides)
    return row


def row_settings(spec: MethodSpec, ctx: Context) -> str:
    """How a row's settings were chosen, and whether a common budget replaced its own."""
    return spec.settings + budget_note(ctx.budget, bool(spec.matched))


def _read_stats(path: Path, wait_rss: Optional[float]) -> Dict[str, Any]:
    stats = json.loads(path.read_text()) if path.is_file() else {}
    rss = stats.get("peak_rss_mib", wait_rss)
    return {"peak_rss_mib": rss, "peak_rss_children_mib": stats.get("peak_rss_children_mib"),
            "peak_cuda_mib": stats.get("peak_cuda_mib"), "cuda_devices": stats.get("cuda_devices", [])}



def suite_problem(ctx: "Context") -> Optional[str]:
    """Why the suite every row would read is unusable, or None: checked once here, since otherwise
    each row starts, loads the host, and fails the same way."""
    pools = (ctx.modelpool, ctx.taskpool)
    family = ("heads" if any(p.startswith("heads_suite") for p in pools)
              else "openclip" if any(p.startswith("openclip_suite") for p in pools) else "clip")
    if not any(p.startswith(("clip_suite", "heads_suite", "openclip_suite")) for p in pools):
        return None
    if any("suite_dir=" in o for o in ctx.extra_overrides):
        return None  # the pools are pointed elsewhere explicitly
    variable, marker, build = SUITE_BUILDERS[family]
    value = ctx.env.get(variable) or os.environ.get(variable)
    if not value:
        return (f"the {'/'.join(pools)} pools read a suite directory, but neither --suite nor ${variable} is set. "
                f"Pass --suite DIR (build one with `{build}`).")
    if not (Path(value) / marker).is_file():
        return f"no suite at '{value}': '{Path(value) / marker}' is missing. Build one with `{build}` or fix --suite."
    return None


# --------------------------------------------------------------------------- config checks
def _config_dirs(extra_overrides: Iterable[str]) -> List[Path]:
    """Directories Hydra will search: ours, the host's, and any ``hydra.searchpath`` file dirs."""
    dirs = []
    for pkg in ("fusion_bench_statsmerging.config", "fusion_bench_config"):
        try:
            spec = importlib.util.find_spec(pkg)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs += [Path(p) for p in spec.submodule_search_locations]
    for o in extra_overrides:
        if o.startswith("hydra.searchpath="):
            dirs += [Path(p) for p in re.findall(r"file://([^,\]'\"]+)", o)]
    return dirs


def config_file(spec: MethodSpec, dirs: Sequence[Path]) -> Optional[Path]:
    """The YAML behind a spec's ``method=...`` choice, or None when no search dir has it."""
    for o in spec.overrides:
        if o.startswith("method="):
            name = o.split("=", 1)[1]
            for d in dirs:
                if (d / "method" / f"{name}.yaml").is_file():
                    return d / "method" / f"{name}.yaml"
            return None
    return None


def skipped_row(spec: MethodSpec, ctx: Context) -> Dict[str, Any]:
    """A listed-but-not-run row: a method this family cannot run (``not_applicable``, with the
    reason) or an optional method whose config is not there yet."""
    overrides = build_overrides(spec, ctx)
    name = next(o.split("=", 1)[1] for o in spec.overrides if o.startswith("method="))
    status, error = (("not applicable", spec.not_applicable) if spec.not_applicable else
                     ("skipped", f"config 'method/{name}' not found (optional method; not run)"))
    return {"key": spec.key, "label": spec.label, "kind": spec.kind, "status": status,
            "protocol": row_protocol(spec, overrides), "overrides": overrides,
            "settings": row_settings(spec, ctx), "budget": dict(spec.budget),
            "command": command_line(overrides, ctx.env), "error": error,
            "accuracies": {}, "average": None, "wall_time_s": None, "peak_rss_mib": None,
            "peak_cuda_mib": None}
