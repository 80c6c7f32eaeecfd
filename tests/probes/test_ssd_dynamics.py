"""The SSD limit system: its velocity against the kernels, its regime criterion against simulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dynalens.kernels import ssd_mixer_matrix
from dynalens.models import names
from dynalens.probes.ssd_dynamics import SSDSystem
from dynalens.probes.token_dynamics import SelectiveSystem, psd_bc_rows, simulate_tokens


def _random(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def random_ssd(n_systems: int, heads: int, head_dim: int, groups: int, n: int, seed: int) -> SSDSystem:
    """Random SSD layers, ``B`` and ``C`` rows independent (``mu_g`` neither symmetric nor definite)."""
    g = torch.Generator().manual_seed(seed)
    dim = heads * head_dim
    return SSDSystem(
        S_B=_random(n_systems, groups, n, dim, g=g), S_C=_random(n_systems, groups, n, dim, g=g),
        S_delta=_random(n_systems, heads, dim, g=g) / dim**0.5, delta_bias=_random(n_systems, heads, g=g),
        A=-(0.5 + 1.5 * torch.rand(n_systems, heads, generator=g, dtype=torch.float64)),
    )  # fmt: skip


def definite_ssd(n_systems: int, heads: int, head_dim: int, seed: int) -> SSDSystem:
    """One group, ``mu = ± U^T diag(e^s) U`` (the paper's reparametrisation, sign flipped at random): definite,
    condition number below 2, so a token's Euclidean norm tracks ``|x^T mu x|``."""
    g = torch.Generator().manual_seed(seed)
    base = random_ssd(n_systems, heads, head_dim, 1, heads * head_dim, seed)
    dim = heads * head_dim
    S_B, S_C = [], []
    for _ in range(n_systems):
        U = torch.linalg.qr(_random(dim, dim, g=g)).Q
        rows = psd_bc_rows(U, 0.3 * torch.rand(dim, generator=g, dtype=torch.float64))
        sign = 1.0 if torch.rand(1, generator=g) < 0.5 else -1.0
        S_B.append(rows[0])
        S_C.append(sign * rows[1])
    return SSDSystem(torch.stack(S_B)[:, None], torch.stack(S_C)[:, None], base.S_delta, base.delta_bias, base.A)


def random_tokens(n_systems: int, pos: int, dim: int, seed: int) -> torch.Tensor:
    """Tokens of random direction and norm in ``[0.5, 2]``."""
    g = torch.Generator().manual_seed(seed)
    x = _random(n_systems, pos, dim, g=g)
    return x / x.norm(dim=-1, keepdim=True) * (0.5 + 1.5 * torch.rand(n_systems, pos, 1, generator=g, dtype=torch.float64))


def test_velocity_is_the_ssd_mixer_matrix_applied_to_the_tokens():
    system, x = random_ssd(3, 4, 2, 2, 3, seed=0), random_tokens(3, 7, 8, seed=1)
    velocity = system.velocity(x)
    for s in range(3):
        delta = F.softplus(x[s] @ system.S_delta[s].T + system.delta_bias[s])[None]  # [1, pos, head]
        B, C = (torch.einsum("ld,gnd->lgn", x[s], S[s])[None] for S in (system.S_B, system.S_C))
        M = ssd_mixer_matrix(delta, system.A[s], B, C)[0]  # [head, pos, pos]
        expected = torch.einsum("hts,shp->thp", M, x[s].reshape(7, 4, 2)).reshape(7, 8)
        torch.testing.assert_close(velocity[s], expected, rtol=1e-10, atol=1e-12)


def test_one_channel_heads_are_s6_layers_with_one_decay_per_channel():
    # P = 1: every channel is a head with its own step size and one decay for all
    # states, which is the paper's S6 assumption A_d = -a_d I; the two systems agree.
    ssd, x = random_ssd(2, 5, 1, 1, 3, seed=2), random_tokens(2, 6, 5, seed=3)
    s6 = SelectiveSystem(
        S_B=ssd.S_B[:, 0], S_C=ssd.S_C[:, 0], S_delta=ssd.S_delta, delta_bias=ssd.delta_bias,
        A=ssd.A[..., None].expand(2, 5, 3).clone(),
    )  # fmt: skip
    torch.testing.assert_close(ssd.velocity(x), s6.velocity(x), rtol=1e-10, atol=1e-12)
    assert ssd.regimes() == s6.regimes()


def test_first_token_heads_move_radially_with_their_groups_quadratic_form():
    system, x = random_ssd(2, 4, 3, 2, 5, seed=4), random_tokens(2, 3, 12, seed=5)
    first = system.velocity(x)[:, 0].reshape(2, 4, 3)
    x1 = x[:, 0]
    q = torch.einsum("sd,sgde,se->sg", x1, system.mu, x1)  # [system, group]
    delta = F.softplus(torch.einsum("sd,shd->sh", x1, system.S_delta) + system.delta_bias)
    expected = q.repeat_interleave(2, dim=1)[..., None] * delta[..., None] * x1.reshape(2, 4, 3)
    torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-12)


def test_quadratic_form_of_a_symmetric_single_head_layer_never_decreases_along_any_token():
    # d/dt x_l^T mu x_l = 2 sum_j Delta_j E_lj (x_l^T mu x_j)^2: one scalar weight per head
    # makes it a sum of squares, for every token, whatever the spectrum of a symmetric mu.
    base, x = random_ssd(20, 1, 4, 1, 4, seed=6), random_tokens(20, 6, 4, seed=7)
    sym = SSDSystem(base.S_B, base.S_B * base.S_C[..., :1].sign(), base.S_delta, base.delta_bias, base.A)  # diag(±1) S_B
    mu = sym.mu[:, 0]
    torch.testing.assert_close(mu, mu.transpose(1, 2))
    assert (torch.linalg.eigvalsh(mu)[:, 0] < 0).any() and (torch.linalg.eigvalsh(mu)[:, -1] > 0).any()
    rate = 2 * torch.einsum("sld,sde,sle->sl", x, mu, sym.velocity(x))
    assert (rate >= -1e-12).all()
    assert (rate > 1e-9).mean(dtype=torch.float64) > 0.9


@pytest.mark.parametrize("heads, head_dim", [(1, 3), (2, 2)], ids=["one-head", "two-heads"])
def test_definite_layers_make_every_token_converge_or_diverge_as_the_criterion_says(heads, head_dim):
    # One head: a theorem (x^T mu x is a Lyapunov function). Two heads of one group:
    # the heads rescale unequally, and the criterion still agrees in simulation.
    system = definite_ssd(30, heads, head_dim, seed=8)
    regimes = system.regimes()
    assert set(regimes) == {"convergent", "divergent"}
    flow = simulate_tokens(system, random_tokens(30, 4, heads * head_dim, seed=9))
    expected = torch.tensor([1.0 if r == "divergent" else -1.0 for r in regimes], dtype=torch.float64)
    assert (flow.outcome == expected[:, None]).all(), "every token is decided, as its layer's regime says"


def test_first_token_of_a_single_head_layer_follows_the_sign_of_its_form_whatever_the_spectrum():
    system, x0 = random_ssd(40, 1, 3, 1, 3, seed=10), random_tokens(40, 3, 3, seed=11)
    predicted = system.first_token_regimes(x0[:, 0])
    assert set(predicted) == {"convergent", "divergent"}
    flow = simulate_tokens(system, x0)
    expected = torch.tensor([1.0 if r == "divergent" else -1.0 for r in predicted], dtype=torch.float64)
    assert (flow.outcome[:, 0] == expected).all()
    with pytest.raises(ValueError, match="one group"):
        random_ssd(1, 2, 2, 2, 3, seed=0).first_token_regimes(torch.ones(1, 4))


@pytest.mark.parametrize("model_name, layer", [("tiny_mamba2", 1), ("tiny_hybrid", 2)])
def test_mixer_system_maps_the_scan_input_to_the_layers_B_C_and_step_size(model_name, layer, request):
    model = request.getfixturevalue(model_name)
    mixer = model.blocks[layer].mixer
    cfg = mixer.cfg
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(12))
    _, cache = model.run_with_cache(ids, names_filter=[names.mixer(layer, "in_proj")])
    _, x, B, C, dt = cache[names.mixer(layer, "in_proj")].double().split(
        [cfg.d_inner, cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_groups * cfg.d_state, cfg.n_heads], dim=-1
    )  # the parts before the convolution: what the idealised layer reads
    system = SSDSystem.from_mixer(mixer)
    assert system.dim == cfg.d_inner and system.n_heads == cfg.n_heads
    torch.testing.assert_close(torch.einsum("bld,gnd->blgn", x, system.S_B[0]).flatten(2), B, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.einsum("bld,gnd->blgn", x, system.S_C[0]).flatten(2), C, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x @ system.S_delta[0].T, dt, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(system.A[0], mixer.A.double())


def test_ssd_system_rejects_bad_shapes_and_non_negative_decay():
    base = random_ssd(1, 2, 2, 1, 3, seed=0)
    with pytest.raises(ValueError, match="A must be negative"):
        SSDSystem(base.S_B, base.S_C, base.S_delta, base.delta_bias, -base.A)
    with pytest.raises(ValueError, match="groups \\(1\\) must divide heads \\(3\\)"):
        SSDSystem(base.S_B, base.S_C, torch.zeros(1, 3, 4, dtype=torch.float64), torch.zeros(1, 3), -torch.ones(1, 3))
    with pytest.raises(ValueError, match="x0 must have shape"):
        simulate_tokens(base, torch.ones(1, 2, 3))
