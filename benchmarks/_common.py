"""What every benchmark script shares: the device name, the git revision that ran, and writing a
JSON report keyed by device and versions without dropping other machines' results."""

from __future__ import annotations

import json
import os
import platform
import subprocess

import torch

import ciuic


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo followed by "(CPU)"."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + " (CPU)"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + " (CPU)"


def result_key(device: str = "cpu") -> str:
    return f"{device_name(device)} | torch {torch.__version__} | ciuic {ciuic.__version__}"


def git_revision() -> str | None:
    """The commit of the ciuic source that ran (``+dirty`` with local changes), if in git."""
    where = os.path.dirname(os.path.abspath(ciuic.__file__))
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", ".."], capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def write_json(path: str, key: str, report: dict) -> None:
    """Store ``report`` under ``key`` in ``path``, keeping results of other devices/versions."""
    data: dict = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
    data[key] = report
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
