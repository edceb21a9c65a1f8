"""Adapters for training frameworks (optional extras; import the submodule you need):

    loopdyn.probes.integrations.lightning     StabilityCallback (pytorch_lightning; extra "lightning")
    loopdyn.probes.integrations.huggingface   StabilityTrainerCallback (transformers; extra "hf")
"""
