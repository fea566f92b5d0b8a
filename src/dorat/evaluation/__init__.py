"""Evaluation: how robust a model is, and whether the number can be trusted.

``evaluate`` attacks a model (PGD, CW, AutoAttack, FGSM) on a test or validation split and
gives SA, RA, per-class and worst-class robust accuracy, RA-Tail-30 and the ε sweep; ``checks``
are the sanity checks behind every number (more steps and restarts, a larger ε, gradient
masking); ``card`` evaluates a model from outside dorat into a RobustBench-like model card;
``probe`` is the cheap per-epoch measurement on the validation split that training, tuning and
the class-level weightings read; ``results`` reads a run's results on disk (config, metrics,
log, example weights) for reports, tuning and grids.

Imports: models, data, config, attacks, files, system, errors; never objectives, training or
runs (tests/test_layers.py).
"""
