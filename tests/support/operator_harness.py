"""Runs `phasesplit operator` as a real process against the Kubernetes emulator."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import kubernetes

from phasesplit.operator.kube import Kube


def kube_client(url: str) -> Kube:
    config = kubernetes.client.Configuration()
    config.host = url
    return Kube(kubernetes.client.ApiClient(config))


def start_operator(kubeconfig: pathlib.Path, log: pathlib.Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "phasesplit.cli", "operator", "-A", "--standalone",
                                 "--verbose", *extra], env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_operator(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


