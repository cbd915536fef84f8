"""The shipped Accelerate launch configs (configs/accelerate/*.yaml) load with Accelerate's own reader.

They are launch configs, not experiment specs: they live in a subfolder that test_spec.py's
``configs/*.yaml`` glob does not reach.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(str(resources.files("tunelab") / "configs" / "accelerate"))
EXPECTED = {"ddp.yaml": DistributedType.MULTI_GPU, "fsdp_lora.yaml": DistributedType.FSDP,
            "fsdp_qlora.yaml": DistributedType.FSDP, "deepspeed_zero2.yaml": DistributedType.DEEPSPEED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_loads(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type == EXPECTED[name]
    assert config.mixed_precision == "bf16"
    if config.distributed_type == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == 2
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2


def test_every_shipped_accelerate_config_is_checked():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)
