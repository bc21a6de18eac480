"""``python -m experiments fit --config configs/<variant>.yaml``: the training experiments' command line
(:mod:`experiments.cli`)."""

import torch

from experiments.cli import THREADS, cli_main

if __name__ == "__main__":
    torch.set_num_threads(THREADS)
    cli_main()
