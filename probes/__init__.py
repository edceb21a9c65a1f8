"""Live-training stability probes: signals, detectors, alerts, actions and sinks.

    monitor = loopdyn.probes.StabilityMonitor(model, optimizer, on_spike="rollback", alerts_path="alerts.jsonl")

See loopdyn.probes.monitor for the signals and the sync cadence, loopdyn.probes.detectors for the
detectors and their defaults, loopdyn.probes.actions for skip / rollback / learning-rate cuts.
Integrations (optional extras): loopdyn.probes.integrations.lightning, loopdyn.probes.integrations.huggingface.
"""
from loopdyn.probes.actions import ACTIONS, SnapshotRing, cut_learning_rate, drop_gradients
from loopdyn.probes.alerts import (ALERT_FIELDS, Alert, ConsoleSink, InstabilityError, JsonlSink, ListSink, Sink,
                           TensorBoardSink)
from loopdyn.probes.detectors import EarlyWarningDetector, NonFiniteDetector, SpikeDetector, TrendDetector
from loopdyn.probes.history import History, Series
from loopdyn.probes.monitor import MonitorConfig, StabilityMonitor

__all__ = [
    "StabilityMonitor", "MonitorConfig", "Alert", "ALERT_FIELDS", "InstabilityError",
    "SpikeDetector", "NonFiniteDetector", "TrendDetector", "EarlyWarningDetector",
    "Sink", "ConsoleSink", "JsonlSink", "TensorBoardSink", "ListSink", "History", "Series",
    "ACTIONS", "SnapshotRing", "cut_learning_rate", "drop_gradients",
]
