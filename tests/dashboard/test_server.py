"""``dynalens dashboard`` serves with waitress: no development server, background jobs answered."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import requests
import torch

import dynalens as dl
from tests.tolerances import assert_close
from dynalens.dashboard.app import create_app
from dynalens.dashboard.client import Tab

MODEL = "attn2l-induction"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _array(value: dict | list) -> torch.Tensor:
    """A figure array as JSON holds it: a list, or plotly's typed array (base64 ``bdata``, ``dtype``, ``shape``)."""
    if isinstance(value, list):
        return torch.tensor(value, dtype=torch.float32)
    flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return torch.from_numpy(flat.reshape([int(n) for n in value["shape"].split(",")]).astype(np.float32))


def test_the_command_serves_the_dashboard_with_waitress_and_runs_its_jobs(tmp_path):
    create_app(cache_dir=tmp_path / "here")  # registers the pages in this process, to read their ids
    from dynalens.dashboard.pages import heads

    port, log = _free_port(), tmp_path / "server.log"
    env = {**os.environ, "DYNALENS_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "dynalens.cli", "dashboard", "--port", str(port), "--model", MODEL,
             "--threads", "4"], stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 180
        while True:
            try:
                page = requests.get(url, timeout=10)
                break
            except requests.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert page.status_code == 200 and page.headers["Server"] == "dynalens"  # waitress, named
        request = {"model": MODEL, "prompt": "1 2 3", "run": 1}
        answer = Tab(url, timeout=120).call(
            f"{heads.GRID}.figure", {(heads.PAGE.request_id, "data"): request, (heads.KIND, "value"): "induction"},
            {(heads.SCORES_PROGRESS.key_id, "data"): "tab"},
        )  # fmt: skip
        assert answer.polls >= 1  # the scores ran as a background job
        model = dl.load(MODEL)
        expected = dl.circuits.HeadScores()(model, heads.workload(model)).induction
        drawn = _array(answer.outputs[heads.GRID]["figure"]["data"][0]["z"])
        assert_close(drawn, expected.reshape(drawn.shape).float())
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    text = log.read_text()
    assert f"http://127.0.0.1:{port}/" in text
    assert "development server" not in text and "Traceback" not in text
