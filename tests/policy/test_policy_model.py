"""The denoiser's masks, the noise schedules, the task and the checkpoint format."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from services.contracts.errors import InvalidArgument
from services.policy import checkpoint, task
from services.policy.model import Denoiser, DenoiserConfig
from services.policy.sampler import Normalizer
from services.policy.schedule import alphas_cumprod, cosine_betas, ddim, ddpm


def model() -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(DenoiserConfig(n_layer=2, n_emb=32, n_head=2)).eval()


def test_causal_masks_like_diffusion_policy() -> None:
    m = model()
    x, obs, t = torch.randn(1, 16, 2), torch.randn(1, 2, 7), torch.tensor([10])
    with torch.no_grad():
        ref = m(x, t, obs)
        x2 = x.clone()
        x2[:, 9:] += 1.0  # later actions cannot reach earlier outputs through self-attention
        out = m(x2, t, obs)
        assert torch.equal(out[:, :9], ref[:, :9]) and not torch.allclose(out[:, 9:], ref[:, 9:])
        obs2 = obs.clone()
        obs2[:, 1] += 1.0  # memory token s is visible from action t >= s - 1: action 0 sees only obs 0
        out = m(x, t, obs2)
        assert torch.equal(out[:, 0], ref[:, 0]) and not torch.allclose(out[:, 1:], ref[:, 1:])


def test_cosine_schedule() -> None:
    betas = cosine_betas(100)
    abar = alphas_cumprod(100)
    assert betas.max() <= 0.999 and np.all(np.diff(abar) < 0)
    assert abar[0] > 0.999 and abar[-1] < 1e-3


@pytest.mark.parametrize("sampler", [ddpm(), ddim(10), ddim(20)], ids=["ddpm100", "ddim10", "ddim20"])
def test_sampler_with_oracle_eps_recovers_x0(sampler) -> None:
    """Feeding the true ε of a known x0 must land on x0: checks every coefficient of the update."""
    abar = alphas_cumprod(100)
    x0 = torch.rand(4, 16, 2, dtype=torch.float64) * 1.6 - 0.8
    x = torch.randn(4, 16, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(sampler.timesteps):
        eps = (x - math.sqrt(abar[t]) * x0) / math.sqrt(1 - abar[t])
        x = sampler.step(eps, i, x, torch.randn(x.shape, generator=g, dtype=torch.float64))
    assert torch.allclose(x, x0, atol=1e-6)


def test_expert_is_bimodal_and_safe() -> None:
    scenes = task.sample_scenes(40, np.random.default_rng(0))
    for side in (-1, 1):
        env = task.Env(scenes)
        paths = [task.expert_path(scenes, i, side) for i in range(40)]
        xs = []
        while not env.done.all():
            env.step(np.stack([p[min(env.steps + 1, len(p) - 1)] for p in paths]))
            xs.append(env.pos[:, 0] - scenes.centre[:, 0])
        assert env.success.all()
        assert (np.max(np.asarray(xs) * side, 0) > 0.3).all()  # passes the obstacle on `side`
    # averaging the two modes (what a regression policy would learn) drives into the obstacle
    env = task.Env(scenes)
    left = [task.expert_path(scenes, i, -1) for i in range(40)]
    right = [task.expert_path(scenes, i, 1) for i in range(40)]
    while not env.done.all():
        k = env.steps + 1
        env.step(np.stack([(a[min(k, len(a) - 1)] + b[min(k, len(b) - 1)]) / 2 for a, b in zip(left, right, strict=True)]))
    assert env.crashed.mean() > 0.9


def test_demonstrations_shapes() -> None:
    obs, act = task.demonstrations(3, 16, seed=1)
    assert obs.shape[1:] == (2, task.OBS_DIM) and act.shape[1:] == (16, task.ACT_DIM) and len(obs) == len(act)


def test_checkpoint_roundtrip_and_hash(tmp_path) -> None:
    m = model()
    obs, act = task.demonstrations(3, 16)
    norm = Normalizer.fit(obs, act)
    checkpoint.save(m, norm, tmp_path)
    loaded, norm2, meta = checkpoint.load(tmp_path)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float())
    assert np.allclose(norm2.act(act), norm.act(act)) and np.abs(norm.act(act)).max() <= 1 + 1e-6
    meta["sha256"] = "0" * 64
    (tmp_path / checkpoint.CONFIG).write_text(json.dumps(meta))
    with pytest.raises(InvalidArgument, match="sha256"):
        checkpoint.load(tmp_path)
    with pytest.raises(InvalidArgument, match="checkpoint"):
        checkpoint.load(tmp_path / "missing")


def test_own_safetensors_writer_reads_back(tmp_path) -> None:
    from safetensors.torch import load_file

    state = {k: v.half().contiguous() for k, v in model().state_dict().items()}
    checkpoint._write_safetensors(state, tmp_path / "w.safetensors")
    back = load_file(str(tmp_path / "w.safetensors"))
    mine = checkpoint._read_safetensors(tmp_path / "w.safetensors")
    assert all(torch.equal(back[k], v) and torch.equal(mine[k], v) for k, v in state.items())


def test_committed_checkpoint_loads() -> None:
    if not (checkpoint.DEFAULT_DIR / checkpoint.CONFIG).exists():
        pytest.skip("no committed checkpoint yet")
    m, _, meta = checkpoint.load()
    assert meta["sha256"] == checkpoint.sha256(checkpoint.DEFAULT_DIR / checkpoint.WEIGHTS)
    assert sum(p.numel() for p in m.parameters()) > 100_000
