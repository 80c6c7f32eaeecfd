"""The trainer: learning, determinism, resume, checkpoint series, architectures, CLI."""

import json
from types import SimpleNamespace

import pytest
import torch

import dynalens as dl
from dynalens.models.io import read_json
from dynalens.models.tasks import HMMTask, InductionTask
from dynalens.models.train import (
    TRAIN_STATE_DIR,
    build_model,
    checkpoint_steps,
    cosine_lr_factor,
    head_weight_norms,
    logits_of,
    loss_drop_step,
    main,
    train,
)
from dynalens.models.zoo import checkpoints, training_curve
from tests.tolerances import assert_close

HMM = HMMTask(n_states=2, d_vocab=3, seq_len=16)
FAST = {"batch_size": 16, "warmup": 5, "eval_size": 32, "progress": False}


def lstm(seed: int = 0):
    return build_model("lstm-1l", HMM, seed=seed, d_model=12)


class Interrupted(Exception):
    pass


class InterruptAfter:
    """The task, but raises once ``n`` training batches have been drawn."""

    def __init__(self, task, n, batch_size):
        self.task, self.n, self.batch_size = task, n, batch_size

    def sample(self, batch, generator):
        if batch == self.batch_size:
            if self.n == 0:
                raise Interrupted
            self.n -= 1
        return self.task.sample(batch, generator)

    def __getattr__(self, name):
        return getattr(self.task, name)


def test_loss_decreases_with_adamw_and_sgd():
    for optimizer, lr in (("adamw", 1e-2), ("sgd", 0.3)):
        result = train(lstm(), HMM, 80, lr=lr, optimizer=optimizer, n_checkpoints=3, **FAST)
        assert len(result.loss) == 80 == len(result.lr)
        first, last = sum(result.loss[:10]) / 10, sum(result.loss[-10:]) / 10
        assert last < first - 0.05, (optimizer, first, last)
        assert result.checkpoints[-1]["eval_loss"] < result.checkpoints[0]["eval_loss"]


def test_same_seed_same_losses_other_seed_other_losses():
    a = train(lstm(), HMM, 15, seed=1, n_checkpoints=3, **FAST)
    b = train(lstm(), HMM, 15, seed=1, n_checkpoints=3, **FAST)
    c = train(lstm(), HMM, 15, seed=2, n_checkpoints=3, **FAST)
    assert a.loss == b.loss and a.checkpoints == b.checkpoints
    assert a.loss != c.loss


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    whole_model = lstm()
    whole = train(whole_model, HMM, 30, out=tmp_path / "whole", n_checkpoints=5, **FAST)
    assert checkpoint_steps(30, 5) == [0, 1, 3, 10, 30]
    with pytest.raises(Interrupted):  # dies at step 23, after the checkpoint at step 10
        train(lstm(), InterruptAfter(HMM, 22, 16), 30, out=tmp_path / "cut", n_checkpoints=5, **FAST)
    assert read_json(tmp_path / "cut" / TRAIN_STATE_DIR / "state.json")["step"] == 10
    resumed_model = lstm(seed=99)  # its weights are replaced by the saved ones
    resumed = train(resumed_model, HMM, 30, out=tmp_path / "cut", n_checkpoints=5, resume=True, **FAST)
    assert resumed.loss == whole.loss
    assert resumed.checkpoints == whole.checkpoints
    for (name, w), (_, r) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(w, r), name


def test_checkpoint_series_is_written_and_loadable(tmp_path):
    model = lstm()
    result = train(model, HMM, 40, out=tmp_path, n_checkpoints=6, **FAST)
    steps = checkpoint_steps(40, 6)
    assert steps[0] == 0 and steps[-1] == 40 and len(steps) == 6
    assert [s for s, _ in checkpoints(tmp_path)] == steps
    curve = training_curve(tmp_path)
    assert curve["steps"] == list(range(1, 41)) and len(curve["loss"]) == 40
    assert [c["step"] for c in curve["checkpoints"]] == steps
    assert curve["config"]["seed"] == 0 and curve["config"]["task"] == "hmm"
    tokens = HMM.sample(4, torch.Generator().manual_seed(7)).tokens
    with torch.no_grad():
        expected = model(tokens)
    final = dl.load(tmp_path)
    assert type(final).__name__ == "HookedRNN"
    assert_close(final(tokens), expected)
    last = dl.load(checkpoints(tmp_path)[-1][1])
    assert_close(last(tokens), expected)
    first = dl.load(checkpoints(tmp_path)[0][1])
    assert not torch.allclose(first(tokens), expected, atol=1e-3)
    assert result.final_accuracy == curve["checkpoints"][-1]["eval_accuracy"]


def test_attention_only_gpt2_keeps_exactly_zero_mlps(tmp_path):
    from transformers import GPT2LMHeadModel

    task = InductionTask(d_vocab=12, half_len=4)
    model = build_model("attn-only-2l", task, d_model=16, n_heads=2)
    train(model, task, 10, out=tmp_path, n_checkpoints=3, **FAST)
    tokens = task.sample(3, torch.Generator().manual_seed(1)).tokens
    for block in model.transformer.h:
        assert not block.mlp.c_proj.weight.any() and not block.mlp.c_proj.bias.any()
        x = torch.randn(3, 9, 16)
        assert torch.equal(block.mlp(x), torch.zeros_like(x))
    assert block.attn.c_attn.weight.requires_grad  # attention trains
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits)


def test_attention_only_llama_keeps_exactly_zero_mlps(tmp_path):
    from transformers import LlamaForCausalLM

    task = InductionTask(d_vocab=12, half_len=4, min_len=2)
    model = build_model("attn-only-2l-rope", task, d_model=16, n_heads=2)
    train(model, task, 10, out=tmp_path, n_checkpoints=3, **FAST)
    tokens = task.sample(3, torch.Generator().manual_seed(1)).tokens
    for layer in model.model.layers:
        assert not layer.mlp.down_proj.weight.any() and not layer.mlp.down_proj.weight.requires_grad
        x = torch.randn(3, 9, 16)
        assert torch.equal(layer.mlp(x), torch.zeros_like(x))
    assert layer.self_attn.q_proj.weight.requires_grad  # attention trains
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits)


def test_head_weight_norms_known_answer_with_grouped_kv_heads():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=8, hidden_size=8, intermediate_size=4, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            proj.weight.zero_()
        attn.q_proj.weight[2 * 1 + 1, 5] = 3.0  # query head 1
        attn.o_proj.weight[7, 2 * 1] = 4.0  # output of head 1
        attn.k_proj.weight[2 * 1, 0] = 12.0  # key head 1: read by query heads 2 and 3
        attn.v_proj.weight[2 * 1 + 1, 3] = 5.0
    norms = head_weight_norms(model)
    torch.testing.assert_close(norms, torch.tensor([[0.0, 5.0, 13.0, 13.0]]))
    with pytest.raises(TypeError, match="q/k/v/o_proj"):
        head_weight_norms(build_model("attn-only-2l", InductionTask(d_vocab=12, half_len=4), d_model=16))


def test_head_sparsity_shrinks_heads_from_its_first_step():
    task = InductionTask(d_vocab=12, half_len=4, min_len=2)
    runs = {}
    for weight in (0.0, 1.0):
        model = build_model("attn-only-2l-rope", task, d_model=16, n_heads=2)
        result = train(model, task, 30, lr=3e-3, head_sparsity=weight, head_sparsity_from=10, **FAST)
        runs[weight] = result.loss, head_weight_norms(model).detach()
    print({w: norms for w, (_, norms) in runs.items()})
    assert runs[0.0][0][:10] == runs[1.0][0][:10]  # the penalty is off before step 10
    assert runs[0.0][0][10:] != runs[1.0][0][10:]
    assert (runs[1.0][1] < 0.5 * runs[0.0][1]).all()
    with pytest.raises(ValueError, match="head_sparsity"):
        train(model, task, 2, head_sparsity=-1.0, **FAST)
    gpt2 = build_model("attn-only-2l", task, d_model=16)
    before = [p.clone() for p in gpt2.parameters()]
    with pytest.raises(TypeError, match="q/k/v/o_proj"):  # before any step, not at head_sparsity_from
        train(gpt2, task, 20, head_sparsity=1.0, head_sparsity_from=10, **FAST)
    assert all(torch.equal(a, b) for a, b in zip(before, gpt2.parameters()))


def test_cli_passes_the_head_penalty(tmp_path):
    args = ["--task", "induction", "--arch", "attn-only-2l-rope", "--steps", "2", "--out", str(tmp_path)]
    assert main([*args, "--head-sparsity", "0.5", "--head-sparsity-from", "1", "--no-progress"]) == 0
    config = json.loads((tmp_path / "training_curve.json").read_text())["config"]
    assert config["head_sparsity"] == 0.5 and config["head_sparsity_from"] == 1


def test_schedule_and_checkpoint_steps():
    assert cosine_lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert cosine_lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert cosine_lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert cosine_lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert_close(cosine_lr_factor(100, 100, 10), 0.0, dtype=torch.float64)
    steps = checkpoint_steps(3000, 20)
    assert len(steps) == 20 and steps == sorted(set(steps)) and steps[-1] == 3000
    ratios = [b / a for a, b in zip(steps[8:], steps[9:])]
    assert max(ratios) / min(ratios) < 1.05  # log-spaced once rounding stops mattering
    assert checkpoint_steps(3, 20) == [0, 1, 2, 3]


def test_loss_drop_step_on_a_known_curve():
    steps = [0, 1, 2, 4, 8, 16, 32, 64]
    losses = [4.0, 4.1, 4.1, 4.0, 3.9, 1.0, 0.2, 0.1]
    assert loss_drop_step(steps, losses) == 16
    with pytest.raises(ValueError, match="no drop"):
        loss_drop_step(steps, [4.0] * 8)


def test_logits_of_and_argument_errors():
    t = torch.zeros(1, 2, 3)
    assert logits_of(t) is t and logits_of(SimpleNamespace(logits=t)) is t and logits_of((t, None)) is t
    with pytest.raises(TypeError, match="logits"):
        logits_of({"x": t})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train(lstm(), HMM, 2, optimizer="adam", **FAST)
    with pytest.raises(ValueError, match="resume=True needs out"):
        train(lstm(), HMM, 2, resume=True, **FAST)
    with pytest.raises(KeyError, match="accepted: attn-only-2l"):
        build_model("transformer", HMM)


def test_cli_trains_and_writes_a_run(tmp_path, capsys):
    assert main(["--task", "hmm", "--arch", "gru-1l", "--steps", "3", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    curve = json.loads((tmp_path / "training_curve.json").read_text())
    assert curve["config"]["steps"] == 3 and (tmp_path / "config.json").exists()
    assert type(dl.load(tmp_path)).__name__ == "HookedRNN"
