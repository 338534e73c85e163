#!/usr/bin/env python3
"""Re-appliable relayout of ``fusion_bench_statsmerging/`` by concern (issue 17).

    python tools/relayout.py            # apply (git mv + rewrite references); prints what it did
    python tools/relayout.py --check    # exit 1 if applying would change anything

The package mirrors the host's ``fusion_bench/{method, modelpool, taskpool, models, utils}``:
``engine/`` (statistics, learner, merge engines, SAM, distillation, training plumbing),
``modelpool/``, ``taskpool/``, ``models/``, ``fixtures/`` (tiny offline suites, demo),
``compare/`` and ``utils/``; ``method/`` stays as it is.

What one run does, in this order:

1. ``git mv`` every module of :data:`MOVES` whose source exists and whose destination does not
   (an absent source is skipped, so entries for modules that only exist on other branches are
   harmless), creating the destination packages' ``__init__.py``.
2. Rewrites every ``import`` of a moved module or of a symbol of :data:`SYMBOLS` (absolute and
   relative, ``from pkg import module`` too) in every tracked ``.py`` file, keeping relative imports
   relative to the file's new place; a statement whose names now live in several modules is split.
3. Rewrites the remaining textual references in tracked ``.py .yaml .yml .md .sh .toml .cfg .txt``
   files and extensionless ``#!`` scripts (``.ci/run``): dotted paths (``fusion_bench_statsmerging.heads.PerTaskHeadsModelPool``, Hydra
   ``_target_``s, ``python -m ...``, ``pkg.module:attr`` entry points) and file paths
   (``fusion_bench_statsmerging/heads.py``), and relative Sphinx references in docstrings
   (``:mod:`.fixtures` ``) of moved modules. ``docs/results/`` is left as recorded; what it names
   and must keep working gets a shim (:data:`SHIMS`).
4. Writes the shims of :data:`SHIMS` (old module path -> re-export of the new one).

A second run changes nothing (every rewrite maps old paths only, and a dotted path that already
names a new module is left alone), so the script can be run again after merging a newer ``main``.
Files are read and written as UTF-8; only files whose text changes are written.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PKG = "fusion_bench_statsmerging"

# old module (relative to the package) -> new module. A module path that becomes a package
# keeps its dotted name (``compare`` -> ``compare/__init__.py``).
MOVES: Dict[str, str] = {
    # engine: what turns a pool's experts into merging coefficients and a merged model
    "stats": "engine.stats",
    "lora_stats": "engine.lora_stats",
    "learner": "engine.learner",
    "merge": "engine.merge",
    "fused": "engine.fused",
    "sam": "engine.sam",
    "distillation": "engine.distillation",
    "schedule": "engine.schedule",
    "selection": "engine.selection",
    "checkpoint": "engine.checkpoint",
    "distributed": "engine.distributed",
    "profiling": "engine.profiling",  # where a training step's time goes (method.profile_steps)
    "reuse": "engine.reuse",  # a saved learner applied to another pool
    # model pools
    "suite": "modelpool.clip_suite",
    "heads": "modelpool.heads",
    "heterogeneous": "modelpool.heterogeneous",
    "heterogeneous_heads": "modelpool.heterogeneous_heads",
    "lora": "modelpool.lora",
    "openclip_convert": "modelpool.openclip.convert",
    "openclip_pool": "modelpool.openclip.pool",
    # task pools
    "corruptions": "taskpool.corruptions",
    # models
    "backbones": "models.backbones",
    "teachers": "models.teachers",
    # offline fixtures and the demo
    "fixtures": "fixtures.clip",
    "heads_fixtures": "fixtures.heads",
    "t5_fixtures": "fixtures.t5",
    "lora_fixtures": "fixtures.lora",
    "openclip_fixtures": "fixtures.openclip",
    "demo": "fixtures.demo",
    # the comparison runner becomes a package (rows / runner / report)
    "compare": "compare",
    # tools
    "errors": "utils.errors",
    "preflight": "utils.preflight",
    "prefetch": "utils.prefetch",
    "artifacts": "utils.artifacts",
    "torchvision_compat": "utils.torchvision_compat",
}

# Modules whose file moves although their dotted name does not.
FILE_MOVES: Dict[str, str] = {"compare": "compare/__init__.py"}

# Symbols of a split module that live elsewhere than the module's own new place:
# "oldmodule.Symbol" -> new module. Imports of them are split accordingly. The splits themselves
# (heads, fused, heterogeneous, compare) are hand edits committed after this script's result.
_HEADS_MODELS = ("Inputs", "INPUT_KINDS", "HeadsBackbone", "PerTaskHeadsModel", "ImageProcessor",
                 "TextProcessor", "concat_inputs", "inputs_to", "column_only_view", "_value_of", "read_inputs")
_HEADS_BATCHNORM = ("batchnorm_layers", "running_stats", "BatchNormMerger", "_eval_batchnorm",
                    "batchnorm_with_stats", "batch_statistics", "reestimate_batchnorm", "mixed_batches", "_rows")
_FUSED_SPECTRA = ("EXACT_MAX_DIM", "KRYLOV_MAX_DIM", "KRYLOV_TOL", "GRAM_BATCH_BYTES", "exact_top_eigenvalues",
                  "_whiten", "_orthonormal_block", "_ritz_check", "krylov_top_eigenvalues", "_count",
                  "top_gram_eigenvalues")
_FUSED_STATS = ("_matrix_dims", "_gram", "_scalar_features", "grouped_task_vector_stats")
_HETERO_DISTILL = ("HeteroPoolError", "DistillationSettings", "SPLITS", "_warmup_cosine", "PixelFn", "clip_pixels",
                   "_teacher_targets_and_student_pixels", "_predict", "_autocast", "distill_student")
SYMBOLS: Dict[str, str] = {
    **{f"heads.{s}": "models.heads" for s in _HEADS_MODELS},
    **{f"heads.{s}": "engine.batchnorm" for s in _HEADS_BATCHNORM},
    "heads.PerTaskHeadsTaskPool": "taskpool.heads",
    **{f"fused.{s}": "engine.spectra" for s in _FUSED_SPECTRA},
    **{f"fused.{s}": "engine.fused_stats" for s in _FUSED_STATS},
    **{f"heterogeneous.{s}": "engine.student_distillation" for s in _HETERO_DISTILL},
}

# Old module paths that docs/results (or suites built from them) name: keep them importable.
SHIMS: Dict[str, str] = {
    # suite.json / expert.json of built per-task-head suites name "fusion_bench_statsmerging.backbones:<Class>"
    "backbones": "models.backbones",
}
SHIM_MARK = "# relayout shim"

TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".cfg", ".txt"}  # and scripts with a #! line
SKIP_PREFIXES = ("docs/results/",)
SELF = "tools/relayout.py"


# --------------------------------------------------------------------------- names
def full(mod: str) -> str:
    return f"{PKG}.{mod}" if mod else PKG


OLD = {full(k): full(v) for k, v in MOVES.items() if k != v}
OLD_SYMBOLS = {full(k): full(v) for k, v in SYMBOLS.items()}
NEW = set(OLD.values()) | set(OLD_SYMBOLS.values())
NEW_PACKAGES = {".".join(m.split(".")[:i]) for m in NEW for i in range(2, len(m.split(".")))}


def _prefixes(dotted: str) -> List[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


ROOT = Path(__file__).resolve().parents[1]  # set by apply()


def _old_module_gone(dotted: str) -> bool:
    """An old module whose name is now a package (``fixtures`` -> ``fixtures/clip.py``) names the
    old module only while its file is still there; afterwards it names the new package."""
    return dotted in NEW_PACKAGES and not (ROOT / path_of(dotted)).is_file()


def map_module(dotted: str) -> str:
    """The new dotted name of a module (or ``module.attr``) path; unchanged if not moved."""
    for p in _prefixes(dotted):
        if p in NEW:  # already names a new module (e.g. fixtures.clip, whose prefix was a module)
            return dotted
        if p in OLD_SYMBOLS:  # module.Symbol of a split module
            return OLD_SYMBOLS[p] + "." + p.rpartition(".")[2] + dotted[len(p):]
        if p in OLD:
            return dotted if _old_module_gone(p) else OLD[p] + dotted[len(p):]
    return dotted


def map_symbol(module: str, name: str) -> Tuple[str, str, Optional[str]]:
    """Where ``from module import name`` imports from now: (module, name, alias needed or None)."""
    key = f"{module}.{name}"
    if key in NEW or key in NEW_PACKAGES:  # already the new layout
        return module, name, None
    if key in OLD_SYMBOLS:
        return OLD_SYMBOLS[key], name, None
    if key in OLD:  # from pkg import submodule
        parent, _, child = OLD[key].rpartition(".")
        return parent, child, (name if child != name else None)
    return map_module(module), name, None


# --------------------------------------------------------------------------- files
def git(*args: str, root: Path) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def module_of(path: str) -> Optional[str]:
    """Dotted module of a repo-relative .py path inside the package (None outside it)."""
    if not path.startswith(PKG + "/") or not path.endswith(".py"):
        return None
    parts = path[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def path_of(module: str, package: bool = False) -> str:
    rel = module.replace(".", "/")
    return f"{rel}/__init__.py" if package else f"{rel}.py"


def new_file_of(old_mod: str) -> str:
    if old_mod in FILE_MOVES:
        return f"{PKG}/{FILE_MOVES[old_mod]}"
    return path_of(full(MOVES[old_mod]))


def plan_moves(root: Path) -> List[Tuple[str, str]]:
    moves = []
    for old in MOVES:
        src, dst = f"{PKG}/{old}.py", new_file_of(old)
        if (root / src).is_file() and not (root / dst).exists() and SHIM_MARK not in (root / src).read_text():
            moves.append((src, dst))
    return moves


# --------------------------------------------------------------------------- imports
def _package_of(module: str, is_init: bool) -> str:
    return module if is_init else module.rpartition(".")[0]


def _resolve(level: int, module: Optional[str], package: str) -> str:
    base = package.split(".")
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _relative(target: str, package: str) -> Tuple[int, str]:
    """``from <level dots><rest> import`` naming ``target`` from inside ``package``."""
    t, p = target.split("."), package.split(".")
    common = 0
    while common < min(len(t), len(p)) and t[common] == p[common]:
        common += 1
    return len(p) - common + 1, ".".join(t[common:])


def _format(indent: str, head: str, names: Sequence[str], comment: str, width: int = 110) -> str:
    line = f"{indent}{head} import {', '.join(names)}"
    if len(line) + (len(comment) + 2 if comment else 0) <= width:
        return line + (f"  {comment}" if comment else "")
    out = [f"{indent}{head} import (" + (f"  {comment}" if comment else "")]
    cur = indent + "    "
    for n in names:
        piece = f"{n},"
        if len(cur) + len(piece) + 1 > width and cur.strip():
            out.append(cur.rstrip())
            cur = indent + "    "
        cur += piece + " "
    out.append(cur.rstrip())
    out.append(f"{indent})")
    return "\n".join(out)


def rewrite_imports(text: str, old_module: Optional[str], new_module: Optional[str], is_init: bool) -> str:
    """Rewrite the import statements of ``text`` (a file now at ``old_module``, soon ``new_module``)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    old_pkg = _package_of(old_module, is_init) if old_module else None
    new_pkg = _package_of(new_module, is_init) if new_module else None
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for ln in lines:
        offsets.append(offsets[-1] + len(ln))
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [map_module(a.name) + (f" as {a.asname}" if a.asname else "") for a in node.names]
            if any(map_module(a.name) != a.name for a in node.names):
                edits.append((node, None, names))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            if old_pkg is None:
                continue
            source = _resolve(node.level, node.module, old_pkg)
        else:
            source = node.module or ""
        if not (source == PKG or source.startswith(PKG + ".")):
            continue
        groups: Dict[str, List[str]] = {}
        for a in node.names:
            mod, name, alias = map_symbol(source, a.name)
            alias = a.asname or alias
            groups.setdefault(mod, []).append(name + (f" as {alias}" if alias else ""))
        relative_now = bool(node.level)
        same = (list(groups) == [source] and (not relative_now or old_pkg == new_pkg)
                and all(map_symbol(source, a.name)[1:] == (a.name, None) for a in node.names))
        if same:
            continue
        edits.append((node, relative_now and new_pkg, groups))
    if not edits:
        return text
    for node, rel_pkg, groups in sorted(edits, key=lambda e: -e[0].lineno):
        start = offsets[node.lineno - 1] + len(lines[node.lineno - 1].encode()[: node.col_offset].decode())
        end_line = lines[node.end_lineno - 1]
        end = offsets[node.end_lineno - 1] + len(end_line.encode()[: node.end_col_offset].decode())
        span = text[start:end]
        comment = " ".join(re.findall(r"#[^\n]*", span)).strip()
        line_start = offsets[node.lineno - 1]
        indent = text[line_start:start]
        if isinstance(groups, list):  # plain "import a.b as c"
            new_text = f"import {', '.join(groups)}"
        else:
            stmts = []
            for mod, names in groups.items():
                if rel_pkg:
                    level, rest = _relative(mod, rel_pkg)
                    head = "from " + "." * level + rest
                else:
                    head = f"from {mod}"
                stmts.append(_format(indent, head, names, comment if not stmts else ""))
            new_text = "\n".join(stmts)[len(indent):]
        text = text[:start] + new_text + text[end:]
    return text


# --------------------------------------------------------------------------- text
_DOTTED = re.compile(r"(?<![\w.])" + PKG + r"(?:\.\w+)+(?::\w+)?")
_PATH = re.compile(r"(?<![\w/])" + PKG + r"((?:/\w+)+)\.py\b")


def _dotted(match: re.Match) -> str:
    token = match.group(0)
    dotted, colon, attr = token.partition(":")
    if colon and f"{dotted}.{attr}" in OLD_SYMBOLS:  # module:Symbol of a split module
        return OLD_SYMBOLS[f"{dotted}.{attr}"] + colon + attr
    return map_module(dotted) + colon + attr


def _path(match: re.Match) -> str:
    old = match.group(1)[1:].replace("/", ".")
    if old in MOVES and full(old) in OLD:
        return new_file_of(old)
    if old in FILE_MOVES:
        return f"{PKG}/{FILE_MOVES[old].rpartition('/')[0]}/"
    return match.group(0)


def _rewrite_segment(text: str) -> str:
    return _PATH.sub(_path, _DOTTED.sub(_dotted, text))


def import_spans(text: str) -> List[Tuple[int, int]]:
    """Character spans of the import statements of Python source (rewritten by :func:`rewrite_imports`)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    starts = [0]
    for ln in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(ln))
    return sorted((starts[n.lineno - 1], starts[n.end_lineno]) for n in ast.walk(tree)
                  if isinstance(n, (ast.Import, ast.ImportFrom)))


_ROLE = re.compile(r"(:(?:mod|func|class|meth|data|attr|exc):`~?)(\.+)([\w.]+)`")


def rewrite_roles(text: str, old_module: Optional[str], new_module: Optional[str], is_init: bool) -> str:
    """Relative Sphinx references in docstrings (``:mod:`.fixtures` ``), kept relative to the new place."""
    if not old_module or not new_module:
        return text
    old_pkg, new_pkg = _package_of(old_module, is_init), _package_of(new_module, is_init)

    def sub(m: re.Match) -> str:
        target = _resolve(len(m.group(2)), m.group(3), old_pkg)
        mapped = map_module(target)
        if mapped == target and old_pkg == new_pkg:
            return m.group(0)
        level, rest = _relative(mapped, new_pkg)
        return f"{m.group(1)}{'.' * level}{rest}`"

    return _ROLE.sub(sub, text)


def rewrite_text(text: str, python: bool = False) -> str:
    """Dotted and file-path references; in Python source, outside import statements."""
    if not python:
        return _rewrite_segment(text)
    out, pos = [], 0
    for a, b in import_spans(text):
        if a < pos:
            continue
        out.append(_rewrite_segment(text[pos:a]))
        out.append(text[a:b])
        pos = b
    out.append(_rewrite_segment(text[pos:]))
    return "".join(out)


# --------------------------------------------------------------------------- driver
def is_text(file: Path) -> bool:
    """A file whose references are rewritten: a known suffix, or an extensionless script (``.ci/run``)."""
    if file.suffix in TEXT_SUFFIXES:
        return True
    if file.suffix or not file.is_file() or file.is_symlink():
        return False
    with open(file, "rb") as fh:
        return fh.read(2) == b"#!"


def shim_text(old: str, new: str) -> str:
    return (f'"""Old path of :mod:`{full(new)}`, kept for what was written with it (docs/results, built suites)."""\n'
            f"{SHIM_MARK}: written by tools/relayout.py\n\n"
            f"from {full(new)} import *  # noqa: F401,F403\n")


def apply(root: Path, dry_run: bool = False) -> List[str]:
    global ROOT
    ROOT = root
    done: List[str] = []
    moves = plan_moves(root)
    file_map = dict(moves)  # old path -> new path
    listed = git("ls-files", root=root).splitlines()
    listed += git("ls-files", "--others", "--exclude-standard", root=root).splitlines()
    tracked = [p for p in listed if p != SELF and not p.startswith(SKIP_PREFIXES) and is_text(root / p)]
    # 1+2+3: rewrite contents in place (at their current paths), then move
    new_contents: Dict[str, str] = {}
    for path in sorted(set(tracked)):
        file = root / path
        if not file.is_file() or file.is_symlink():
            continue
        text = file.read_text(encoding="utf-8")
        if SHIM_MARK in text:
            continue
        new = text
        if path.endswith(".py"):
            dest = file_map.get(path, path)
            is_init = path.endswith("__init__.py") or dest.endswith("__init__.py")
            new = rewrite_imports(new, module_of(path), module_of(dest), is_init)
            new = rewrite_roles(new, module_of(path), module_of(dest), is_init)
        new = rewrite_text(new, python=path.endswith(".py"))
        if new != text:
            new_contents[path] = new
    if dry_run:
        return [f"mv {a} {b}" for a, b in moves] + [f"edit {p}" for p in new_contents]
    for path, text in new_contents.items():
        (root / path).write_text(text, encoding="utf-8")
        done.append(f"edit {path}")
    for src, dst in moves:
        dst_path = root / dst
        for parent in reversed(dst_path.relative_to(root / PKG).parents[:-1]):
            init = root / PKG / parent / "__init__.py"
            if not init.exists() and init != dst_path:
                init.parent.mkdir(parents=True, exist_ok=True)
                init.write_text("")
                git("add", str(init.relative_to(root)), root=root)
                done.append(f"add {init.relative_to(root)}")
        dst_path.parent.mkdir(parents=True, exist_ok=True)
        git("mv", src, dst, root=root)
        done.append(f"mv {src} {dst}")
    # 4: shims
    for old, new in SHIMS.items():
        shim = root / PKG / f"{old}.py"
        target = root / path_of(full(new))
        if not target.is_file():
            continue
        text = shim_text(old, new)
        if not shim.exists() or shim.read_text() != text:
            if shim.exists() and SHIM_MARK not in shim.read_text():
                continue  # a real module still sits there (its move was skipped)
            shim.write_text(text)
            git("add", str(shim.relative_to(root)), root=root)
            done.append(f"shim {shim.relative_to(root)}")
    return done


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="repository root")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a run would")
    args = parser.parse_args(argv)
    root = Path(args.root)
    done = apply(root, dry_run=args.check)
    for line in done:
        print(line)
    if args.check:
        print("relayout: up to date" if not done else f"relayout: {len(done)} change(s) pending")
        return 1 if done else 0
    print(f"relayout: {len(done)} change(s)" if done else "relayout: nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
