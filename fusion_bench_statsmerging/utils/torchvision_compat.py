"""Let PyPI's torchvision import beside a torch build whose ABI its compiled ops do not match.

``open_clip_torch`` imports ``torchvision`` (for its image transforms only). Where torch is a build
torchvision's wheel was not compiled against (the CPU-only torch 2.13.0 file of the project's
machines), torchvision's ``_C`` library fails to load, and the import then dies in
``torchvision/_meta_registrations.py``: it registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` without checking that the ops exist ("operator torchvision::nms does not exist").

This module declares those two operator *schemas* (no kernels) when, and only when, the library
cannot load, so the import succeeds; calling ``torchvision.ops.nms`` then still fails loudly, and
nothing this plugin runs calls it. The fix has to run before the first ``import torchvision`` in
every interpreter, the ``fusion_bench`` CLI's included, so ``python -m
fusion_bench_statsmerging.utils.torchvision_compat`` writes a ``.pth`` file into site-packages that installs
an import hook at start-up. The hook is import-light: it costs nothing until torchvision is imported.

Only the standard library is imported at module level: the ``.pth`` line runs in every interpreter.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional

PTH_NAME = "zz_fusion_bench_statsmerging_torchvision_compat.pth"  # after setuptools' __editable__ path files
PTH_LINE = ("import sys; exec('try:\\n import fusion_bench_statsmerging.utils.torchvision_compat as m\\n"
            " m.install_import_hook()\\nexcept ImportError:\\n pass')\n")
MISSING_OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
               "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

_declared = []  # the torch.library.Library must stay alive, or its definitions are dropped


def torchvision_op_libraries() -> List[str]:
    """The compiled ``_C`` libraries of the installed torchvision, found without importing it."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = list(spec.submodule_search_locations)[0]
    return sorted(glob.glob(os.path.join(folder, "_C.*")) + glob.glob(os.path.join(folder, "_C*.so")))


def declare_missing_torchvision_ops() -> bool:
    """Declare ``torchvision::nms`` / ``qnms`` when torchvision's compiled ops cannot load.

    Returns True when the schemas were declared, False when the library loads (nothing to do) or
    torchvision is not installed."""
    import torch

    libraries = torchvision_op_libraries()
    if not libraries or _declared:
        return False
    try:
        torch.ops.load_library(libraries[0])
        return False
    except (OSError, ImportError, RuntimeError):
        pass
    if _op_exists("torchvision::nms"):
        return False
    library = torch.library.Library("torchvision", "DEF")
    for schema in MISSING_OPS:
        library.define(schema)
    _declared.append(library)
    return True


def _op_exists(qualified_name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(qualified_name, "")
        return True
    except RuntimeError:
        return False


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`declare_missing_torchvision_ops` once, just before the first ``import torchvision``."""

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname == "torchvision":
            remove_import_hook()
            declare_missing_torchvision_ops()
        return None  # the ordinary finders import the module


def install_import_hook() -> None:
    """Install the hook (what the ``.pth`` line runs); if torchvision is already imported, nothing to do."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionImportHook())


def remove_import_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionImportHook)]


def pth_path(site_packages: Optional[str] = None) -> Path:
    """Where the start-up file goes: this interpreter's (venv's) site-packages by default."""
    return Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME


def write_pth(site_packages: Optional[str] = None) -> Path:
    """Write (or refresh) the start-up file; return its path."""
    path = pth_path(site_packages)
    if not path.is_file() or path.read_text() != PTH_LINE:
        path.write_text(PTH_LINE)
    return path


def ensure_installed() -> Optional[Path]:
    """This interpreter's hook and, where site-packages is writable, the start-up file for new interpreters
    (what the test suite runs first); returns the file's path, or None where it could not be written."""
    install_import_hook()
    try:
        return write_pth()
    except OSError:
        return None


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fusion_bench_statsmerging.utils.torchvision_compat [SITE_PACKAGES]``: write the ``.pth`` file
    and check that torchvision now imports in a fresh interpreter."""
    import subprocess

    args = list(sys.argv[1:] if argv is None else argv)
    path = write_pth(args[0] if args else None)
    check = subprocess.run([sys.executable, "-c", "import torchvision, open_clip"], capture_output=True, text=True)
    print(f"wrote {path}")
    if check.returncode != 0:
        print("torchvision / open_clip still do not import:\n" + check.stderr[-2000:], file=sys.stderr)
        return 1
    print("torchvision and open_clip import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
