"""Progress reports of long dashboard callbacks: fractions, clean-up, and counting what the model reads."""

from __future__ import annotations

import threading

import pytest
import torch
from dynalens.dashboard import backend
from dynalens.dashboard.components import progress_view

import dynalens as dl


def test_steps_and_units_make_the_fraction_and_the_report_is_removed_at_the_end():
    with backend.reporting("tab-1", steps=2) as report:
        assert backend.read_progress("tab-1") is None  # nothing before the first step
        report.step("Reading prompts", size=4)
        report.advance(1)
        assert backend.read_progress("tab-1") == backend.Progress(0.25, 2, "Reading prompts (step 1 of 2)")
        report.advance(10)  # more than the step's size stays within the step
        assert backend.read_progress("tab-1").value == 1.0
        report.step("Generating")  # size unknown: the step counts as not started
        report.advance(3, label="Generating token 3")
        assert backend.read_progress("tab-1") == backend.Progress(1.0, 2, "Generating token 3 (step 2 of 2)")
        assert backend.read_progress("tab-2") is None  # another tab sees nothing of it
    assert backend.read_progress("tab-1") is None


def test_a_failing_job_leaves_no_report_and_no_key_reports_nowhere():
    with pytest.raises(RuntimeError, match="boom"):
        with backend.reporting("tab-3") as report:
            report.step("Checkpoints", size=3)
            raise RuntimeError("boom")
    assert backend.read_progress("tab-3") is None
    with backend.reporting(None) as report:
        report.step("Anything", size=1)
        assert backend.read_progress(None) is None
    with pytest.raises(ValueError, match="steps must be at least 1"):
        backend.ProgressReport("tab-4", steps=0)


def test_a_superseded_run_ending_late_leaves_the_next_runs_report():
    with backend.reporting("tab-7") as new:
        with backend.reporting("tab-7") as old:
            old.step("Old run", size=2)
            new.step("New run", size=2)  # the page's next run reports under the same key
        assert backend.read_progress("tab-7").label == "New run"  # the old run ended late: not removed
    assert backend.read_progress("tab-7") is None


def test_counting_sequences_counts_each_sequence_read_and_removes_its_hooks():
    model = dl.load("attn2l-induction")
    tokens = dl.circuits.repeated_tokens(model, half_len=8, n_sequences=3)
    seen: list[float] = []
    with backend.reporting("tab-5") as report:
        report.step("Reading", size=6)
        tick = report.advance

        def advance(units: float = 1.0, label: str | None = None) -> None:
            tick(units, label)
            seen.append(backend.read_progress("tab-5").value)

        report.advance = advance
        logits = backend.counting_sequences(model, report, lambda: model(tokens))()
        first = len(seen)
        generated = backend.counting_sequences(
            model, report, lambda: model.generate(tokens[:1, :5], max_new_tokens=3, return_type="tokens")
        )()  # fmt: skip
    # 3 sequences, a half after each of the 2 blocks; then 3 generated tokens, one pass each
    assert seen[:first] == pytest.approx([0.25, 0.5])
    assert seen[first:] == pytest.approx([7 / 12, 8 / 12, 9 / 12, 10 / 12, 11 / 12, 1.0])
    torch.testing.assert_close(logits, model(tokens))  # counting changes nothing the model computes
    torch.testing.assert_close(generated, model.generate(tokens[:1, :5], max_new_tokens=3, return_type="tokens"))
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_reports_from_another_thread_are_read_whole():
    """The poll reads from another request thread than the one that reports."""
    values = []
    with backend.reporting("tab-6") as report:
        report.step("Ticks", size=1000)
        worker = threading.Thread(target=lambda: [report.advance(1) for _ in range(1000)])
        worker.start()
        while worker.is_alive():
            found = backend.read_progress("tab-6")
            values.append(found.value)
            assert found.steps == 1 and found.label == "Ticks"
        worker.join()
        assert backend.read_progress("tab-6").value == 1.0
    assert values == sorted(values)


def test_the_view_is_indeterminate_until_the_first_step():
    bar, label = progress_view(None)
    assert bar.to_plotly_json()["props"].get("value") is None and label.children == "Starting…"
    bar, label = progress_view(backend.Progress(1.5, 4, "Generating (step 2 of 4)"))
    assert (bar.value, bar.max) == ("1.5000", "4")
    assert label.children == "Generating (step 2 of 4): 38%"


@pytest.mark.parametrize("mamba", [False, True])
def test_head_scores_read_what_the_heads_page_counts(mamba, tiny_mamba_dir):
    """The Heads page sizes its step as one unit per sequence: HeadScores reads one forward (Mamba too)."""
    model = dl.load(tiny_mamba_dir if mamba else "attn2l-induction")
    tokens = dl.circuits.repeated_tokens(model, half_len=6, n_sequences=2)
    with backend.reporting("tab-8") as report:
        report.step("Scores", size=1000)
        backend.counting_sequences(model, report, lambda: dl.circuits.HeadScores()(model, tokens))()
        assert backend.read_progress("tab-8").value * 1000 == pytest.approx(2)


# ------------------------------------------------------------------ cancel
def test_a_stopped_job_raises_cancelled_at_its_next_report_even_from_a_hook_thread():
    stop = threading.Event()
    with backend.stoppable(stop), backend.reporting("tab-9") as report:
        report.step("Working", size=2)
        report.advance(1)
        stop.set()
        with pytest.raises(backend.Cancelled, match="stopped before it finished"):
            report.advance(1)
        raised = []

        def tick() -> None:  # a hook ticking from another thread sees the report's job
            try:
                report.advance(1)
            except backend.Cancelled as exc:
                raised.append(exc)

        worker = threading.Thread(target=tick)
        worker.start()
        worker.join()
        assert len(raised) == 1 and isinstance(raised[0], backend.DashboardError)
    with backend.reporting("tab-9") as outside:  # outside the job nothing stops
        outside.step("Working", size=1)
        outside.advance(1)


def test_a_cancelled_forward_stops_and_removes_its_hooks():
    model = dl.load("attn2l-induction")
    tokens = dl.circuits.repeated_tokens(model, half_len=8, n_sequences=2)
    stop = threading.Event()
    with backend.stoppable(stop), backend.reporting("tab-10") as report:
        report.step("Reading", size=2)
        stop.set()
        with pytest.raises(backend.Cancelled):
            backend.counting_sequences(model, report, lambda: model(tokens))()
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_a_job_waiting_for_the_models_stops_waiting_when_cancelled():
    """Another tab's analysis holds the models; the cancelled job leaves the queue within a poll."""
    holding, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=lambda: backend.run_alone(lambda: (holding.set(), release.wait(10))))
    holder.start()
    holding.wait(10)
    stop, outcome = threading.Event(), []

    def waiter() -> None:
        with backend.stoppable(stop):
            try:
                outcome.append(backend.run_alone(lambda: "ran"))
            except backend.Cancelled:
                outcome.append("cancelled")

    job = threading.Thread(target=waiter)
    job.start()
    job.join(0.3)
    assert job.is_alive() and outcome == []  # waiting its turn
    stop.set()
    job.join(5)
    release.set()
    holder.join(5)
    assert outcome == ["cancelled"]
    assert backend.run_alone(lambda: "free") == "free"  # the lock was not left held
