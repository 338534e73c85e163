"""Label-free model selection: keep the coefficients the teachers agree with most on held-out images.

Training fits the train split's unlabeled images; every ``select_every`` steps the merged
model is scored by how often it predicts what each expert predicts on unlabeled images of the
*validation* split (never labels, never test images), and the best state is kept. This guards a
long schedule against overfitting the small fit sets without reading a single label. A task whose pool
has no validation split is scored on a slice of its train split held out from the fit (``holdout.py``).
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

SELECTIONS = ("last", "validation_agreement")
# where the scored images come from, as reports name it (fit_data says, per task, which rows were held out)
SELECTION_IMAGES = ("unlabeled, as select_by: each task's validation split, or a slice of its train split held "
                    "out from the fit where it has none (fit_data: held_out_for_selection)")


class BestState:
    """The best-scoring state of a module seen so far (a CPU copy), and where it was seen."""

    def __init__(self) -> None:
        self.score: Optional[float] = None
        self.step: Optional[int] = None
        self.state: Optional[Dict[str, object]] = None
        self.scores: Dict[int, float] = {}

    def offer(self, score: float, step: int, module: nn.Module) -> bool:
        """Record ``score`` at ``step``; keep the module's state when it is the best so far (ties: earlier)."""
        self.scores[int(step)] = float(score)
        if self.score is not None and score <= self.score:
            return False
        self.score, self.step = float(score), int(step)
        self.state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return True

    def restore(self, module: nn.Module) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)

    def summary(self) -> Dict[str, object]:
        return {"best_step": self.step, "best_agreement": self.score,
                "agreement_by_step": {str(k): round(v, 5) for k, v in self.scores.items()}}
