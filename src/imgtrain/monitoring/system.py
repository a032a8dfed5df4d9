"""Process, host and GPU readings, taken when Prometheus scrapes (nothing runs between scrapes).

Process CPU and memory and the host's network and disk counters come from psutil. GPU utilization,
memory used and temperature come from NVML through ``nvidia-ml-py`` (the ``gpu`` extra) when it is
importable and the process has a CUDA device; memory reserved by torch's caching allocator comes from
torch. Without a GPU or without NVML no GPU series exist at all (rather than zeros that look like an
idle GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psutil
import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class SystemCollector(Collector):
    def __init__(self, labels: dict[str, str], device: torch.device):
        self.label_names = list(labels)
        self.label_values = list(labels.values())
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # primes psutil's CPU accounting
        self.device = device
        self.nvml = _nvml_handle(device) if device.type == "cuda" else None

    def _gauge(self, name: str, doc: str, value: float, extra: dict[str, str] | None = None):
        extra = extra or {}
        m = GaugeMetricFamily(name, doc, labels=[*self.label_names, *extra])
        m.add_metric([*self.label_values, *extra.values()], value)
        return m

    def _counter(self, name: str, doc: str, value: float):
        m = CounterMetricFamily(name, doc, labels=self.label_names)
        m.add_metric(self.label_values, value)
        return m

    def collect(self) -> Iterator:
        cpu = self.process.cpu_times()
        yield self._counter(
            "imgtrain_process_cpu_seconds",
            "CPU time of this training process (user + system; loader workers not included)",
            cpu.user + cpu.system,
        )
        yield self._gauge(
            "imgtrain_process_resident_memory_bytes",
            "Resident memory of this training process",
            self.process.memory_info().rss,
        )
        net = psutil.net_io_counters()
        if net is not None:
            yield self._counter(
                "imgtrain_host_network_receive_bytes",
                "Bytes received by this host (all interfaces)",
                net.bytes_recv,
            )
            yield self._counter(
                "imgtrain_host_network_transmit_bytes",
                "Bytes sent by this host (all interfaces)",
                net.bytes_sent,
            )
        disk = psutil.disk_io_counters()
        if disk is not None:
            yield self._counter(
                "imgtrain_host_disk_read_bytes", "Bytes read from this host's disks", disk.read_bytes
            )
            yield self._counter(
                "imgtrain_host_disk_written_bytes", "Bytes written to this host's disks", disk.write_bytes
            )
        if self.nvml is not None:
            yield from self._gpu()

    def _gpu(self) -> Iterator:
        import pynvml

        gpu = {"gpu": str(self.device.index)}
        try:
            util = pynvml.nvmlDeviceGetUtilizationRates(self.nvml)
            mem = pynvml.nvmlDeviceGetMemoryInfo(self.nvml)
            temp = pynvml.nvmlDeviceGetTemperature(self.nvml, pynvml.NVML_TEMPERATURE_GPU)
        except pynvml.NVMLError as e:  # a GPU fallen off the bus must not break the scrape
            log.warning("NVML reading failed: %s", e)
            return
        yield self._gauge(
            "imgtrain_gpu_utilization_percent",
            "Percent of time a kernel ran on this process's GPU over NVML's last sample period",
            util.gpu,
            gpu,
        )
        yield self._gauge(
            "imgtrain_gpu_memory_used_bytes",
            "GPU memory in use on the device (all processes, NVML)",
            mem.used,
            gpu,
        )
        yield self._gauge(
            "imgtrain_gpu_memory_reserved_bytes",
            "GPU memory reserved by this process's torch caching allocator",
            torch.cuda.memory_reserved(self.device),
            gpu,
        )
        yield self._gauge("imgtrain_gpu_temperature_celsius", "GPU core temperature", temp, gpu)


def _nvml_handle(device: torch.device):
    try:
        import pynvml
    except ImportError:
        log.info("nvidia-ml-py is not installed (pip install 'imgtrain[gpu]'): no GPU metrics")
        return None
    try:
        pynvml.nvmlInit()
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:  # NVML's indices ignore CUDA_VISIBLE_DEVICES; the UUID does not
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        return pynvml.nvmlDeviceGetHandleByIndex(device.index)
    except pynvml.NVMLError as e:
        log.warning("NVML unavailable (%s): no GPU metrics", e)
        return None
