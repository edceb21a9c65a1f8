"""Detectors: turn a stream of (step, signal, value) into alerts. Host-side, cheap, resumable.

One interface (torchmetrics' `Metric`, see `base.Detector`): `update(step, signal, value)`,
`compute(step)`, `forward` = both; thresholds are documented constructor arguments.

    module          detector                    finds
    spike           SpikeDetector               one value far above the recent level (mad | ema | ratio)
                    NonFiniteDetector           NaN or ±Inf, at once, critical
    trend           TrendDetector               a positive signal that keeps growing (Theil–Sen, Kendall τ)
    optimizer       OptimizerWatch              learning-rate jumps and ramps, optimiser setting changes
    early_warning   EarlyWarningDetector        the precursors of a loss spike fused into `spike_warning`
    loop            LoopInstabilityDetector     the loop will explode at more loops: `loop_instability`
    base            Detector, Precursor, Escalation (report again while the evidence worsens)
"""
from loopdyn.probes.detectors.base import MAD_TO_SIGMA, Detector, Escalation, Precursor, theil_sen
from loopdyn.probes.detectors.early_warning import EarlyWarningDetector
from loopdyn.probes.detectors.loop import LoopInstabilityDetector
from loopdyn.probes.detectors.optimizer import OptimizerWatch
from loopdyn.probes.detectors.spike import NonFiniteDetector, SpikeDetector
from loopdyn.probes.detectors.trend import TrendDetector

__all__ = ["Detector", "Precursor", "Escalation", "SpikeDetector", "NonFiniteDetector", "TrendDetector",
           "OptimizerWatch", "EarlyWarningDetector", "LoopInstabilityDetector", "MAD_TO_SIGMA", "theil_sen"]
