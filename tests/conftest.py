"""Shared test setup: W&B disabled, single-threaded torch, deterministic seeds."""

import os
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# fitted rational inits of unshipped degrees are cached here, not in ~/.cache/lit_act
os.environ.setdefault("LIT_ACT_CACHE", tempfile.mkdtemp(prefix="lit_act_cache_"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
