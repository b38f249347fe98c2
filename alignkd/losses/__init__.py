"""The distillation loss library: pure functions over tensors.

No model objects, hooks or config here: each function takes student and teacher
tensors (and a bool mask over positions) and returns a float32 scalar
(``lm_head_kl_ce``: two, the KL and the cross-entropy of one walk over the head).
"""

from alignkd.losses.attention import attention_kl, relation_kl
from alignkd.losses.features import hidden_cosine, hidden_mse, hidden_standardized_mse, info_nce
from alignkd.losses.lm_head import lm_head_ce, lm_head_kl, lm_head_kl_ce, lm_head_sparse_kl
from alignkd.losses.logits import KL_KINDS, dkd, kl_div, kl_rows
from alignkd.losses.sparse import sparse_kl

__all__ = [
    "KL_KINDS",
    "attention_kl",
    "dkd",
    "hidden_cosine",
    "hidden_mse",
    "hidden_standardized_mse",
    "info_nce",
    "kl_div",
    "kl_rows",
    "lm_head_ce",
    "lm_head_kl",
    "lm_head_kl_ce",
    "lm_head_sparse_kl",
    "relation_kl",
    "sparse_kl",
]
