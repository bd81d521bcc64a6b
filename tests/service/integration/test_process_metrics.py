"""The standard process_* series in the /metrics scrape: for the one process, or for the parent and every worker."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from support.configs import config_text
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import Process, free_port, serve

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, watch: LeakWatch) -> Samples:
    """GET the metrics; every sample by name and labels. Fails if a token or secret is in the text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for forbidden in (*watch.tokens, *watch.secrets):
        assert forbidden not in text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def with_metrics(text: str, listen: str) -> str:
    """`text` with a [metrics] table."""
    return f'[metrics]\nlisten = "{listen}"\n{text}'


SERIES = ("process_open_fds", "process_max_fds", "process_resident_memory_bytes", "process_cpu_seconds_total")


class TestProcessSeries:
    """Open fds, memory and CPU of each process serving, as Prometheus's client libraries name them."""

    def test_one_process(self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> None:
        """Without workers, one sample of each series, unlabelled, with this process's own open fds."""
        metrics_port = free_port()
        text = with_metrics(config_text(pki), f"127.0.0.1:{metrics_port}")
        process = serve(text, tmp_path, leak_watch, processes)
        samples = scrape(metrics_port, leak_watch)
        for name in SERIES:
            assert (name, frozenset()) in samples, name
        assert samples[("process_resident_memory_bytes", frozenset())] > 0
        # Within a few of psutil's count: the scrape's own connection comes and goes.
        assert abs(samples[("process_open_fds", frozenset())] - psutil.Process(process.proc.pid).num_fds()) < 5

    def test_workers(self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> None:
        """With --workers 2 the parent's scrape has each series for itself and both workers, by pid."""
        port, metrics_port = free_port(), free_port()
        text = with_metrics(config_text(pki, listen=f"127.0.0.1:{port}"), f"127.0.0.1:{metrics_port}")
        process = serve(text, tmp_path, leak_watch, processes, workers=2)
        parent = psutil.Process(process.proc.pid)
        # The spawned workers, not multiprocessing's resource tracker beside them.
        workers = [child for child in parent.children() if "spawn_main" in " ".join(child.cmdline())]
        pids = {str(parent.pid), *(str(child.pid) for child in workers)}
        assert len(pids) == 3
        samples = scrape(metrics_port, leak_watch)
        for name in SERIES:
            labelled = {dict(labels)["pid"] for (sample, labels) in samples if sample == name}
            assert labelled == pids, name
