"""The training experiments' command line, one config per variant::

    python -m experiments fit --config configs/vanishing_sigmoid.yaml
    python -m experiments fit --config configs/vanishing_sigmoid.yaml --trainer.max_epochs=3 --model.depth=20

``configs/base.yaml`` holds what every experiment shares and is loaded first, as defaults; each variant's config
states only what differs (its run's name and version, an activation, a WeightInit scheme, ...). The data module's
feature and class counts are linked to the model's ``in_features`` and ``num_classes``, so configs never repeat them.

Each variant is a TensorBoard run at ``runs/<experiment>/<variant>``. Running a variant again replaces that run (its
event files are removed first, and a line says so), so TensorBoard and ``gradmon report`` never draw two runs as one;
give ``--trainer.logger.init_args.version=NAME`` to keep both.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from experiments.data import DigitsDataModule
from experiments.models import MLP

# The digits are a few hundred kilobytes of tensors in memory: worker processes would only add start-up time.
warnings.filterwarnings("ignore", ".*does not have many workers.*")

#: Intra-op threads for the experiments' runs. Their matrices are 64 wide, too small to split over threads; on a busy
#: two-core machine the threads' spin-waiting made a 230-step run take 80 s instead of 2 s.
THREADS = 1
#: What every experiment's config shares, loaded before the variant's own.
BASE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "base.yaml"


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
    base = {"default_config_files": [str(BASE_CONFIG)]}
    return ExperimentCLI(
        MLP,
        DigitsDataModule,
        subclass_mode_model=True,
        # Rerunning a variant rewrites its run directory, config included.
        save_config_kwargs={"overwrite": True},
        # With subcommands each subcommand's parser takes the defaults; without (run=False), the one parser does.
        parser_kwargs={name: base for name in ("fit", "validate", "test", "predict")} if run else base,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    torch.set_num_threads(THREADS)
    cli_main()
