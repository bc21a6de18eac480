"""The training experiments' command line, one config per variant::

    python -m experiments fit --config configs/vanishing_sigmoid.yaml
    python -m experiments fit --config configs/vanishing_sigmoid.yaml --trainer.max_epochs=3 --model.depth=20

``configs/base.yaml`` holds what every experiment shares and is loaded first, as defaults; each variant's config
states only what differs (its run's name and version, an activation, a WeightInit scheme, ...). Config files are read
by :func:`experiments.configs.load`: a variant's ``trainer.callbacks`` given as a mapping changes the base's callback
list entry by entry instead of replacing it, and its ``demo`` mapping (what the demo and the tests expect of the run)
is removed. The data module's feature and class counts are linked to the model's ``in_features`` and
``num_classes``, so configs never repeat them.

Each variant is a TensorBoard run at ``runs/<experiment>/<variant>``. Running a variant again replaces that run (its
event files are removed first, and a line says so), so TensorBoard and ``gradmon report`` never draw two runs as one;
give ``--trainer.logger.init_args.version=NAME`` to keep both.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from experiments.configs import BASE_CONFIG, CONFIG_DIR, PARSER_MODE, read_variant
from experiments.data import DigitsDataModule
from experiments.models import MLP

# The digits are a few hundred kilobytes of tensors in memory: worker processes would only add start-up time.
warnings.filterwarnings("ignore", ".*does not have many workers.*")

#: Intra-op threads for the experiments' runs. Their matrices are 64 wide, too small to split over threads; on a busy
#: machine with few cores the threads' spin-waiting makes runs many times slower.
THREADS = 1


class ExperimentCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_features", "model.init_args.in_features", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def before_fit(self) -> None:
        replace_earlier_run(self.trainer.logger)


def replace_earlier_run(logger) -> None:
    """Remove the event files of an earlier run in this logger's directory: a second event file there would make
    TensorBoard draw both runs as one line (and a 16-layer and a 20-layer net as one heatmap)."""
    log_dir = getattr(logger, "log_dir", None)
    if log_dir is None:
        return
    earlier = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    for path in earlier:
        path.unlink()
    if earlier:
        print(
            f"==> replacing the earlier run in {log_dir} (pass --trainer.logger.init_args.version=NAME to keep both)",
            flush=True,
        )


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> ExperimentCLI:
    """Build the CLI from ``args`` (default: ``sys.argv``) and, with ``run``, run its subcommand."""
    base = {"default_config_files": [str(BASE_CONFIG)], "parser_mode": PARSER_MODE}
    return ExperimentCLI(
        MLP,
        DigitsDataModule,
        subclass_mode_model=True,
        # Rerunning a variant rewrites its run directory, config included.
        save_config_kwargs={"overwrite": True},
        # With subcommands each subcommand's parser takes the defaults; without (run=False), the one parser does.
        parser_kwargs=(
            {"parser_mode": PARSER_MODE, **{name: base for name in ("fit", "validate", "test", "predict")}}
            if run else base
        ),
        args=args,
        run=run,
    )


def config_path(config: str | Path) -> Path:
    """A config given by name (``vanishing_sigmoid``: ``configs/vanishing_sigmoid.yaml``) or as a path."""
    return config if isinstance(config, Path) else CONFIG_DIR / f"{config}.yaml"


def fit_config(config: str | Path, logdir: Path, *overrides: str) -> ExperimentCLI:
    """``python -m experiments fit --config configs/<config>.yaml`` (or the file ``config``) with its run under
    ``logdir`` and LightningCLI ``overrides`` after the config, without the progress bar and the model summary."""
    return cli_main(
        [
            "fit",
            f"--config={config_path(config)}",
            f"--trainer.logger.init_args.save_dir={logdir}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            *overrides,
        ]
    )


def run_name(config: str | Path) -> tuple[str, str]:
    """The (experiment, variant) a config logs to, its run being ``<save_dir>/<experiment>/<variant>``: the logger's
    ``name`` and ``version``, from the config or else from the base."""
    variant = read_variant(config_path(config))
    return variant.experiment, variant.version
