"""Placement of inference actors: device, dtype, Ray resources, and the GPU request that cannot be met."""

import pytest
import torch

from trainers.core.models import Placement


def test_default_is_the_cpu_in_fp32_without_gpu_resources():
    p = Placement()
    assert p.device() == torch.device("cpu")
    assert p.torch_dtype(p.device()) == torch.float32
    assert p.resources() == {}


def test_auto_is_bf16_on_a_gpu_and_explicit_dtypes_win():
    assert Placement(dtype="auto").torch_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert Placement(dtype="float32").torch_dtype(torch.device("cuda", 0)) == torch.float32
    assert Placement(dtype="bfloat16").torch_dtype(torch.device("cpu")) == torch.bfloat16
    assert Placement(gpus=0.5).resources() == {"num_gpus": 0.5}


@pytest.mark.parametrize("kwargs, message", [({"gpus": -1}, "GPUs per actor"), ({"dtype": "float16"}, "dtype")])
def test_bad_placements_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Placement(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_asking_for_a_gpu_without_cuda_fails_instead_of_running_on_the_cpu():
    with pytest.raises(RuntimeError, match="CUDA sees none"):
        Placement(gpus=1).device()


def test_load_puts_the_model_in_the_placement_dtype_in_eval_mode(tiny_model):
    model = Placement(dtype="bfloat16").load(tiny_model)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
