"""Task families for meta-RL: 2D point navigation (the MAML paper's) and multi-armed bandits.

Two faces of each family:

* **gymnasium environments** (``Nav2DEnv``, ``BanditEnv``): one task, the standard
  ``reset(seed=…) -> (obs, info)`` / ``step(action) -> (obs, reward, terminated, truncated, info)``
  API, so they plug into any gymnasium tooling — and any user's gymnasium env plugs into metalab
  through :class:`GymTaskFamily`;
* **vectorised families** (``Nav2DTasks``, ``BanditTasks``): ``T`` tasks × ``N`` episodes stepped
  as one tensor operation, which is what meta-training runs on.

Both compute the same dynamics and rewards (a test checks that rollouts match step for step).
Every family has a fixed horizon and exposes::

    sample_tasks(n, generator) -> tasks [n, task_dim]
    reset(tasks [T, task_dim], episodes N, generator) -> obs [T, N, obs_dim]
    step(actions [T, N, act_dim] or [T, N]) -> (obs [T, N, obs_dim], reward [T, N])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from metalab.errors import ConfigError, require_extra

require_extra("gymnasium", "Meta-RL (metalab.rl)")
import gymnasium as gym  # noqa: E402  (after the check, so a missing extra is one clear sentence)
from gymnasium import spaces  # noqa: E402


@dataclass(frozen=True)
class ActionSpec:
    kind: str  #: 'box' (continuous, Gaussian policy) or 'discrete' (categorical policy)
    size: int  #: action dimensions (box) or number of actions (discrete)
    low: float = -np.inf
    high: float = np.inf


# ---- 2D navigation -----------------------------------------------------------------------------

class Nav2DEnv(gym.Env):
    """A point starts at the origin and moves by its action (clipped to ±``max_step`` per axis);
    reward = −distance to the task's goal after the move; ``horizon`` steps, no early end."""

    metadata = {"render_modes": []}

    def __init__(self, goal=(0.3, -0.2), horizon: int = 100, max_step: float = 0.1) -> None:
        self.goal = np.asarray(goal, dtype=np.float32)
        self.horizon, self.max_step = horizon, max_step
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-max_step, max_step, shape=(2,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "goal" in options:
            self.goal = np.asarray(options["goal"], dtype=np.float32)
        self.pos, self.t = np.zeros(2, dtype=np.float32), 0
        return self.pos.copy(), {"goal": self.goal.copy()}

    def step(self, action):
        self.pos = (self.pos + np.clip(np.asarray(action, dtype=np.float32), -self.max_step, self.max_step)).astype(np.float32)
        self.t += 1
        reward = -float(np.linalg.norm(self.pos - self.goal))
        return self.pos.copy(), reward, False, self.t >= self.horizon, {}


class Nav2DTasks:
    """Vectorised 2D navigation; a task is a goal drawn uniformly from ``[-goal_range, goal_range]²``."""

    name, obs_dim, task_dim = "nav2d", 2, 2

    def __init__(self, horizon: int = 100, max_step: float = 0.1, goal_range: float = 0.5) -> None:
        self.horizon, self.max_step, self.goal_range = horizon, max_step, goal_range
        self.action = ActionSpec("box", 2, -max_step, max_step)

    def sample_tasks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return (torch.rand(n, 2, generator=generator) * 2 - 1) * self.goal_range

    def reset(self, tasks: torch.Tensor, episodes: int, generator: torch.Generator | None = None) -> torch.Tensor:
        self.goals = tasks[:, None, :].float()
        self.pos = torch.zeros(tasks.shape[0], episodes, 2)
        return self.pos.clone()

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.pos = self.pos + actions.clamp(-self.max_step, self.max_step)
        return self.pos.clone(), -(self.pos - self.goals).norm(dim=-1)

    def make_env(self, task: torch.Tensor) -> Nav2DEnv:
        return Nav2DEnv(task.tolist(), self.horizon, self.max_step)


# ---- bandits -----------------------------------------------------------------------------------

class BanditEnv(gym.Env):
    """A ``K``-armed Bernoulli bandit played for ``horizon`` pulls; the observation is a constant."""

    metadata = {"render_modes": []}

    def __init__(self, probs=(0.5, 0.9, 0.1, 0.1, 0.1), horizon: int = 10) -> None:
        self.probs = np.asarray(probs, dtype=np.float64)
        self.horizon = horizon
        self.observation_space = spaces.Box(1.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = spaces.Discrete(len(self.probs))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return np.ones(1, dtype=np.float32), {"probs": self.probs.copy()}

    def step(self, action):
        self.t += 1
        reward = float(self.np_random.random() < self.probs[int(action)])
        return np.ones(1, dtype=np.float32), reward, False, self.t >= self.horizon, {}


class BanditTasks:
    """Vectorised Bernoulli bandits with structure to learn: arm 0 is *safe* (pays with probability
    ``safe``) in every task; one of the other arms, drawn per task, is *good* (``good``) and the
    rest are poor (``poor``). Averaged over tasks every risky arm pays less than the safe one, so a
    policy trained on all tasks at once settles on the safe arm; a learner that explores the risky
    arms and adapts to what it sees earns more — which meta-learning can discover."""

    name, obs_dim = "bandit", 1

    def __init__(self, arms: int = 5, horizon: int = 10, safe: float = 0.5, good: float = 0.9, poor: float = 0.1) -> None:
        if arms < 3:
            raise ConfigError(f"rl.arms={arms} is too small; a bandit task needs a safe arm and at least 2 risky arms.")
        self.arms, self.horizon, self.safe, self.good, self.poor = arms, horizon, safe, good, poor
        self.task_dim = arms
        self.action = ActionSpec("discrete", arms)

    def sample_tasks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        probs = torch.full((n, self.arms), self.poor)
        probs[:, 0] = self.safe
        probs[torch.arange(n), 1 + torch.randint(self.arms - 1, (n,), generator=generator)] = self.good
        return probs

    def reset(self, tasks: torch.Tensor, episodes: int, generator: torch.Generator | None = None) -> torch.Tensor:
        self.probs, self.generator = tasks.float(), generator
        self.shape = (tasks.shape[0], episodes)
        return torch.ones(*self.shape, 1)

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.gather(self.probs, 1, actions.long())  # [T, N]
        reward = (torch.rand(self.shape, generator=self.generator) < p).float()
        return torch.ones(*self.shape, 1), reward

    def make_env(self, task: torch.Tensor) -> BanditEnv:
        return BanditEnv(task.tolist(), self.horizon)


# ---- any gymnasium environment ---------------------------------------------------------------------

class GymTaskFamily:
    """Your own task family from gymnasium envs: ``make_env(task) -> gym.Env`` and
    ``sample_tasks(n, generator) -> [n, task_dim]``; stepped env by env (slower than the built-in
    vectorised families, same interface). Episodes run for ``horizon`` steps (an env that ends
    earlier keeps its last observation and earns 0 afterwards)."""

    def __init__(self, name: str, make_env: Callable[[torch.Tensor], gym.Env],
                 sample_tasks: Callable[[int, torch.Generator], torch.Tensor], horizon: int) -> None:
        self.name, self._make_env, self._sample_tasks, self.horizon = name, make_env, sample_tasks, horizon
        probe = make_env(sample_tasks(1, torch.Generator().manual_seed(0))[0])
        if isinstance(probe.action_space, spaces.Discrete):
            self.action = ActionSpec("discrete", int(probe.action_space.n))
        elif isinstance(probe.action_space, spaces.Box) and len(probe.action_space.shape) == 1:
            box = probe.action_space
            self.action = ActionSpec("box", box.shape[0], float(box.low.min()), float(box.high.max()))
        else:
            raise ConfigError(f"Task family '{name}': action space {probe.action_space} is not supported; use Discrete or a 1-D Box.")
        if len(probe.observation_space.shape) != 1:
            raise ConfigError(f"Task family '{name}': observations must be 1-D vectors; got shape {probe.observation_space.shape}.")
        self.obs_dim = probe.observation_space.shape[0]

    def sample_tasks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self._sample_tasks(n, generator)

    def reset(self, tasks: torch.Tensor, episodes: int, generator: torch.Generator | None = None) -> torch.Tensor:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else None
        self.envs = [[self._make_env(task) for _ in range(episodes)] for task in tasks]
        self.done = np.zeros((len(tasks), episodes), dtype=bool)
        obs = [[env.reset(seed=None if seed is None else seed + i * episodes + j)[0] for j, env in enumerate(row)]
               for i, row in enumerate(self.envs)]
        self.last = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        return self.last.clone()

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reward = torch.zeros(self.last.shape[:2])
        for i, row in enumerate(self.envs):
            for j, env in enumerate(row):
                if self.done[i, j]:
                    continue
                obs, r, terminated, truncated, _ = env.step(actions[i, j].numpy())
                self.last[i, j] = torch.as_tensor(obs, dtype=torch.float32)
                reward[i, j] = float(r)
                self.done[i, j] = terminated
        return self.last.clone(), reward


def make_family(name: str, horizon: int | None = None, arms: int = 5):
    """``nav2d`` or ``bandit`` with its default horizon (100 / 10) unless one is given."""
    if name == "nav2d":
        return Nav2DTasks(horizon or 100)
    if name == "bandit":
        return BanditTasks(arms, horizon or 10)
    raise ConfigError(f"rl.task='{name}' is unknown; use 'nav2d' (2D navigation) or 'bandit' (multi-armed bandits).")
