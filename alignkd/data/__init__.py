"""Text and labelled data -> tokenised tensors: packed LM blocks, padded classification batches.

Data flows one way: a source (:mod:`~alignkd.data.sources`: text file, folder,
JSONL, CSV, a saved or hub ``datasets`` dataset) -> documents -> token ids ->
fixed-size tensors (:mod:`~alignkd.data.lm`, :mod:`~alignkd.data.classification`).
A big LM corpus is read incrementally (:mod:`~alignkd.data.files`) and tokenised
once into a memory-mapped token file (:mod:`~alignkd.data.tokens`) whose blocks
are read on demand (:mod:`~alignkd.data.blocks`). A resumable sampler hands out
example indices (:mod:`~alignkd.data.sampler`).
Every problem with the input raises :class:`DataError` with a one-line message
that says what to fix.
"""

from alignkd.data.blocks import Blocks
from alignkd.data.classification import ClassificationData, build_classification_data
from alignkd.data.lm import (
    BOS_SETTINGS,
    LMData,
    build_lm_data,
    pack,
    resolve_bos,
    tokenize_texts,
    wants_bos,
)
from alignkd.data.sampler import BlockSampler, split_indices
from alignkd.data.sources import (
    EVAL_SPLIT,
    FILE_SUFFIXES,
    iter_pieces,
    read_labelled,
    read_texts,
)
from alignkd.errors import DataError

__all__ = [
    "BOS_SETTINGS",
    "EVAL_SPLIT",
    "FILE_SUFFIXES",
    "BlockSampler",
    "Blocks",
    "ClassificationData",
    "DataError",
    "LMData",
    "build_classification_data",
    "build_lm_data",
    "iter_pieces",
    "pack",
    "read_labelled",
    "read_texts",
    "resolve_bos",
    "split_indices",
    "tokenize_texts",
    "wants_bos",
]
