"""Live-training stability probes: signals, detectors, alerts, actions and sinks.

    monitor = probes.StabilityMonitor(model, optimizer, on_spike="rollback", alerts_path="alerts.jsonl")

See probes.monitor for the signals and the sync cadence, probes.detectors for the
detectors and their defaults, probes.actions for skip / rollback / learning-rate cuts.
Integrations (optional extras): probes.integrations.lightning, probes.integrations.huggingface.
"""
from probes.actions import ACTIONS, SnapshotRing, cut_learning_rate, drop_gradients
from probes.alerts import (ALERT_FIELDS, Alert, ConsoleSink, InstabilityError, JsonlSink, ListSink, Sink,
                           TensorBoardSink)
from probes.detectors import EarlyWarningDetector, NonFiniteDetector, SpikeDetector, TrendDetector
from probes.history import History, Series
from probes.monitor import MonitorConfig, StabilityMonitor

__all__ = [
    "StabilityMonitor", "MonitorConfig", "Alert", "ALERT_FIELDS", "InstabilityError",
    "SpikeDetector", "NonFiniteDetector", "TrendDetector", "EarlyWarningDetector",
    "Sink", "ConsoleSink", "JsonlSink", "TensorBoardSink", "ListSink", "History", "Series",
    "ACTIONS", "SnapshotRing", "cut_learning_rate", "drop_gradients",
]
