"""Loss terms of the ckt_jax objective, each a pure function usable outside the trainer.

Per-position terms return `B x L` values; reduce them with a mask from `reductions`.
"""

from ckt_jax.losses.divergences import (
        DIVERGENCES,
        forward_kl,
        generalized_jsd,
        reverse_kl,
        skew_kl,
        symmetric_kl,
        total_variation,
)
from ckt_jax.losses.reductions import (
        next_token_mask,
        per_batch_mean,
        per_sequence_mean,
        per_token_mean,
)
from ckt_jax.losses.regularization import l2_penalty, lora_delta_penalty
from ckt_jax.losses.robustness import consistency_loss, length_scaled_noise
from ckt_jax.losses.supervised import next_token_cross_entropy

__all__ = [
        "DIVERGENCES", "forward_kl", "generalized_jsd", "reverse_kl", "skew_kl", "symmetric_kl",
        "total_variation", "next_token_mask", "per_batch_mean", "per_sequence_mean", "per_token_mean",
        "l2_penalty", "lora_delta_penalty", "consistency_loss", "length_scaled_noise", "next_token_cross_entropy",
]
