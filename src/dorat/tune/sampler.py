"""The study's sampler: Optuna's TPE, seeded per trial so that a seeded study proposes the same
values for trial N whichever process asks, and how many processes share it.

One ``TPESampler(seed=S)`` per process would replay one random stream in every process: two
processes on one study both propose the stream's first values for their first trials, so two
workers would train the same trial twice (and TPE's first ``n_startup_trials`` = 10 proposals
are that random stream). Here trial N's proposal draws from its own stream, seeded by (S, N)
through NumPy's SeedSequence; TPE itself reads every earlier trial from the storage, so the
proposal depends only on the seed, the trial number and what the storage holds. ``constant_liar``
makes TPE treat the trials running elsewhere as bad results, so concurrent trials spread out
(Optuna's documented setting for parallel workers). Without a seed every trial gets fresh entropy.
"""

from __future__ import annotations

from typing import Any

import optuna
from numpy.random import SeedSequence


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s random stream in a study sampled with ``seed``."""
    return int(SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE with a fresh, deterministic random stream for each trial (see the module docstring)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.inner = self._make(0)

    def _make(self, number: int) -> optuna.samplers.TPESampler:
        seed = None if self.seed is None else trial_seed(self.seed, number)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.inner = self._make(trial.number)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                           param_name: str, param_distribution: Any) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: optuna.trial.TrialState, values: Any) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
