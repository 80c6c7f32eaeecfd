"""The shipped zoo: each model loads by name and reaches its stated accuracy on held-out data."""

import pytest
import torch

import dynalens as dl
from dynalens.models.io import read_safetensors
from dynalens.models.tasks import InductionTask
from dynalens.models.train import logits_of, loss_drop_step
from dynalens.models.zoo import ZOO, ZOO_DIR, checkpoints, get_entry, training_curve
from dynalens.models.zoo_build import RECIPES, build

# Neither the training seed (0) nor the trainer's held-out seed (1_000_003).
HELD_OUT_SEED = 2024
CLASSES = {
    "transformer": "HookedTransformerBridge",
    "mamba": "HookedMamba",
    "mamba2": "HookedMamba2",
    "hybrid": "HookedHybrid",
    "rnn": "HookedRNN",
}


def held_out_accuracy(model, entry, n: int = 256) -> float:
    task = entry.make_task()
    batch = task.sample(n, torch.Generator().manual_seed(HELD_OUT_SEED))
    with torch.no_grad():
        return task.accuracy(logits_of(model(batch.tokens)), batch)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_loads_by_name_and_reaches_its_accuracy(name):
    entry = ZOO[name]
    model = dl.load(name)
    assert type(model).__name__ == CLASSES[entry.architecture]
    assert held_out_accuracy(model, entry) >= entry.accuracy_target
    curve = training_curve(name)
    assert curve["config"]["task"] == entry.task
    assert [s for s, _ in checkpoints(name)] == [c["step"] for c in curve["checkpoints"]]
    assert not (entry.path / "train_state").exists()  # resume state is not shipped


def test_attn2l_induction_checkpoints_show_the_loss_phase_change():
    """Detector: ``loss_drop_step`` (first checkpoint below the plateau/final midpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    task = get_entry("attn2l-induction").make_task()
    assert isinstance(task, InductionTask)
    batch = task.sample(256, torch.Generator().manual_seed(HELD_OUT_SEED))
    series = checkpoints("attn2l-induction")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(series[0][1])).eval()
    steps, losses = [], []
    for step, folder in series:  # same config throughout: swap the weights in
        model.load_state_dict(read_safetensors(folder / "model.safetensors"))
        with torch.no_grad():
            logits = model(batch.tokens).logits
        steps.append(step)
        losses.append(task.scored_loss(logits, batch).item())
    drop = loss_drop_step(steps, losses)
    assert steps[0] < drop < steps[-1]
    before = losses[steps.index(drop) - 1]
    assert before > 0.9 * max(losses)  # still on the plateau one checkpoint earlier: a jump, not a slope
    assert max(losses) > 3.5 and losses[-1] < 0.1  # from chance (ln 63) to solved


@pytest.mark.parametrize("name", ["mamba2-ar", "hybrid-ar"])
def test_recall_emerges_over_the_checkpoint_series(name):
    """Each shipped checkpoint's held-out recall accuracy, recomputed: near chance at step 0, solved at the end."""
    entry = get_entry(name)
    series = checkpoints(name)
    assert len(series) >= 6 and series[0][0] == 0 and series[-1][0] == RECIPES[name].steps
    accuracy = [held_out_accuracy(dl.load(folder), entry) for _, folder in series]
    assert accuracy[0] < 0.2 and accuracy[-1] >= entry.accuracy_target
    assert max(accuracy[: len(accuracy) // 2]) < 0.9  # the series shows the rise, not only the solved model
    recorded = [c["eval_accuracy"] for c in training_curve(name)["checkpoints"]]
    assert accuracy == pytest.approx(recorded, abs=0.1)  # another held-out draw, the same curve


def test_zoo_is_small_and_shipped_in_the_wheel_globs():
    files = [p for p in ZOO_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    # pyproject's package-data globs: zoo/*/*.json, zoo/*/*.safetensors, zoo/*/checkpoints/*/*
    for p in files:
        rel = p.relative_to(ZOO_DIR).parts
        shipped = (len(rel) == 2 and p.suffix in (".json", ".safetensors")) or (
            len(rel) == 4 and rel[1] == "checkpoints"
        )
        assert shipped, f"{p} would not be installed"


def test_unknown_zoo_name_lists_the_zoo():
    with pytest.raises(KeyError, match="attn2l-induction"):
        get_entry("attn2-induction")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_rebuild_reproduces_the_shipped_model(name, tmp_path):
    result = build(name, tmp_path, progress=False)
    shipped = training_curve(name)
    assert result.final_accuracy >= ZOO[name].accuracy_target
    assert result.final_accuracy == pytest.approx(shipped["checkpoints"][-1]["eval_accuracy"], abs=0.02)
    assert len(result.loss) == RECIPES[name].steps
    assert held_out_accuracy(dl.load(tmp_path / name), ZOO[name]) >= ZOO[name].accuracy_target
