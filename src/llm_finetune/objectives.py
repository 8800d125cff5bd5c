"""What a run trains for (`train.objective`): supervised fine-tuning (`sft`, the default), or a preference
objective after it, each through TRL's trainer for it (not a loss of our own, so it stays correct as TRL
moves): DPO and KTO (`trl`), ORPO and SimPO (`trl.experimental`: ORPOTrainer, and CPOTrainer with
loss_type "simpo" and no NLL term).

Each objective reads a few `preference.*` keys; setting one it does not read is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    name: str
    summary: str
    paired: bool  # trains on (prompt, chosen, rejected); KTO on single answers marked good or bad
    reference: bool  # compares with a reference model (the base: the adapter switched off)
    options: tuple[str, ...]  # the preference.* keys it reads
    loss_types: tuple[str, ...] = ()  # TRL's choices for preference.loss_type (first: the default)
    beta: float = 0.1  # preference.beta when null


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("sft", "supervised fine-tuning on the answers (the Trainer)", False, False, ()),
    Objective("dpo", "Direct Preference Optimization (TRL DPOTrainer): the chosen answer above the rejected one, "
              "relative to the reference", True, True, ("beta", "loss_type", "label_smoothing", "cache_reference"),
              ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
               "exo_pair", "aot", "aot_unpaired", "discopop", "sigmoid_norm")),
    Objective("kto", "Kahneman-Tversky Optimization (TRL KTOTrainer): single answers marked desirable or not",
              False, True, ("beta", "loss_type", "desirable_weight", "undesirable_weight", "cache_reference"),
              ("kto", "apo_zero_unpaired")),
    Objective("orpo", "Odds Ratio Preference Optimization (TRL experimental ORPOTrainer): SFT on the chosen answer "
              "plus an odds-ratio penalty on the rejected one; no reference model", True, False, ("beta",)),
    Objective("simpo", "Simple Preference Optimization (TRL experimental CPOTrainer, loss_type simpo): length-"
              "normalised log-probabilities with a margin; no reference model", True, False,
              ("beta", "simpo_gamma", "label_smoothing"), beta=2.0),
)}

PREFERENCE_DEFAULTS = {"loss_type": None, "label_smoothing": 0.0, "desirable_weight": 1.0, "undesirable_weight": 1.0,
                       "simpo_gamma": 0.5, "beta": None, "cache_reference": True}


def option_problems(objective: str, values: dict) -> list[str]:
    """preference.* keys set away from their defaults that `objective` does not read, and bad loss types."""
    o = OBJECTIVES[objective]
    problems = []
    for key, value in sorted(values.items()):
        if value != PREFERENCE_DEFAULTS.get(key) and key not in o.options:
            readers = [n for n, other in OBJECTIVES.items() if key in other.options]
            problems.append(f"preference.{key} does not apply to train.objective={objective!r} (it is read by: "
                            f"{', '.join(readers)}); remove it, or choose one of those objectives")
    loss = values.get("loss_type")
    if loss is not None and o.loss_types and loss not in o.loss_types:
        problems.append(f"preference.loss_type={loss!r} is not one of {objective}'s: {', '.join(o.loss_types)}")
    return problems
