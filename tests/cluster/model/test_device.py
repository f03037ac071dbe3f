"""Device and dtype choices: refused clearly when they cannot work; weights built on the target device."""

from __future__ import annotations

import pytest
import torch

from attention import PartialRotary
from cluster import LLM, ClusterConfig, ConfigError
from cluster.config import ModelConfig
from cluster.model.checkpoint import CheckpointReader
from cluster.model.loading import load_dense_model
from tests.conftest import FLAGSHIP_SHAPE


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(make_checkpoint):
    with pytest.raises(ConfigError, match="device 'cuda' was asked for but there is no GPU"):
        LLM(model=make_checkpoint(FLAGSHIP_SHAPE), device="cuda", warm_up=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus_per_worker=0.5), "whole number"),
    (dict(device="cuda", gpus_per_worker=0), "would see no GPU"),
    (dict(device="cpu", gpus_per_worker=1), "drop one of them"),
    (dict(device="tpu"), "device must be one of"),
])
def test_bad_device_combinations_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ClusterConfig(**kwargs)


def test_auto_resolves_to_what_is_there():
    assert ClusterConfig().resolve_device(gpus_available=False) == "cpu"
    assert ClusterConfig().resolve_device(gpus_available=True) == "cuda"
    assert ClusterConfig(gpus_per_worker=0).resolve_device(gpus_available=True) == "cpu"


def test_weights_are_built_in_the_target_dtype_without_an_fp32_copy(make_checkpoint, monkeypatch):
    """The module is built on the meta device: no parameter is ever initialised in fp32 on the host."""
    created = []
    original = torch.nn.Parameter.__new__

    def spy(cls, data=None, requires_grad=True):
        created.append((data.device.type, data.dtype) if data is not None else None)
        return original(cls, data, requires_grad)

    monkeypatch.setattr(torch.nn.Parameter, "__new__", spy)
    model_dir = make_checkpoint(FLAGSHIP_SHAPE)
    model = load_dense_model(ModelConfig.from_pretrained(model_dir), CheckpointReader(model_dir), torch.bfloat16)
    assert ("meta", torch.float32) in created  # built on meta, then allocated in bf16
    assert all(dtype == torch.bfloat16 for device, dtype in created if device != "meta")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    [rotary] = {m for m in model.modules() if isinstance(m, PartialRotary)}
    fresh = PartialRotary(rotary.head_dim, rotary.rotary_dim, rotary.theta)  # built on the host
    assert torch.equal(rotary.inv_freq, fresh.inv_freq.bfloat16())  # recomputed after the meta build
