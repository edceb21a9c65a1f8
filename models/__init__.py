"""Looped and fixed-depth language models, injections, configs and checkpoints (torch only)."""
from loopdyn.models.checkpoint import CheckpointInfo, load, save
from loopdyn.models.config import INJECTIONS, PRESETS, LoopConfig
from loopdyn.models.errors import CheckpointError, ConfigError, InputError
from loopdyn.models.hooks import in_analysis, silenced
from loopdyn.models.kernels import fast_paths, under_transform
from loopdyn.models.operator import DenseOperator, DiagonalOperator, IdentityOperator, Operator, as_operator
from loopdyn.models.protocol import (LinearPart, LoopAdapter, LoopedModel, ProtocolError, Sublayer,
                                    find_looped_model, validate)
from loopdyn.models.looped import LMOutput, LoopContext, LoopedLM, value_embedding_layout
from loopdyn.models.sizes import count_params

__all__ = [
    "LoopConfig", "PRESETS", "LoopedLM", "LoopContext", "LMOutput", "LinearPart", "Operator",
    "save", "load", "CheckpointInfo", "InputError", "ConfigError", "CheckpointError",
    "value_embedding_layout", "LoopedModel", "LoopAdapter", "Sublayer", "ProtocolError", "validate",
    "find_looped_model", "IdentityOperator", "DiagonalOperator", "DenseOperator", "as_operator",
    "fast_paths", "under_transform", "silenced", "in_analysis", "count_params", "INJECTIONS",
]
