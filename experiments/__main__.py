"""The training experiments' command line, one config per variant::

    python -m experiments fit --config configs/vanishing_sigmoid.yaml
    python -m experiments fit --config configs/vanishing_sigmoid.yaml --trainer.max_epochs=3 --model.depth=20

Each config names its model (:class:`~experiments.models.MLP` or a subclass), the digits data, the gradmon
callbacks, and a TensorBoard run at ``runs/<experiment>/<variant>``. The data module's feature and class counts are
linked to the model's ``in_features`` and ``num_classes``, so configs never repeat them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LightningCLI

from experiments.data import DigitsDataModule
from experiments.models import MLP

# The digits are a few hundred kilobytes of tensors in memory: worker processes would only add start-up time.
warnings.filterwarnings("ignore", ".*does not have many workers.*")

#: Intra-op threads for the experiments' runs. Their matrices are 64 wide, too small to split over threads; on a busy
#: two-core machine the threads' spin-waiting made a 230-step run take 80 s instead of 2 s.
THREADS = 1


class ExperimentCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_features", "model.init_args.in_features", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> ExperimentCLI:
    """Build the CLI from ``args`` (default: ``sys.argv``) and, with ``run``, run its subcommand."""
    return ExperimentCLI(
        MLP,
        DigitsDataModule,
        subclass_mode_model=True,
        # Rerunning a variant rewrites its run directory, config included.
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    torch.set_num_threads(THREADS)
    cli_main()
