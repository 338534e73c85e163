"""What each row of a comparison spent: unlabeled images per task, optimisation steps (probe and
search steps included), forward+backward passes per step and how the kept state was chosen.

Why: a margin between two methods means little when one trained three times longer on more images
and kept its best state. Every row states its budget (read back from the run's own report where the
method writes one, from its settings otherwise), and ``--budget matched`` gives every trained row the
recommended configuration's images, steps and selection (:func:`matched_overrides`).

This module reads YAML and JSON only: the comparison's parent process stays free of torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

RECOMMENDED = "statsmerging_residual"  # the configuration whose budget "matched" copies


@dataclasses.dataclass(frozen=True)
class Budget:
    """A training budget. ``train_steps`` is the main run; probing rows spend ``starts`` extra runs
    of ``probe_steps`` before it, and rows that do not probe get the total as plain steps."""

    images_per_task: int
    train_steps: int
    starts: int = 0
    probe_steps: int = 0
    select_every: int = 100
    select_samples: int = 256

    @property
    def steps(self) -> int:
        """Every optimisation step of a probing run, probes included."""
        return self.train_steps + self.starts * min(self.probe_steps, self.train_steps)

    def values(self) -> Dict[str, str]:
        """The placeholders of :attr:`MethodSpec.matched` (``{steps}``, ``{train_steps}``, ...)."""
        return {"images": str(self.images_per_task), "steps": str(self.steps), "train_steps": str(self.train_steps),
                "probe_steps": str(self.probe_steps), "select_every": str(self.select_every),
                "select_samples": str(self.select_samples)}


def recommended_budget(config_dirs: Sequence[Path]) -> Budget:
    """The budget of the committed recommended configuration, read from its YAML (its own keys)."""
    import yaml

    for d in config_dirs:
        path = Path(d) / "method" / f"{RECOMMENDED}.yaml"
        if path.is_file():
            cfg = yaml.safe_load(path.read_text()) or {}
            starts = cfg.get("starts") or []
            return Budget(images_per_task=int(cfg["max_samples_per_task"]), train_steps=int(cfg["max_steps"]),
                          starts=len(starts), probe_steps=int(cfg.get("start_probe_steps") or 0) if starts else 0,
                          select_every=int(cfg.get("select_every", 100)),
                          select_samples=int(cfg.get("select_samples", 256)))
    raise SystemExit(f"--budget matched reads method/{RECOMMENDED}.yaml, which no config directory has "
                     f"({', '.join(map(str, config_dirs))}).")


def parse_budget(text: Optional[str], config_dirs: Sequence[Path]) -> Optional[Budget]:
    """``--budget``: ``matched`` (the recommended configuration's), ``own`` / None (each row's own),
    or explicit ``images=64,steps=300[,starts=2,probe_steps=50,select_every=50,select_samples=64]``
    where ``steps`` is the main run's and probes come on top of it."""
    if text in (None, "", "own"):
        return None
    if text == "matched":
        return recommended_budget(config_dirs)
    fields = {"images": "images_per_task", "steps": "train_steps", "starts": "starts", "probe_steps": "probe_steps",
              "select_every": "select_every", "select_samples": "select_samples"}
    values: Dict[str, int] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in fields or not value.strip().isdigit():
            raise SystemExit(f"--budget: expected 'matched' or {','.join(f'{k}=N' for k in fields)}, got '{text}'")
        values[fields[key.strip()]] = int(value)
    missing = [k for k in ("images", "steps") if fields[k] not in values]
    if missing:
        raise SystemExit(f"--budget: {' and '.join(missing)} must be given (got '{text}')")
    return Budget(**values)


# --------------------------------------------------------------------------- reading a row's budget
def _report(run_dir: Path) -> Optional[Mapping[str, Any]]:
    """Our methods' JSON report in a run folder (``*_report.json`` with a schedule), if any."""
    for path in sorted(Path(run_dir).glob("*_report.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, Mapping) and "schedule" in report:
            return report
    return None


def _selection_text(selection: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    if config.get("select_by") == "validation_agreement" and "agreement_by_step" in selection:
        return (f"label-free agreement on {config.get('select_samples')} unlabeled validation images per task, "
                f"every {config.get('select_every')} steps")
    return "last state"


def budget_from_report(report: Mapping[str, Any]) -> Dict[str, Any]:
    """The budget our method spent, as its report records it."""
    config = report.get("config", {})
    fit = report.get("fit_data", {}) or {}
    images = sorted({int(v.get("num_samples", 0)) for v in fit.values() if isinstance(v, Mapping)})
    probe = report.get("start_probe") or {}
    probe_steps = int(probe.get("steps", 0)) * len(probe.get("results") or []) if probe.get("results") else 0
    search = report.get("start_search") or {}
    train_steps = int(report["schedule"]["max_steps"])
    return {"images_per_task": (images[0] if len(images) == 1 else images) if train_steps else 0,
            "steps": train_steps + probe_steps, "probe_steps": probe_steps,
            "passes_per_step": (2 if config.get("optimizer") == "sam" else 1) if train_steps + probe_steps else 0,
            "selection": (f"λ grid of {len(search.get('agreement', {}))} scored by label-free agreement on unlabeled "
                          f"validation images" if search and not train_steps
                          else _selection_text(report.get("selection", {}), config)),
            "read_from": "the run's report"}


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The value the last Hydra override of ``key`` sets (quotes removed), or None when none sets it."""
    value = None
    for o in overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            value = v.strip("'\"")
    return value


def budget_from_settings(spec_budget: Mapping[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """A host method's budget: its spec's description, with the step count its overrides set."""
    if not spec_budget:  # one of ours that wrote no report: it did not run to the end
        return {"read_from": "no report (the run did not finish)"}
    budget = dict(spec_budget)
    steps = override_value(overrides, "method.max_steps")
    if steps is not None and budget.get("steps"):
        budget["steps"] = int(steps)
    budget["read_from"] = "the row's settings"
    return budget


def row_budget(spec_budget: Mapping[str, Any], run_dir: Path, overrides: Sequence[str]) -> Dict[str, Any]:
    """What a finished row spent: from our report when the run wrote one, else from its settings."""
    report = _report(run_dir)
    return budget_from_report(report) if report is not None else budget_from_settings(spec_budget, overrides)


def budget_cells(budget: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    """The budget as the table's text cells."""
    b = budget or {}
    images = b.get("images_per_task")
    if isinstance(images, list):
        images = f"{images[0]}-{images[-1]}" if images else ""
    return {"images/task": "" if images is None else str(images),
            "steps": "" if b.get("steps") is None else str(b["steps"]),
            "passes/step": "" if b.get("passes_per_step") is None else str(b["passes_per_step"]),
            "selection": str(b.get("selection", ""))}


# --------------------------------------------------------------------------- giving a row a budget
def matched_overrides(templates: Sequence[str], probes: bool, budget: Budget) -> list:
    """A trained row's overrides under ``budget``. A probing row keeps its probes when the budget has
    them; without them (``starts=0``) it trains one start for every step."""
    values = budget.values()
    if probes and not budget.starts:
        templates = [t.replace("{train_steps}", "{steps}") for t in templates if "{probe_steps}" not in t]
        templates.append("method.starts=null")
    return [t.format(**values) for t in templates]


def budget_note(budget: Optional[Budget], matched: bool) -> str:
    """What the settings column adds when a common budget replaced the row's own."""
    if budget is None or not matched:
        return ""
    return "; its images, steps and selection set by the comparison's common budget (--budget)"
