"""An import-path factory for `mhc-compile inspect tests.cli_factory:make`."""

import torch

from models import NanoGPT


def make():
    return NanoGPT(layers=1), (torch.randint(0, 64, (2, 8)),)
