"""Metrics sinks (JSON lines, progress bar) behind one interface."""

from imgtrain.monitoring.sinks import JsonlSink, MetricsSink, ProgressBar

__all__ = ["JsonlSink", "MetricsSink", "ProgressBar"]
