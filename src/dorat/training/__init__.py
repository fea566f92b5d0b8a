"""Training: the loop that turns a prepared run into weights, and what it keeps on the way.

``prepared.Run`` is what the loop is given (config, data splits, model, method, device);
``trainer`` runs the epochs (the method's step, the optimizer and schedule, weight averaging,
bf16, DDP); ``stats`` sums each epoch's statistics; ``midepoch`` and ``interrupts`` checkpoint
and stop within an epoch (SIGTERM, Ctrl-C, Slurm requeue) so a resume is bitwise; ``guard`` is
the catastrophic-overfitting guard; ``tracking`` writes TensorBoard; ``advice`` prints the
one-line warnings about settings that run but probably not as meant.

Imports: objectives, evaluation (the probe), models, data, config, files, system, errors; never
runs (run directories drive the loop, not the other way: tests/test_layers.py).
"""
