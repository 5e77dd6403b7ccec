"""Tiny models gain nothing from intra-op threads; on a shared machine they lose."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
