"""Run outputs (coefficients, learner, heatmap, JSON report, merged model), written atomically.

Every file is written to a temporary name in the same directory and renamed into place, so
an interrupted run never leaves a half-written artefact that looks complete. The temporary
names are created private (0600/0700); before the rename they get the mode any other file of
the run gets (0666/0777 less the umask, like the host's outputs), so others can read them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file or folder under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then move the result onto ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_json(path: str | os.PathLike, data: Any) -> Path:
    return save_text(path, json.dumps(data, indent=2, default=str))


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def coefficients_csv(coefficients: Tensor, model_names: Sequence[str], param_names: Sequence[str]) -> str:
    """Layers as rows, experts as columns (task-wise: a single row named ``all``)."""
    coef = coefficients.detach().cpu()
    if coef.dim() == 1:
        coef, param_names = coef[:, None], ["all"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["layer", *model_names])
    for l, name in enumerate(param_names):
        writer.writerow([name, *[f"{float(coef[k, l]):.6f}" for k in range(len(model_names))]])
    return buf.getvalue()


def save_heatmap(path: str | os.PathLike, coefficients: Tensor, model_names: Sequence[str],
                 title: str = "StatsMerging coefficients") -> Path:
    """Layers x experts heatmap of the coefficients (like the paper's Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coef = coefficients.detach().cpu().float()
    coef = coef[:, None] if coef.dim() == 1 else coef
    data = coef.t().numpy()  # (layers, experts)
    height = min(2 + 0.04 * data.shape[0], 30)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(model_names), height))
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(model_names)), model_names, rotation=45, ha="right")
    ax.set_ylabel("layer (parameter tensor index)" if data.shape[0] > 1 else "")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="lambda")
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)


def save_model_dir(model, path: str | os.PathLike) -> Path:
    """``save_pretrained`` into a temporary sibling directory, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:
            torch.save(model.state_dict(), tmp / "pytorch_model.bin")
        os.chmod(tmp, default_mode(directory=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def coefficient_summary(coefficients: Tensor, model_names: Sequence[str]) -> Mapping[str, Any]:
    """Per-expert mean coefficient plus overall range: what a report reader wants at a glance."""
    coef = coefficients.detach().cpu().float()
    per_expert = coef if coef.dim() == 1 else coef.mean(dim=1)
    return {
        "mean": float(coef.mean()), "min": float(coef.min()), "max": float(coef.max()),
        "per_expert_mean": {n: float(v) for n, v in zip(model_names, per_expert)},
    }
