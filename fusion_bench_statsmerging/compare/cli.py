"""``statsmerging-compare`` / ``python -m fusion_bench_statsmerging.compare``: arguments, row
selection, and running the rows ``--jobs`` at a time into the result files."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .budget import parse_budget
from .report import write_outputs
from .rows import (
    CUSTOM, DEFAULT_METHODS, EVIDENCE_METHODS, HEADS_DEFAULT_METHODS, HEADS_REGISTRY, REGISTRY, MethodSpec,
    suite_family,
)
from .runner import (
    CHILD_FLAG, Context, _config_dirs, _kill_live, build_overrides, child_main, command_line, config_file, launch,
    row_protocol, skipped_row, suite_problem,
)


# --------------------------------------------------------------------------- CLI
def _key_value(text: str, sep: str, what: str) -> Tuple[str, str]:
    key, found, value = text.partition(sep)
    if not found or not key:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
    return key, value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="statsmerging-compare",
        description="Run merging methods through the fusion_bench CLI on one model pool and "
                    "task pool; write results.{md,csv,json,png} to --out.")
    p.add_argument("--modelpool", default=None,
                   help="modelpool config name (default: clip_suite, or heads_suite for a per-task-head --suite)")
    p.add_argument("--taskpool", default=None, help="taskpool config name (default: as --modelpool's default)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method keys (default: all standard ones; see --list); 'evidence': "
                        "the recommended configuration, its ablations at its budget and the peers")
    p.add_argument("--budget", default=None, metavar="matched|images=N,steps=N[,...]",
                   help="one budget for every trained row: 'matched' = the recommended configuration's "
                        "(statsmerging_residual.yaml: unlabeled images per task, steps incl. start probes, "
                        "label-free selection); or explicit images=,steps=[,starts=,probe_steps=,select_every=,"
                        "select_samples=]. Default: each row's own (its budget is still reported)")
    p.add_argument("--out", type=Path, default=Path("outputs/compare"), help="output directory")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per method (default 3 h)")
    p.add_argument("--fast", action="store_true",
                   help="smoke run: few optimisation steps for AdaMerging and our methods")
    p.add_argument("--fast-steps", type=int, default=5, help="max_steps used by --fast (default 5)")
    p.add_argument("--suite", type=Path, default=None,
                   help="suite directory: a CLIP suite (sets STATSMERGING_SUITE_DIR for the clip_suite pools) or a "
                        "per-task-head suite (suite.json format per_task_heads/1: sets "
                        "STATSMERGING_HEADS_SUITE_DIR, heads_suite pools and that family's rows)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="environment for the runs (each run starts in its own run directory, so "
                        "give absolute paths)")
    p.add_argument("--extra-overrides", action="append", default=[], metavar="OVERRIDES",
                   help="Hydra overrides for every run (shell-split; repeatable; absolute paths), "
                        "e.g. 'fabric.accelerator=cpu hydra.searchpath=[file:///abs/conf]'")
    p.add_argument("--set", action="append", default=[], metavar="KEY:OVERRIDE",
                   help="a Hydra override for one method, e.g. task_arithmetic:method.scaling_factor=0.5")
    p.add_argument("--add", action="append", default=[], metavar="KEY=OVERRIDES",
                   help="an extra method row from Hydra overrides, e.g. 'ta05=method=task_arithmetic "
                        "method.scaling_factor=0.5' (protocol: custom)")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods run at a time (default 1). With more, wall times overlap and the "
                        "report says so; peak memory stays per process")
    p.add_argument("--list", action="store_true", help="list the known methods and exit")
    p.add_argument("--dry-run", action="store_true", help="print the fusion_bench command lines and exit")
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit 1 if any method did not succeed (rows not applicable to the pool family excepted)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    args.family = suite_family(args.suite, args.modelpool or "clip_suite")
    return args


def family_registry(family: str) -> Tuple[Dict[str, MethodSpec], List[str]]:
    """The known rows and the default list of a pool family (``clip`` or ``heads``)."""
    if family == "heads":
        return dict(HEADS_REGISTRY), list(HEADS_DEFAULT_METHODS)
    return dict(REGISTRY), list(DEFAULT_METHODS)


def select_specs(args: argparse.Namespace, registry: Mapping[str, MethodSpec],
                 builtin: Optional[Mapping[str, MethodSpec]] = None,
                 defaults: Sequence[str] = DEFAULT_METHODS) -> List[MethodSpec]:
    """The specs to run, in the order asked; unknown keys are a usage error listing the known ones.
    ``builtin``: the family's own rows (anything else in ``registry`` came from ``--add``)."""
    builtin = REGISTRY if builtin is None else builtin
    if args.methods:
        keys = [k.strip() for k in args.methods.split(",") if k.strip()]
        if "evidence" in keys:
            at = keys.index("evidence")
            keys[at:at + 1] = [k for k in EVIDENCE_METHODS if k in builtin and k not in keys]
        keys += [k for k in registry if k not in builtin and k not in keys]  # rows from --add always run
    else:
        keys = [k for k in defaults if k in registry] + [k for k in registry if k not in builtin]
    unknown = [k for k in keys if k not in registry]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(registry)}")
    return [registry[k] for k in keys]


def build_context(args: argparse.Namespace) -> Context:
    env = dict(_key_value(e, "=", "KEY=VAL") for e in args.env)
    pool = "heads_suite" if args.family == "heads" else "clip_suite"
    if args.suite is not None:
        variable = "STATSMERGING_HEADS_SUITE_DIR" if args.family == "heads" else "STATSMERGING_SUITE_DIR"
        env[variable] = str(args.suite.resolve())
    per_method: Dict[str, List[str]] = {}
    for s in args.set:
        key, override = _key_value(s, ":", "KEY:OVERRIDE")
        per_method.setdefault(key, []).append(override)
    extra = [o for chunk in args.extra_overrides for o in shlex.split(chunk)]
    return Context(out=args.out.resolve(), modelpool=args.modelpool or pool, taskpool=args.taskpool or pool,
                   extra_overrides=extra,
                   per_method=per_method, env=env, timeout=args.timeout, fast=args.fast,
                   fast_steps=args.fast_steps, jobs=args.jobs,
                   budget=parse_budget(args.budget, _config_dirs(extra)))


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM -> an exception, so ``launch`` stops the running child's process group too."""
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == CHILD_FLAG:
        return child_main(argv)
    args = parse_args(argv)
    builtin, defaults = family_registry(args.family)
    registry = dict(builtin)
    for a in args.add:
        key, overrides = _key_value(a, "=", "KEY=OVERRIDES")
        registry[key] = MethodSpec(key, key, tuple(shlex.split(overrides)), CUSTOM)
    if args.list:
        for s in registry.values():
            print(f"{s.key:28s} {s.label:40s} {row_protocol(s, s.overrides):45s} {' '.join(s.overrides)}")
        return 0
    ctx = build_context(args)
    specs = select_specs(args, registry, builtin, defaults)
    dirs = _config_dirs(ctx.extra_overrides)
    if args.dry_run:
        for s in specs:
            print(command_line(build_overrides(s, ctx), ctx.env))
        return 0
    problem = suite_problem(ctx)
    if problem:
        print(f"statsmerging-compare: error: {problem}", file=sys.stderr)
        return 2
    ctx.out.mkdir(parents=True, exist_ok=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    shutil.rmtree(ctx.cache_dir, ignore_errors=True)  # fresh heads: the suite may have been rebuilt
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "modelpool": ctx.modelpool,
            "taskpool": ctx.taskpool, "fast": ctx.fast, "jobs": ctx.jobs,
            "budget": None if ctx.budget is None else {**dataclasses.asdict(ctx.budget), "steps": ctx.budget.steps},
            "extra_overrides": ctx.extra_overrides, "env": ctx.env, "argv": argv}
    slots: List[Optional[Dict[str, Any]]] = [None] * len(specs)
    todo = []
    for i, spec in enumerate(specs):
        if spec.not_applicable or (spec.optional and not args.methods and config_file(spec, dirs) is None):
            slots[i] = skipped_row(spec, ctx)
        else:
            todo.append(i)
    run_specs(specs, todo, slots, ctx, meta)
    rows = [r for r in slots if r is not None]
    md = write_outputs(ctx.out, rows, meta)
    print(md)
    return 1 if args.fail_on_error and any(r["status"] not in ("ok", "not applicable") for r in rows) else 0


def _launch_logged(spec: MethodSpec, ctx: Context) -> Dict[str, Any]:
    print(f"[compare] {spec.label} ...", file=sys.stderr, flush=True)
    row = launch(spec, ctx)
    print(f"[compare] {spec.label}: {row['status']} in {row['wall_time_s']:.1f} s"
          + (f" ({row['error']})" if row.get("error") else ""), file=sys.stderr, flush=True)
    return row


def run_specs(specs: Sequence[MethodSpec], todo: Sequence[int], slots: List[Optional[Dict[str, Any]]],
              ctx: Context, meta: Dict[str, Any]) -> None:
    """Run ``specs[i]`` for ``i`` in ``todo``, ``ctx.jobs`` at a time, into ``slots[i]``.

    Rows keep the requested order whatever order runs finish in; the result files are
    rewritten after each run so partial results survive an interrupted comparison. On an
    interrupt (Ctrl-C, SIGTERM) every running child's process group is stopped.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=max(1, ctx.jobs), thread_name_prefix="compare")
    futures = {pool.submit(_launch_logged, specs[i], ctx): i for i in todo}
    pending = set(futures)
    try:
        while pending:
            # a timeout keeps the main thread responsive to signals between polls
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                slots[futures[fut]] = fut.result()
            if done:
                write_outputs(ctx.out, [r for r in slots if r is not None], meta)
    except BaseException:
        for fut in pending:
            fut.cancel()
        _kill_live()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
