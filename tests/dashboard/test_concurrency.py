"""Four tabs analysing at once on two models, against a real waitress server on a free port; the job manager."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import dash
import flask
import torch
import waitress
from dash import Input, Output
from dash.testing.wait import until

import dynalens as dl
from tests.tolerances import assert_close
from dynalens.dashboard import backend
from dynalens.dashboard.app import create_app
from dynalens.dashboard.client import Tab
from dynalens.dashboard.components import ProgressBar
from dynalens.dashboard.jobs import ThreadJobs

MODELS = ("attn2l-induction", "mamba-ar")  # token-id prompts: vocabularies of 64 and 32
TABS = 4
REQUEST, OUT = "concurrency-request", "concurrency-out"


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[str, dash.Dash]]:
    """The dashboard with one more background callback (norms of the tab's prompt), served by waitress."""
    app = create_app(cache_dir=tmp_path / "results")
    bar = ProgressBar("concurrency")
    together = threading.Barrier(TABS, timeout=60)

    @app.callback(Output(OUT, "data"), Input(REQUEST, "data"), bar.key, **backend.background(bar))
    def analyse(request, key):
        if request.get("together"):
            together.wait()  # passes only once all four jobs run at the same time
        model, prompts = backend.model_and_prompts(request)
        with backend.reporting(key) as report:
            report.step("Residual norms", size=1)
            found = backend.page_results(request["model"], model, prompts, [dl.probes.ResidualNorms()], report)
        return {"norms": found["residual_norms"].norms.tolist(), "model": id(model), "computed": found.computed}

    served = waitress.create_server(app.server, host="127.0.0.1", port=0, threads=16)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{served.effective_port}/", app
    served.close()
    served.task_dispatcher.shutdown()


def _prompt(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(str(rng.randrange(32)) for _ in range(12 + seed))


def test_four_tabs_on_two_models_get_their_own_results_at_once(server):
    url, app = server
    asks = [{"model": MODELS[i % 2], "prompt": _prompt(i), "together": True} for i in range(TABS)]

    def tab(i: int, ask: dict) -> dict:
        answer = Tab(url, timeout=120).call(f"{OUT}.data", {(REQUEST, "data"): ask},
                                            {("concurrency-progress-key", "data"): f"tab-{i}"})  # fmt: skip
        assert answer.polls >= 1  # a background job, polled like the page polls it
        assert OUT in answer.outputs, answer
        return answer.outputs[OUT]["data"]

    with ThreadPoolExecutor(TABS) as pool:  # no deadlock: each tab answers within the Tab's timeout
        first = list(pool.map(tab, range(TABS), asks))
    with ThreadPoolExecutor(TABS) as pool:  # again, from the results cache
        again = list(pool.map(tab, range(TABS), [{**ask, "together": False} for ask in asks]))

    for ask, got, cached in zip(asks, first, again):
        model = dl.load(ask["model"])  # the library, on its own copy of the weights
        expected = dl.run(model, dl.Prompts(model, torch.tensor([[int(t) for t in ask["prompt"].split()]])),
                          [dl.probes.ResidualNorms()])["residual_norms"].norms  # fmt: skip
        assert_close(torch.tensor(got["norms"]), expected)
        assert_close(torch.tensor(cached["norms"]), expected)
        assert got["computed"] == ["residual_norms"] and cached["computed"] == []
        # the model a job loaded stays loaded in the server: the next request (any tab) finds it
        assert got["model"] == cached["model"] == id(backend.load_model(ask["model"]))
    assert app._background_manager.running() == 0


def test_a_finished_job_counts_as_running_until_its_result_is_read(tmp_path):
    """Dash reads the result, then asks whether the job runs: a job ending in between must not look cancelled."""
    jobs = ThreadJobs(tmp_path / "jobs")
    release = threading.Event()

    def job_fn(key, progress_key, args, context):
        release.wait(10)
        jobs.handle.set(key, {"answer": args[0]})

    with flask.Flask("jobs-test").app_context():
        job = jobs.call_job_fn("result-key", job_fn, [42], {})
    assert jobs.get_result("result-key", None) is jobs.UNDEFINED and jobs.job_running(str(job))
    release.set()
    until(lambda: jobs.running() == 0, timeout=10)  # the thread ended, its result is not read yet
    assert jobs.job_running(str(job))
    assert jobs.get_result("result-key", str(job)) == {"answer": 42}
    assert not jobs.job_running(str(job)) and not jobs.job_running("no-such-job")
    jobs.terminate_job(str(job))  # a finished job: nothing to stop


def test_a_cancelled_job_stops_at_its_next_report_and_keys_never_repeat(tmp_path):
    jobs = ThreadJobs(tmp_path / "jobs")
    started, reports = threading.Event(), []

    def job_fn(key, progress_key, args, context):
        with backend.reporting("job") as report:
            report.step("Long", size=1000)
            started.set()
            try:
                while True:
                    report.advance(1)
                    reports.append(1)
                    time.sleep(0.01)
            except backend.Cancelled as exc:
                jobs.handle.set(key, str(exc))

    with flask.Flask("jobs-test").app_context():
        job = jobs.call_job_fn("cancel-key", job_fn, [], {})
    started.wait(10)
    jobs.terminate_job(str(job))  # returns once the job stopped
    assert jobs.running() == 0 and "stopped before it finished" in jobs.get_result("cancel-key", str(job))
    assert len({jobs.build_cache_key(job_fn, [1], [], None) for _ in range(3)}) == 3
