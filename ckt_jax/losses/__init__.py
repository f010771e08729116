"""Loss terms of the ckt_jax objective, each a pure function usable outside the trainer.

Per-position terms return `B x L` values; reduce them with a mask from `reductions`.
"""

from ckt_jax.losses.adversarial import (
        adversarial_perturbation,
        freelb_average_loss,
        project_to_ball,
)
from ckt_jax.losses.chunked import chunked_vocab_map
from ckt_jax.losses.contrastive import (
        CONTRASTIVE_HEAD,
        ProjectionHead,
        apply_projection_head,
        info_nce,
        init_projection_head,
        pool_hidden,
        relation_matching,
        supervised_contrastive,
)
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
from ckt_jax.losses.regularization import kl_to_base, l2_penalty, lora_delta_penalty
from ckt_jax.losses.robustness import (
        consistency_loss,
        length_scaled_noise,
        teacher_consistency_loss,
)
from ckt_jax.losses.sparse import sparse_forward_kl, teacher_tail_log_mass, teacher_top_k
from ckt_jax.losses.supervised import next_token_cross_entropy

__all__ = [
        "DIVERGENCES", "forward_kl", "generalized_jsd", "reverse_kl", "skew_kl", "symmetric_kl",
        "total_variation", "next_token_mask", "per_batch_mean", "per_sequence_mean", "per_token_mean",
        "l2_penalty", "lora_delta_penalty", "consistency_loss", "length_scaled_noise", "next_token_cross_entropy",
        "adversarial_perturbation", "freelb_average_loss", "project_to_ball",
        "CONTRASTIVE_HEAD", "ProjectionHead", "apply_projection_head", "info_nce",
        "init_projection_head", "pool_hidden", "relation_matching", "supervised_contrastive",
        "kl_to_base", "teacher_consistency_loss", "sparse_forward_kl", "teacher_top_k",
        "teacher_tail_log_mass", "chunked_vocab_map",
]
