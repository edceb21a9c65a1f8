"""Looped and fixed-depth language models, injections, configs and checkpoints (torch only)."""
from models.checkpoint import CheckpointInfo, load, save
from models.config import PRESETS, LoopConfig
from models.errors import CheckpointError, ConfigError, InputError
from models.injection import LinearPart, Operator
from models.looped import LMOutput, LoopContext, LoopedLM, value_embedding_layout

__all__ = [
    "LoopConfig", "PRESETS", "LoopedLM", "LoopContext", "LMOutput", "LinearPart", "Operator",
    "save", "load", "CheckpointInfo", "InputError", "ConfigError", "CheckpointError",
    "value_embedding_layout",
]
