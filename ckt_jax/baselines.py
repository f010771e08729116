"""The student objectives compared as baselines, each a set of `config.distill` values.

Every baseline starts from all objective weights at 0 and no text noise, then sets its own terms,
so two baselines differ only in the terms they name:

| baseline | terms |
|---|---|
| sft_lora | cross-entropy on the teacher's replies |
| kd_lora | token-level distillation from the teacher |
| kd_noise | distillation plus consistency under random embedding noise |
| ckt | distillation, InfoNCE to the teacher's representations, relation matching, adversarial consistency and text noise |

All four add L2 on the LoRA weight change. `configs/baselines/<name>.py` runs one of them in the
stages mode; the `baselines` study runs them all as cells of one work directory.
"""

from __future__ import annotations

OBJECTIVE_WEIGHTS = ("kd_weight", "contrastive_weight", "relation_weight", "consistency_weight",
                     "adversarial_weight", "base_kl_weight", "ce_weight", "l2_weight")
TEXT_NOISE_RATES = ("typo_rate", "case_rate", "whitespace_rate")

_OWN_TERMS = {
    "sft_lora": {"ce_weight": 1.0, "l2_weight": 1e-4},
    "kd_lora": {"kd_weight": 1.0, "l2_weight": 1e-4},
    "kd_noise": {"kd_weight": 1.0, "consistency_weight": 0.5, "l2_weight": 1e-4},
    # The random-noise consistency term stays off: the adversarial term plays the same role, and
    # both together would add one more forward and backward pass to every step.
    "ckt": {"kd_weight": 1.0, "contrastive_weight": 0.1, "relation_weight": 1.0,
            "adversarial_weight": 0.5, "l2_weight": 1e-4,
            "text_noise.typo_rate": 0.02, "text_noise.case_rate": 0.02,
            "text_noise.whitespace_rate": 0.02},
}
NAMES = tuple(_OWN_TERMS)


def overrides(name: str) -> dict[str, float]:
    """Return the dotted `config` fields and values of baseline ``name``, every objective field."""
    if name not in _OWN_TERMS:
        raise ValueError(f"baseline {name!r} is unknown; use one of {', '.join(NAMES)}")
    values = {f"distill.{w}": 0.0 for w in OBJECTIVE_WEIGHTS}
    values.update({f"distill.text_noise.{r}": 0.0 for r in TEXT_NOISE_RATES})
    values.update({f"distill.{field}": value for field, value in _OWN_TERMS[name].items()})
    return values


def apply(config, name: str):
    """Set ``config``'s student objective to baseline ``name`` and name the student after it."""
    for dotted, value in overrides(name).items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    config.student_name = name
    return config
