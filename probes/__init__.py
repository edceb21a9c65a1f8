"""Live-training stability probes: signals, alert families, actions and sinks.

    monitor = loopdyn.probes.StabilityMonitor(model, optimizer, on_spike="rollback", alerts_path="alerts.jsonl")

Two alert families: `loop_instability` (the loop will explode at more loops) and the spike
family (`spike_warning` before, `spike` / `nonfinite` when it is here). See
loopdyn.probes.monitor for the signals and the sync cadence, loopdyn.probes.bus / policy /
sinks for the three parts of the monitor, loopdyn.probes.detectors for the detectors and their
defaults, loopdyn.probes.actions for skip / rollback / learning-rate cuts.
Integrations (optional extras): loopdyn.probes.integrations.lightning, loopdyn.probes.integrations.huggingface.
"""
from loopdyn.probes.actions import (ACTIONS, LRCut, ParamGroupLRCut, SchedulerLRCut, SnapshotRing, cut_learning_rate,
                                    drop_gradients)
from loopdyn.probes.alerts import ALERT_FIELDS, KINDS, Alert, InstabilityError
from loopdyn.probes.detectors import (Detector, EarlyWarningDetector, Escalation, LoopInstabilityDetector,
                                      NonFiniteDetector, OptimizerWatch, Precursor, SpikeDetector, TrendDetector)
from loopdyn.probes.history import History, Series
from loopdyn.probes.monitor import MonitorConfig, RunVerdict, StabilityMonitor
from loopdyn.probes.sinks import ConsoleSink, JsonlSink, ListSink, LoggingSink, MetricsSink, Sink, TensorBoardSink

__all__ = [
    "StabilityMonitor", "MonitorConfig", "RunVerdict", "Alert", "ALERT_FIELDS", "KINDS", "InstabilityError",
    "SpikeDetector", "NonFiniteDetector", "TrendDetector", "EarlyWarningDetector", "LoopInstabilityDetector",
    "OptimizerWatch", "Escalation", "Detector", "Precursor",
    "Sink", "ConsoleSink", "LoggingSink", "JsonlSink", "TensorBoardSink", "ListSink", "MetricsSink", "History",
    "Series", "ACTIONS", "SnapshotRing", "LRCut", "ParamGroupLRCut", "SchedulerLRCut", "cut_learning_rate",
    "drop_gradients",
]
