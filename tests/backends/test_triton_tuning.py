"""How a Triton kernel's configuration is chosen: autotuned, first-fitting, or forced."""

import inspect
import os
import subprocess
import sys

import pytest
import torch
import triton

from fastres.backends import ConvParams
from fastres.backends.triton import _tuning, bn, conv

SCRIPT = """
from fastres.backends.triton import _tuning, bn, conv
kernels = (conv._gemm, conv._direct, bn._bn_apply_kernel, bn._bn_bwd_reduce_kernel,
           bn._bn_bwd_dx_kernel)
print(_tuning.AUTOTUNE, *(k.tuning for k in kernels))
"""


def _run(value: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTRES_TRITON_AUTOTUNE"] = value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_autotune_off_launches_directly():
    # no triton.autotune at all: triton 3.6 would still time a single remaining configuration
    assert _run("0") == ["False"] * 6


def test_autotune_on_tunes_every_multi_config_kernel():
    assert _run("1") == ["True"] * 6


def test_first_fitting_config_is_the_pruned_one():
    narrow = conv._prune_gemm(conv.GPU_GEMM_CONFIGS, {"Kg": 16, "Cg": 16})
    assert narrow and all(c.kwargs["BLOCK_N"] <= 32 for c in narrow)
    # every tile but the sm_90 TMA ones (no CUDA input here; test_triton_tma.py)
    assert len(conv._prune_gemm(conv.GPU_GEMM_CONFIGS, {"Kg": 256, "Cg": 256})) == len(
        [c for c in conv.GPU_GEMM_CONFIGS if not c.kwargs.get("TMA")])
    tuned = _tuning.Tuned(conv._conv_gemm_kernel, conv.GPU_GEMM_CONFIGS, ["M"], conv._prune_gemm)
    args = dict.fromkeys(conv._conv_gemm_kernel.arg_names) | {"Kg": 16, "Cg": 16}
    ordered = [args[name] for name in conv._conv_gemm_kernel.arg_names]
    assert tuned.candidates(ordered, {}) == narrow


@pytest.mark.skipif(not _tuning.INTERPRET, reason="interpreter test (GPU: test_triton_configs)")
@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_forced_config_runs_and_partials_follow_its_block_m(block_m: int):
    """The per-tile statistics are sliced to the BLOCK_M that actually ran (the buffers are sized
    for the smallest): forcing a larger tile under the interpreter checks the slicing on CPU."""
    x = torch.randn(2, 16, 9, 7).to(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3) / 12
    params = ConvParams((1, 1), (1, 1), (1, 1), 1)
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)
    with conv._gemm.forced(config):
        y, part = conv.conv2d_fused(x, w, None, params, stats=True)
    assert conv._gemm.last_config is config
    assert _tuning.launched_configs()["_conv_gemm_kernel"] == (
        f"BLOCK_M={block_m},BLOCK_N=16,BLOCK_K=16 w4 s3")
    m = 2 * 9 * 7
    assert part.count.shape == (triton.cdiv(m, block_m),)
    assert part.count.sum().item() == m
    assert (part.count[:-1] == block_m).all()
    ref = torch.nn.functional.conv2d(x, w, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    mean, var, _, _ = bn.finalize(part.count, part.mean, part.m2, None, None, 1e-5)
    torch.testing.assert_close(mean, ref.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, ref.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


class _StubKernel:
    """Records launches as ``fn[grid](*args, **kwargs)`` makes them."""

    __name__ = "stub"

    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


class _StubTuner(_StubKernel):
    """An autotuner that 'chooses' configs[len(launches) % 2] for each launch it gets."""

    def __init__(self, configs) -> None:
        super().__init__()
        self.configs = configs
        self.best_config = None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.best_config = self.configs[len(self.launches) % 2]
            self.launches.append((args, kwargs))

        return run


def test_tuned_launch_asks_the_tuner_once_per_signature(monkeypatch):
    """After the autotuner chose for a launch signature, the same signature launches the kernel
    directly with that choice (no per-launch key building); any change of an argument's value,
    a tensor's dtype or a keyword argument goes through the tuner again."""
    monkeypatch.setattr(_tuning, "_ALL", [])
    configs = [triton.Config({"BLOCK_M": 16}, num_warps=4), triton.Config({"BLOCK_M": 32})]
    fn = _StubKernel()
    tuned = _tuning.Tuned(fn, configs[:1], ["M"])
    tuner = tuned._tuner = _StubTuner(configs)
    x, h = torch.empty(2), torch.empty(2, dtype=torch.float16)
    launches = [
        ((x, 64), {"RELU": True}),
        ((x, 64), {"RELU": True}),  # same: direct
        ((x, 65), {"RELU": True}),  # an int differs
        ((h, 64), {"RELU": True}),  # a dtype differs
        ((x, 64), {"RELU": False}),  # a flag differs
        ((x, 65), {"RELU": True}),  # seen: direct
    ]
    chosen = []
    for args, kwargs in launches:
        tuned[(1,)](*args, **kwargs)
        chosen.append(tuned.last_config)
    assert [a for a, _ in tuner.launches] == [(x, 64), (x, 65), (h, 64), (x, 64)]
    assert [kw["RELU"] for _, kw in tuner.launches] == [True, True, True, False]
    # direct launches carry the configuration the tuner chose for that signature
    assert fn.launches == [
        ((x, 64), {"RELU": True, **configs[0].all_kwargs()}),
        ((x, 65), {"RELU": True, **configs[1].all_kwargs()}),
    ]
    assert chosen == [configs[0], configs[0], configs[1], configs[0], configs[1], configs[1]]
    with tuned.forced(configs[1]):
        tuned[(1,)](x, 64, RELU=True)
    assert fn.launches[-1] == ((x, 64), {"RELU": True, **configs[1].all_kwargs()})
    assert len(tuner.launches) == 4


def test_first_fitting_choice_is_pruned_once_per_signature(monkeypatch):
    """Without autotuning (FASTRES_TRITON_AUTOTUNE=0, the interpreter) the first configuration
    that survives pruning runs; pruning runs once per launch signature."""
    monkeypatch.setattr(_tuning, "_ALL", [])
    configs = [triton.Config({"BLOCK_M": 16}), triton.Config({"BLOCK_M": 32})]
    pruned = []

    def prune(configs, nargs, **kwargs):
        pruned.append(nargs["M"])
        return configs[1:] if nargs["M"] > 64 else configs

    fn = _StubKernel()
    fn.arg_names = ["x", "M"]
    tuned = _tuning.Tuned(fn, configs[:1], ["M"], prune)  # one config: no autotuner
    tuned.configs = configs
    x = torch.empty(2)
    for m in (64, 128, 64, 128, 64):
        tuned[(1,)](x, m)
    assert pruned == [64, 128]
    assert [kw["BLOCK_M"] for _, kw in fn.launches] == [16, 32, 16, 32, 16]
    assert tuned.last_config is configs[0]


# constexpr arguments a kernel's autotune key may leave out, and why
DERIVED_FLAGS = {
    "FLAT_K": "the launcher chooses it from C, R and S, which are in the key",
    "INTERPRET": "fixed for the process",
    "TMA": "a tuned meta-parameter of the sm_90 configurations (absent from the CPU list)",
}


def test_every_flag_of_a_tuned_kernel_is_in_its_key():
    """A configuration timed for one epilogue (bias, affine, ReLU, residual, statistics...) is
    not reused for another: every constexpr argument of every autotuned kernel is in its key,
    a tuned meta-parameter, or derived from the key; every key names an argument (Triton
    skips unknown names silently)."""
    from fastres.backends.triton import conv_bwd

    kernels = [v for module in (conv, conv_bwd, bn) for v in vars(module).values()
               if isinstance(v, _tuning.Tuned)]
    assert len(kernels) >= 10
    for kernel in kernels:
        name, args = kernel.fn.__name__, kernel.fn.arg_names
        assert set(kernel.key) <= set(args), (name, set(kernel.key) - set(args))
        meta = set().union(*(c.all_kwargs() for c in kernel.configs))
        flags = _constexprs(kernel.fn.fn) - meta - set(DERIVED_FLAGS)
        assert flags <= set(kernel.key), (name, sorted(flags - set(kernel.key)))


def _constexprs(fn) -> set[str]:
    """Names of ``fn``'s ``tl.constexpr`` parameters (annotations may be strings)."""
    return {name for name, p in inspect.signature(fn).parameters.items()
            if p.annotation is triton.language.constexpr
            or str(p.annotation).endswith("constexpr")}


def test_last_config_is_per_thread():
    """The conv launcher reads ``last_config`` right after its launch to slice the per-tile
    statistics: a launch on another thread (``nn.DataParallel`` replicas) must not change it."""
    import threading

    kernel, (mine, theirs) = conv._gemm, conv.GPU_GEMM_CONFIGS[:2]
    kernel.last_config = mine
    other = threading.Thread(target=lambda: setattr(kernel, "last_config", theirs))
    other.start()
    other.join()
    assert kernel.last_config is mine


@pytest.mark.parametrize("drop_path", [False, True])
def test_kept_choices_do_not_grow_or_hold_tensors_passed_by_keyword(drop_path):
    """The BN apply kernel takes its drop-path pointers by keyword (dummies without a drop
    path): launches of one shape share one kept choice, and no launch's tensor stays alive in
    it (by identity every launch would be a new entry holding its tensors forever)."""
    import gc
    import weakref

    def launch():
        y = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
        scale, shift = torch.rand(8) + 0.5, torch.randn(8)
        keep = torch.rand(2) + 0.5 if drop_path else None
        bn.apply(y, scale, shift, None, True, branch_scale=keep)
        return weakref.ref(scale)

    launch()
    kept = len(bn._bn_apply_kernel._chosen)
    refs = [launch() for _ in range(3)]
    gc.collect()
    assert len(bn._bn_apply_kernel._chosen) == kept
    assert all(r() is None for r in refs)
