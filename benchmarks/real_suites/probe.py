"""The builders' reference row: a linear probe on frozen pretrained features.

It answers "what does the pretrained backbone give without fine-tuning?", so each real suite's manifest
can show how far its experts (and then the merges) are above it. Labels are read here, by design: this is
a reference built beside the experts, never something a merging method fits.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PENALTIES = ("weight_decay", "l2")


def linear_probe(train: Tuple[Tensor, Tensor], validation: Tuple[Tensor, Tensor], num_classes: int, seed: int,
                 strengths: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2), penalty: str = "weight_decay",
                 steps: int = 300, lr: float = 1e-2, eval_every: int = 25) -> Tuple[nn.Linear, Dict[str, Any]]:
    """Logistic regression by full-batch Adam on standardised features; the regularisation strength and the
    step are chosen on validation (test is never seen here).

    ``penalty`` is how ``strengths`` regularise: ``"weight_decay"`` is Adam's (weight and bias),
    ``"l2"`` adds ``strength * ||W||^2`` to the loss (weight only); each builder keeps the one its
    published manifest was made with. The standardisation is folded into the returned head, which takes
    raw features; the info dict holds ``validation_accuracy``, ``step`` and the chosen strength under the
    penalty's name.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"linear_probe: penalty must be one of {PENALTIES}, got {penalty!r}")
    (x, y), (xv, yv) = train, validation
    y, yv = y.to(x.device), yv.to(x.device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z, zv = (x - mean) / std, (xv - mean) / std
    best: Dict[str, Any] = {"validation_accuracy": -1.0}
    for strength in strengths:
        torch.manual_seed(seed)
        head = nn.Linear(x.shape[1], num_classes).to(x.device)
        decay = strength if penalty == "weight_decay" else 0.0
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=decay)
        for step in range(1, steps + 1):
            loss = F.cross_entropy(head(z), y)
            if penalty == "l2":
                loss = loss + strength * head.weight.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % eval_every == 0:
                with torch.no_grad():
                    acc = float((head(zv).argmax(-1) == yv).float().mean())
                    if acc > best["validation_accuracy"]:
                        best.update({"validation_accuracy": acc, penalty: strength, "step": step,
                                     "weight": head.weight / std, "bias": head.bias - head.weight @ (mean / std)})
    probe = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.copy_(best.pop("weight"))
        probe.bias.copy_(best.pop("bias"))
    return probe.eval(), best
