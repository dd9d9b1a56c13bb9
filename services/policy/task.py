"""Reach-around-an-obstacle: a 2-D task with a bimodal scripted expert, vectorised in numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OBS_DIM = 7  # agent xy, goal xy, obstacle centre xy, obstacle radius
ACT_DIM = 2  # absolute target position of the agent
STEP = 0.05  # expert path length per step
MAX_MOVE = 0.08  # the agent moves at most this far towards a target per step
GOAL_TOL = 0.06
MAX_STEPS = 96


@dataclass(slots=True)
class Scenes:
    """A batch of task instances: start, goal, obstacle centre and radius."""

    start: np.ndarray  # (B, 2)
    goal: np.ndarray  # (B, 2)
    centre: np.ndarray  # (B, 2)
    radius: np.ndarray  # (B,)


def sample_scenes(n: int, rng: np.random.Generator) -> Scenes:
    start = np.stack([rng.uniform(-0.3, 0.3, n), rng.uniform(-1.0, -0.8, n)], 1)
    goal = np.stack([rng.uniform(-0.3, 0.3, n), rng.uniform(0.8, 1.0, n)], 1)
    mid = (start + goal) / 2
    centre = mid + np.stack([rng.uniform(-0.1, 0.1, n), rng.uniform(-0.1, 0.1, n)], 1)
    return Scenes(start, goal, centre, rng.uniform(0.25, 0.33, n))


def seg_hits_disk(a: np.ndarray, b: np.ndarray, c: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Whether segment a→b (rows) passes within r of c: the closest point on the segment to c."""
    d = b - a
    denom = np.maximum((d * d).sum(-1), 1e-12)
    t = np.clip(((c - a) * d).sum(-1) / denom, 0.0, 1.0)
    p = a + t[..., None] * d
    return np.linalg.norm(p - c, axis=-1) < r


def expert_path(scene: Scenes, i: int, side: int) -> np.ndarray:
    """Positions p_0..p_N of the expert going round the obstacle on `side` (+1 right, -1 left)."""
    c, r = scene.centre[i], scene.radius[i]
    off = r + 0.12
    way = [scene.start[i], c + [side * off, -0.7 * r], c + [side * off, 0.7 * r], scene.goal[i]]
    pts = [way[0]]
    for a, b in zip(way[:-1], way[1:], strict=True):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / STEP)))
        pts.extend(a + (b - a) * k / n for k in range(1, n + 1))
    return np.asarray(pts)


def observe(prev: np.ndarray, pos: np.ndarray, scene: Scenes) -> np.ndarray:
    """Observation history (B, 2, OBS_DIM): previous and current agent position with the scene."""
    fixed = np.concatenate([scene.goal, scene.centre, scene.radius[:, None]], 1)
    return np.stack([np.concatenate([prev, fixed], 1), np.concatenate([pos, fixed], 1)], 1).astype(np.float32)


def demonstrations(n_episodes: int, horizon: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Expert (obs (N, 2, OBS_DIM), actions (N, horizon, 2)) pairs; each episode picks a side at random."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n_episodes, rng)
    obs, act = [], []
    for i in range(n_episodes):
        path = expert_path(scenes, i, int(rng.choice([-1, 1])))
        padded = np.concatenate([path, np.repeat(path[-1:], horizon, 0)])
        one = Scenes(scenes.start[i:i + 1], scenes.goal[i:i + 1], scenes.centre[i:i + 1], scenes.radius[i:i + 1])
        for t in range(len(path)):
            obs.append(observe(path[max(t - 1, 0)][None], path[t][None], one)[0])
            act.append(padded[t + 1:t + 1 + horizon])
    return np.asarray(obs, np.float32), np.asarray(act, np.float32)


class Env:
    """B task instances stepped together; success = reach the goal without touching the obstacle."""

    def __init__(self, scenes: Scenes) -> None:
        self.scenes = scenes
        self.pos = scenes.start.copy()
        self.prev = scenes.start.copy()
        n = len(scenes.radius)
        self.crashed = np.zeros(n, bool)
        self.reached = np.zeros(n, bool)
        self.steps = 0

    def obs(self) -> np.ndarray:
        return observe(self.prev, self.pos, self.scenes)

    @property
    def done(self) -> np.ndarray:
        return self.crashed | self.reached | (self.steps >= MAX_STEPS)

    def step(self, target: np.ndarray) -> None:
        live = ~(self.crashed | self.reached)
        move = target - self.pos
        norm = np.linalg.norm(move, axis=1, keepdims=True)
        move = move * np.minimum(1.0, MAX_MOVE / np.maximum(norm, 1e-9))
        new = np.where(live[:, None], self.pos + move, self.pos)
        hit = seg_hits_disk(self.pos, new, self.scenes.centre, self.scenes.radius)
        self.crashed |= live & hit
        self.prev, self.pos = self.pos, new
        self.reached |= live & ~hit & (np.linalg.norm(new - self.scenes.goal, axis=1) < GOAL_TOL)
        self.steps += 1

    @property
    def success(self) -> np.ndarray:
        return self.reached & ~self.crashed
