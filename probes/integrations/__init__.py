"""Adapters for training frameworks (optional extras; import the submodule you need):

    probes.integrations.lightning     StabilityCallback (pytorch_lightning; extra "lightning")
    probes.integrations.huggingface   StabilityTrainerCallback (transformers; extra "hf")
"""
