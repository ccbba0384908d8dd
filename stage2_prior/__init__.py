"""Stage two: token-grid datasets and the autoregressive prior."""

from .conditioning import AttributeClasses
from .prior import PREFIX_LENGTH, PRIOR_SIZES, ImageTokenPrior, build_prior
from .sampling import sample_grids
from .token_dataset import (
    TokenDatasetInfo,
    TokenGridDataset,
    load_token_dataset,
    tokenize_dataset,
    tokenizer_fingerprint,
)
from .training import PriorTrainingConfig, train_prior

__all__ = [
    "PREFIX_LENGTH",
    "PRIOR_SIZES",
    "AttributeClasses",
    "ImageTokenPrior",
    "PriorTrainingConfig",
    "TokenDatasetInfo",
    "TokenGridDataset",
    "build_prior",
    "load_token_dataset",
    "sample_grids",
    "tokenize_dataset",
    "tokenizer_fingerprint",
    "train_prior",
]
