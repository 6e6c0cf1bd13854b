"""Torch's process-wide switches during curvature passes: applied, shared by threads, restored."""

import threading

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab import shims
from tests.helpers import Wrapped, assert_close_rel


def _settings():
    cuda = torch.backends.cuda
    return (
        torch.backends.mha.get_fastpath_enabled(),
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.math_sdp_enabled(),
        torch.backends.cudnn.enabled,
        torch._weight_norm,
    )


def test_a_pass_switches_torch_and_restores_the_users_settings():
    torch.backends.cuda.enable_math_sdp(False)  # the user's own choice, put back after
    try:
        before = _settings()
        with shims.curvature_pass(recurrent=True):
            fast_path, flash, efficient, math, cudnn, weight_norm = _settings()
            assert not fast_path and not flash and not efficient and math and not cudnn
            assert weight_norm is shims._weight_norm_from_parts
        assert _settings() == before
    finally:
        torch.backends.cuda.enable_math_sdp(True)


def test_passes_in_two_threads_share_the_switches_and_restore_them_once():
    """Thread A ends while thread B still runs: B keeps the switches; after both, the user's are back."""
    before = _settings()
    inside, a_done = threading.Barrier(2), threading.Event()
    seen = {}

    def first():
        with shims.curvature_pass():
            inside.wait()
        a_done.set()

    def second():
        with shims.curvature_pass(recurrent=True):
            inside.wait()
            a_done.wait()
            seen["after A ended"] = _settings()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fast_path, _, _, math, cudnn, weight_norm = seen["after A ended"]
    assert not fast_path and math and not cudnn and weight_norm is shims._weight_norm_from_parts
    assert _settings() == before


@pytest.mark.parametrize("operator", [cl.GGN, cl.EmpiricalFisher], ids=["GGN", "EF"])
def test_curvature_in_three_threads_at_once_gives_each_its_numbers(operator):
    """Forward-mode products (torch.func.jvp) in three threads: its level is process-wide.

    Without the lock, jvp in threads at once raised "no level exists" or gave an EF of
    zeros. One model per thread (functional_call swaps a model's parameters).
    """
    data = (torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64))
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(Wrapped(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()))
    expected = [operator(cl.Problem(model, nn.MSELoss(), data)).to_dense() for model in models]
    before = _settings()
    results, errors = {i: [] for i in range(3)}, []

    def work(i):
        try:
            for _ in range(10):
                results[i].append(operator(cl.Problem(models[i], nn.MSELoss(), [data])).to_dense())
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(3):  # up to rounding: concurrent threads can change torch's reduction order
        assert len(results[i]) == 10
        for result in results[i]:
            assert_close_rel(result, expected[i], 1e-13, f"model {i}")
    assert _settings() == before
