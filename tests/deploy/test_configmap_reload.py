"""A ConfigMap edit reaches a running server: the kubelet's ..data symlink swap meets synctoken's file watcher.

The config file is `synctoken.toml -> ..data/synctoken.toml`, and the kubelet
updates it by renaming a new `..data` symlink over the old one: the file's
own path never changes and is never written. synctoken's watcher stats each
file through its symlinks (filestamps.py), so the swap shows as a new inode.
"""

from __future__ import annotations

import os
from pathlib import Path

from support.atomicwriter import AtomicWriter
from support.configs import POLICY_TOML, SECRET_ENV, config_text
from support.constants import CHAT_ADMIN_ID
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import Process, free_port


def test_configmap_swap_reloads(pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> None:
    """After an atomic swap with one caller fewer, the server reloads from the file watcher with the new policy."""
    volume = AtomicWriter(tmp_path / "config")
    text = config_text(pki, listen=f"127.0.0.1:{free_port()}")
    volume.write({"synctoken.toml": text.encode()})
    # serve() writes a file of its own: this one reads the volume's symlink, as in the pod.
    config = volume.directory / "synctoken.toml"
    process = Process(["serve", "--config", str(config)], tmp_path, leak_watch, os.environ | SECRET_ENV)
    processes.append(process)
    [started] = process.wait_for_records("server.started")
    assert started["callers"] == 3
    first_data = (volume.directory / "..data").resolve()

    admin_entry = POLICY_TOML[POLICY_TOML.index(f'[[callers]]\nid = "{CHAT_ADMIN_ID}"') :]
    volume.write({"synctoken.toml": text.replace(admin_entry, "").encode()})
    assert (volume.directory / "..data").resolve() != first_data
    assert not first_data.exists(), "the old folder is gone, as the kubelet leaves it"

    [reloaded] = process.wait_for_records("config.reloaded")
    assert (reloaded["trigger"], reloaded["callers"]) == ("file", 2)
    assert not [r for r in process.records() if r["event"] == "config.reload_failed"]
