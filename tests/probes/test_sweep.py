"""Sweeps on a local Ray the tests start (2 workers): stored Results, failures, resume after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import ray
import torch

import dynalens as dl
from dynalens.models import HookedMamba, HookedRNN, MambaConfig, RNNConfig
from dynalens.probes.sweep import STATUS_FAILED, STATUS_OK, Sweep, read_sweep_file, sweep

pytestmark = pytest.mark.xdist_group("ray")  # one local Ray at a time

PROMPTS = {"short": [[1, 2, 3], [4, 5]], "long": [[7, 8, 9, 10, 11, 12]]}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep_models")
    torch.manual_seed(0)
    HookedMamba(MambaConfig(d_model=16, n_layers=2, d_vocab=50, d_state=4)).save_pretrained(root / "mamba")
    HookedRNN(RNNConfig(d_model=8, n_layers=2, d_vocab=50, cell="gru")).save_pretrained(root / "rnn")
    return {"mamba": root / "mamba", "rnn": root / "rnn", "llama": tiny_llama_dir}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _analyses():
    return {"lens": dl.probes.LogitLens(k=3), "sinks": dl.probes.SinkScores()}


def test_ray_sweep_stores_each_cell_as_run_alone(local_ray, model_dirs, tmp_path):
    store = sweep(_analyses(), models=model_dirs, prompts=PROMPTS, store=tmp_path, progress=False)
    frame = store.frame()
    assert len(frame) == 3 * 2 * 2
    assert frame.groupby(["model", "prompts", "analysis"]).size().max() == 1
    failed = frame[frame["status"] == STATUS_FAILED]
    # SinkScores reads attention patterns: it fails on the Mamba and the RNN, and is recorded.
    assert sorted(set(zip(failed["model"], failed["analysis"]))) == [("mamba", "sinks"), ("rnn", "sinks")]
    assert all("attention" in e for e in failed["error"])
    assert (frame[frame["status"] == STATUS_OK]["seconds"] > 0).all()
    for label, folder in model_dirs.items():
        model = dl.load(folder)
        for set_label, prompts in PROMPTS.items():
            for a_label, analysis in _analyses().items():
                if a_label == "sinks" and label != "llama":
                    continue
                alone = analysis(model, prompts)
                stored = store.results(label, set_label, a_label)
                pd_alone, pd_stored = alone.to_frame(), stored.to_frame()
                assert list(pd_alone.columns) == list(pd_stored.columns)
                for column in pd_alone.columns:
                    if pd_alone[column].dtype.kind == "f":
                        assert (pd_alone[column] - pd_stored[column]).abs().max() <= 1e-5
                    else:
                        assert pd_alone[column].tolist() == pd_stored[column].tolist()


def test_in_process_sweep_equals_ray_and_resume_skips(local_ray, model_dirs, tmp_path):
    analyses = {"lens": dl.probes.LogitLens(k=3)}
    here = sweep(analyses, models=model_dirs, prompts=PROMPTS, store=tmp_path / "a", ray=False, progress=False)
    on_ray = sweep(analyses, models=model_dirs, prompts=PROMPTS, store=tmp_path / "b", progress=False)
    for label in model_dirs:
        a = here.results(label, "long").to_frame()
        b = on_ray.results(label, "long").to_frame()
        assert (a["prob"] - b["prob"]).abs().max() <= 1e-5
    rows = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "cells").iterdir()}
    sweep(analyses, models=model_dirs, prompts=PROMPTS, store=tmp_path / "a", ray=False, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "cells").iterdir()} == rows


def test_a_new_ray_after_shutdown_gets_new_workers(local_ray, model_dirs, tmp_path):
    """The driver's worker pool belongs to one Ray: after ``ray.shutdown()`` and ``ray.init()`` a sweep still runs."""
    one = {"rnn": model_dirs["rnn"]}
    analyses = {"lens": dl.probes.LogitLens(k=3)}
    first = sweep(analyses, models=one, prompts=PROMPTS, store=tmp_path / "a", progress=False)
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    second = sweep(analyses, models=one, prompts=PROMPTS, store=tmp_path / "b", progress=False)
    assert (second.frame()["status"] == STATUS_OK).all() and len(second.frame()) == 2
    a, b = first.results("rnn", "long").to_frame(), second.results("rnn", "long").to_frame()
    assert (a["prob"] - b["prob"]).abs().max() <= 1e-5


DRIVER = textwrap.dedent(
    """
    import sys
    import dynalens as dl
    from dynalens.probes.sweep import sweep
    models = {f"m{i}": sys.argv[2] for i in range(int(sys.argv[3]))}
    sweep({"lens": dl.probes.LogitLens(k=3), "norms": dl.probes.ResidualNorms()},
          models=models, prompts={"a": [[1, 2, 3]], "b": [[4, 5, 6, 7]]}, store=sys.argv[1],
          workers=2, progress=False)
    """
)


def test_resume_after_driver_killed(model_dirs, tmp_path):
    """kill -9 of the driver part-way: the re-run finishes, keeps finished cells, writes none twice or half."""
    store, n_models = tmp_path / "store", 8
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-P", "-c", DRIVER, str(store), str(model_dirs["mamba"]), str(n_models)]
    driver = subprocess.Popen(args, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list((store / "cells").glob("*.parquet"))) < 3:
            assert driver.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (store / "cells").glob("*.parquet")}
    assert 3 <= len(done_before) < n_models * 4, "kill the driver part-way"
    rerun = subprocess.run(args, env=env, timeout=300, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    frame = Sweep(store).frame()
    assert len(frame) == n_models * 4 and (frame["status"] == STATUS_OK).all()
    after = {p.name: p.stat().st_mtime_ns for p in (store / "cells").glob("*.parquet")}
    assert all(after[name] == mtime for name, mtime in done_before.items())  # finished cells kept
    assert not list(store.rglob("*.tmp"))  # nothing half-written left behind
    for row in frame.itertuples():
        assert Sweep(store).results(row.model, row.prompts, row.analysis).prompts is not None


def test_sweep_file(tmp_path, model_dirs):
    (tmp_path / "sweep.toml").write_text(
        textwrap.dedent(
            f"""
            store = "out"
            models = ["{model_dirs['mamba']}"]
            [prompts]
            a = [[1, 2, 3]]
            [[analyses]]
            type = "LogitLens"
            params = {{ k = 2 }}
            """
        )
    )
    spec = read_sweep_file(tmp_path / "sweep.toml")
    assert spec["store"] == str(tmp_path / "out")
    assert repr(spec["analyses"]["logit_lens"]) == "LogitLens(k=2)"
    store = sweep(**spec, ray=False, progress=False)
    assert store.results("mamba", "a").params == {"k": 2}
    (tmp_path / "bad.toml").write_text('store = "x"\n[[analyses]]\ntype = "os.system"\n')
    with pytest.raises(ValueError, match="missing"):
        read_sweep_file(tmp_path / "bad.toml")


def test_cli_sweep_resume(tmp_path, model_dirs):
    from dynalens.cli import main

    (tmp_path / "s.toml").write_text(
        f'store = "out"\nmodels = ["{model_dirs["rnn"]}"]\n[prompts]\na = [[1, 2, 3]]\n'
        '[[analyses]]\ntype = "ResidualNorms"\n'
    )
    assert main(["sweep", str(tmp_path / "s.toml"), "--local"]) == 0
    assert len(Sweep(tmp_path / "out").frame()) == 1
    assert main(["sweep", str(tmp_path / "s.toml"), "--local"]) == 2  # the store has finished cells
    assert main(["sweep", str(tmp_path / "s.toml"), "--local", "--resume"]) == 0
