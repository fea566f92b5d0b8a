"""The run's own config sections (typed dataclasses; their fields are the keys): the top level,
``method``, ``data``, ``optim``, ``eval``, ``log`` and ``perf``. The parts' sections (``attack``,
``done``, ``trades``, ...) are declared by the parts themselves (dorat.objectives)."""

from __future__ import annotations

from dataclasses import dataclass

from dorat.attacks import attack_names_problem
from dorat.config.parts import nonneg, opt, positive, section, seed_value, unit

DEVICES = ("auto", "cpu", "cuda", "mps")


@section("")
@dataclass(frozen=True)
class RunConfig:
    dataset: str = opt("fashion-mnist", "dataset name, npz:PATH or imagefolder:DIR (see `dorat data list`)")
    model: str = opt("small-cnn", "a registered model, or module:factory returning an nn.Module")
    init: str | None = opt(None, "start from trained weights: a run directory (its model.safetensors) "
                                 "or a weights file (.safetensors, or a state dict read with "
                                 "weights_only); recorded in RUN/init.json (dorat.runs.warmstart)")
    seed: int = opt(0, "fixes data order, initialisation and attack noise", seed_value)
    device: str = opt("auto", "auto = CUDA when present, else CPU", choices=DEVICES)
    epochs: int = opt(10, "training epochs", positive)
    batch_size: int = opt(128, "the global mini-batch", positive)
    plugins: list[str] = opt([], "modules imported before the run is built (they register parts)")


@section("method")
@dataclass(frozen=True)
class MethodConfig:
    name: str = opt("at", "the method's label (a preset name, or attack×loss×weighting)")
    attack: str = opt("pgd", "the training attack (lower level): a registered attack")
    loss: str = opt("ce", "the per-example loss: a registered loss")
    weighting: str = opt("uniform", "the instance weighting: a registered weighting")
    hypergrad: str = opt("none", "implicit hypergradient through the barrier lower level: "
                                 "none, diag or cg")


@section("data")
@dataclass(frozen=True)
class DataConfig:
    dir: str | None = opt(None, "dataset directory (else $DORAT_DATA, ~/.cache/dorat, ...)")
    train_subset: int | None = opt(None, "use N training examples (stratified)", positive)
    imbalance_ratio: float = opt(1.0, "long-tailed training set: n_max/n_min",
                                 lambda v: None if v >= 1 else "must be >= 1")
    val_size: int = opt(0, "held-out validation examples from train (stratified)", nonneg)
    augment: str = opt("auto", "auto: crop+flip for CIFAR-like data and image folders, crop for digits",
                       choices=("auto", "none", "crop-flip", "crop"))
    download: bool = opt(True, "download a missing dataset (with checksums)")


@section("optim")
@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(0.1, "SGD learning rate", positive)
    momentum: float = opt(0.9, "SGD momentum", unit)
    nesterov: bool = opt(False, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay", nonneg)
    schedule: str = opt("piecewise", "learning-rate schedule (stepped per batch)",
                        choices=("piecewise", "cosine", "onecycle", "constant"))
    milestones: list[float] = opt([0.5, 0.75], "piecewise: fractions of training")
    gamma: float = opt(0.1, "piecewise: factor at each milestone", positive)
    # one default for every method (a preset changes the method and nothing else): DONE can put
    # up to 1/done.beta of a step on one example and needs it; PGD-AT's gradients (norm ~1)
    # rarely reach it (docs/DONE.md; benchmarks/results/clip.yaml measures both with and without)
    grad_clip: float | None = opt(5.0, "clip the gradient norm at this value (null: no clip)",
                                  positive)
    ema: float = opt(0.0, "weight averaging: the decay per step of an exponential moving average "
                          "of the weights (0: off; 0.995 in the reference code of Rebuffi et al.); "
                          "the probe, val.keep_best, model.safetensors and the evaluation use the "
                          "average (dorat.models.averaging)",
                     lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    ema_start: int | str = opt(0, "when the average starts: before it, it is the current weights "
                                  "(epochs, or a share of the run like '50%')", kind="warmup")


@section("eval")
@dataclass(frozen=True)
class EvalConfig:
    attacks: list[str] = opt(["pgd"], "pgd, cw, aa (AutoAttack)", attack_names_problem)
    n: int | None = opt(None, "stratified test subset size (null: all)", positive)
    eps: float | None = opt(None, "threat radius (null: attack.eps)", unit)
    norm: str | None = opt(None, "threat norm (null: attack.norm)", choices=("linf", "l2"))
    steps: int = opt(20, "PGD/CW iterations", positive)
    alpha: float | None = opt(None, "PGD/CW step (null: eps/4)", positive)
    restarts: int = opt(1, "random restarts per attack", positive)
    batch_size: int = opt(500, "evaluation batch", positive)
    seed: int = opt(0, "attack noise and the stratified subset", seed_value)
    aa_version: str = opt("standard", "AutoAttack version (official settings)",
                          choices=("standard", "plus", "rand"))
    checks: bool = opt(True, "run the sanity checks (an ε sweep with PGD)")
    check_n: int = opt(200, "stratified points for the ε sweep", positive)
    split: str = opt("test", "val: the held-out data.val_size split (tuning without the test set)",
                     choices=("test", "val"))


@section("log")
@dataclass(frozen=True)
class LogConfig:
    progress: str = opt("auto", "progress bars (auto: on a terminal)", choices=("auto", "on", "off"))
    tensorboard: bool = opt(False, "TensorBoard event files in RUN/tb: per-epoch scalars, per-class "
                                   "weights, a weight histogram, the final per-class accuracies "
                                   "(needs the tensorboard package: dorat[tensorboard])")
    mlflow: bool = opt(False, "an MLflow run per dorat run: the config as parameters, every epoch's "
                              "numbers (epoch = step), the final numbers, metrics.json and the "
                              "report as artifacts; a resume continues it (needs dorat[mlflow])")
    mlflow_uri: str = opt("", "the MLflow tracking store: a URL (sqlite:///FILE, http://HOST:5000, "
                              "...) or a local directory (an SQLite store DIR/mlflow.db); empty: "
                              "$MLFLOW_TRACKING_URI, else ./mlruns")
    mlflow_experiment: str = opt("dorat", "the MLflow experiment of the run")
    mlflow_tags: str = opt("", "more tags of the MLflow run: key=value,key=value (compare and tune "
                               "add the grid's or the study's)")
    checkpoint_minutes: float = opt(30.0, "also checkpoint in the middle of an epoch when this many "
                                          "minutes passed since the last checkpoint (0: only at an "
                                          "epoch's end, and on SIGTERM/Ctrl-C, which always "
                                          "checkpoint the batches done)",
                                    nonneg)


@section("perf")
@dataclass(frozen=True)
class PerfConfig:
    channels_last: str = opt("auto", "channels-last memory format; auto = on for CPU and CUDA "
                             "(1.7x faster PGD-AT steps for small-cnn on CPU, docs/PERFORMANCE.md)",
                             choices=("auto", "on", "off"))
    amp: str = opt("auto", "bf16 autocast for the training step (attack and update; evaluation "
                   "stays fp32); auto = bf16 where the device computes it natively (CPU with "
                   "AVX512-BF16/AMX, CUDA compute capability 8+)", choices=("auto", "off", "bf16"))
    compile: bool = opt(False, "torch.compile the model")
    compile_backend: str = opt("inductor", "torch.compile backend")
    sync_bn: bool = opt(False, "SyncBatchNorm under torchrun (CUDA only)")
    deterministic: bool = opt(False, "torch deterministic algorithms (bitwise-reproducible GPU "
                                     "runs, slower; CPU runs already are)")
