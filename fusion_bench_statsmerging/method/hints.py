"""What a run tells the user before and after the long work: hub files missing offline, no evaluating task pool.

Both read the Hydra run's choices (``modelpool=...``, ``taskpool=...``), so the message names the command or
config the user would type.
"""

from __future__ import annotations

from typing import Optional

from ..utils.errors import PoolError

# modelpool config name -> the task pool that evaluates it (for the hint below)
EVALUATING_TASKPOOL = {
    "clip-vit-base-patch32_TA8": "clip-vit-classification_TA8",
    "clip-vit-base-patch16_TA8": "clip-vit-classification_TA8_B16",
    "clip-vit-large-patch14_TA8": "clip-vit-classification_TA8_L14",
    "clip-vit-base-patch32_TALL14": "clip-vit-classification_TALL14",
    "clip-vit-base-patch32_TALL20": "clip-vit-classification_TALL20",
    "clip-vit-base-patch16_TALL14": "clip-vit-classification_TALL14_B16",
    "clip-vit-base-patch16_TALL20": "clip-vit-classification_TALL20_B16",
    "clip-vit-large-patch14_TALL14": "clip-vit-classification_TALL14_L14",
    "clip-vit-large-patch14_TALL20": "clip-vit-classification_TALL20_L14",
    "clip_suite": "clip_suite",
    "clip_suite_hetero": "clip_suite",
    "clip_suite_lora": "clip_suite",
    "openclip_suite": "openclip_suite",
    "openclip": "openclip",
    "openclip-vit-b-32_TA8": "openclip-vit-classification_TA8",
    "heads_suite": "heads_suite",
    "heads_suite_hetero": "heads_suite",
    "clip-vit-base-patch32_TA8_hetero": "clip-vit-classification_TA8",
    **{pool: "flan-t5_glue_text_generation" for pool in (
        "flan-t5-base_glue", "flan-t5-base_glue_lora16", "flan-t5-large_glue_lora16",
        "flan-t5-base_glue_tta", "flan-t5-base_glue_lora16_tta", "flan-t5-large_glue_lora16_tta")},
}


# a family of pools -> the methods that merge it, as the user types them
FAMILY_METHODS = {
    "clip": "method=statsmerging (statsmerging_residual, samerging, ...)",
    "heads": "method=statsmerging_heads (statsmerging_residual_heads, samerging_heads, adamerging_heads, ...)",
    "seq2seq": "method=statsmerging_flan_t5 (or statsmerging_flan_t5_taskwise)",
}


def pool_family(pool_class: type) -> Optional[str]:
    """``clip``, ``heads`` or ``seq2seq``: which methods' model family a pool class serves (None: another)."""
    from fusion_bench.modelpool import CLIPVisionModelPool, Seq2SeqLMPool

    from ..modelpool.heads import PerTaskHeadsModelPool

    for family, base in (("heads", PerTaskHeadsModelPool), ("clip", CLIPVisionModelPool), ("seq2seq", Seq2SeqLMPool)):
        if issubclass(pool_class, base):
            return family
    return None


def family_mismatch(method: str, method_family: Optional[str], pool_class: type) -> Optional[str]:
    """One line when a method of one model family is given a pool of another (a config pair that cannot
    apply), naming the methods that merge that pool; None when it applies or either side is any family."""
    family = pool_family(pool_class)
    if method_family is None or family is None or family == method_family:
        return None
    return (f"{method} merges {method_family} model pools, and {pool_class.__name__} is a {family} pool: "
            f"use {FAMILY_METHODS[family]} with it.")


def hydra_choice(group: str) -> str:
    """The config the user chose for a group (``modelpool=...``), or '' outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group, "") or "")
    except Exception:
        return ""


def check_hub_files(modelpool, program) -> None:
    """Offline with hub files missing: one error naming them and ``statsmerging-prefetch``, in seconds,
    instead of a long retry loop ending in a ConnectionError. Local pools need nothing and cost nothing."""
    from ..utils.prefetch import command_for, needs_of_pools, offline_problem

    needs = needs_of_pools(modelpool, getattr(program, "_taskpool", None))
    if not needs:
        return
    command = command_for(hydra_choice("modelpool") or None, hydra_choice("taskpool") or None)
    problem = offline_problem(needs, command)
    if problem:
        raise PoolError(problem)


def taskpool_hint(program) -> Optional[str]:
    """One line telling the user how to evaluate, when the run composed the host's dummy task pool."""
    taskpool = getattr(program, "_taskpool", None)
    if taskpool is None or "DummyTaskPool" not in str(taskpool.get("_target_", "")):
        return None
    pool = hydra_choice("modelpool")
    suggestion = EVALUATING_TASKPOOL.get(str(pool).split("/")[-1], "<a task pool matching the model pool>")
    return (f"hint: no evaluation task pool was selected (the host's dummy pool only counts parameters); "
            f"add `taskpool={suggestion}` to evaluate the merged model.")
