"""A small run of the ``cuda`` backend for ``compute-sanitizer --tool memcheck``.

A few fused calls (dense, grouped, 1×1 with residual; eval and training with backward) at odd
sizes. Two steps, so that only the cuda backend's own kernels run under the (slow) sanitizer:

    python bench/sanitize_cuda.py --expect FILE        # reference backend (cuDNN): inputs and
                                                       # expected outputs to FILE, no sanitizer
    compute-sanitizer --tool memcheck python bench/sanitize_cuda.py --check FILE
                                                       # the cuda backend on those inputs

The comparison is loose (memcheck is the point; tests/ check numerics). Run the check with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so every tensor is its own allocation and memcheck sees its
true bounds. Exit status: 0 if every call that ran matched, 1 otherwise, 2 without CUDA.
``--dry-run`` runs both steps on CPU with the reference backend, to check this script.
"""

from __future__ import annotations

import argparse
import sys

import torch

CASES = [
    # (name, n, c, h, w, k, r, stride, padding, groups, residual)
    ("dense3x3", 3, 32, 9, 11, 48, 3, 1, 1, 1, False),
    ("dense3x3-s2", 2, 64, 13, 13, 64, 3, 2, 1, 1, False),
    ("grouped-g32", 2, 128, 10, 9, 128, 3, 1, 1, 32, False),
    ("1x1-residual", 3, 64, 7, 7, 256, 1, 1, 0, 1, True),
]


def _inputs(case: tuple, training: bool, dev: torch.device, dtype: torch.dtype) -> dict:
    _, n, c, h, w, k, r, stride, padding, groups, has_res = case
    oh = (h + 2 * padding - r) // stride + 1
    ow = (w + 2 * padding - r) // stride + 1
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, offset=0.0, positive=False):
        t = torch.rand(*shape, generator=gen) if positive else torch.randn(*shape, generator=gen)
        return (t * scale + offset).to(dev)

    return {
        "x": rand(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last),
        "weight": rand(k, c // groups, r, r, scale=0.1).to(dtype),
        "bn_weight": rand(k, positive=True, offset=0.5),
        "bn_bias": rand(k),
        "running_mean": rand(k, scale=0.1),
        "running_var": rand(k, positive=True, offset=0.5),
        "residual": rand(n, k, oh, ow).to(dtype) if has_res else None,
        "kwargs": dict(training=training, stride=stride, padding=padding, groups=groups),
    }


def _call(backend: str, inp: dict) -> list[torch.Tensor]:
    """The fused op's output and, in training, the gradients of x, weight, γ and β (fp32, CPU)."""
    import fastres

    training = inp["kwargs"]["training"]
    leaves = [inp[k].detach().clone().requires_grad_(training)
              for k in ("x", "weight", "bn_weight", "bn_bias")]
    z = fastres.ops.conv_bn_relu(
        *leaves, inp["running_mean"].clone(), inp["running_var"].clone(),
        residual=inp["residual"], backend=backend, **inp["kwargs"])
    grads = torch.autograd.grad(z.float().square().sum(), leaves) if training else ()
    return [t.detach().float().cpu() for t in (z, *grads)]


def _labelled_cases(backend: str, dev: torch.device, dtype: torch.dtype):
    """``(label, inputs)`` of every case the backend serves (those it does not are reported)."""
    from fastres import backends
    from fastres.backends import CallInfo, ConvParams

    for case in CASES:
        name, n, c, h, w, k, r, stride, padding, groups, has_res = case
        for training in (False, True):
            label = f"{name}-{'train' if training else 'eval'}"
            call = CallInfo(device=dev, dtype=dtype, x_shape=(n, c, h, w),
                            weight_shape=(k, c // groups, r, r),
                            conv=ConvParams((stride, stride), (padding, padding), (1, 1), groups),
                            batch_stats=training, has_residual=has_res, act="relu")
            reason = backends.availability(backend, call)
            if reason is not None:
                print(f"  skip {label}: {reason}")
                continue
            yield label, _inputs(case, training, dev, dtype)


def expect(path: str, dev: torch.device, dtype: torch.dtype, under_test: str) -> int:
    """Save to ``path`` the inputs of every case ``under_test`` serves and the reference
    backend's outputs for them (CPU tensors)."""
    saved = {}
    for label, inp in _labelled_cases(under_test, dev, dtype):
        cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
        saved[label] = {"inputs": cpu, "outputs": _call("reference", inp)}
    torch.save(saved, path)
    print(f"sanitize_cuda: expected outputs of {len(saved)} calls in {path}")
    return 0


def check(path: str, dev: torch.device, backend: str) -> int:
    """Run ``backend`` on the saved inputs and compare with the saved outputs."""
    saved = torch.load(path)
    ran = bad = 0
    for label, entry in saved.items():
        inp = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v)
               for k, v in entry["inputs"].items()}
        got = _call(backend, inp)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ok = len(got) == len(entry["outputs"]) and all(
            torch.allclose(a, b, rtol=5e-2, atol=5e-2 * max(1.0, b.abs().max().item()))
            for a, b in zip(got, entry["outputs"])
        )
        ran += 1
        bad += not ok
        print(f"  {'ok  ' if ok else 'BAD '} {label}")
    print(f"sanitize_cuda: {ran} calls ran on the {backend} backend, {bad} mismatched")
    return 1 if bad or not ran else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step = parser.add_mutually_exclusive_group(required=True)
    step.add_argument("--expect", metavar="FILE", help="write inputs and expected outputs")
    step.add_argument("--check", metavar="FILE", help="run the cuda backend against FILE")
    step.add_argument("--dry-run", metavar="FILE", help="both steps on CPU (reference backend)")
    args = parser.parse_args(argv)
    if args.dry_run:
        cpu = torch.device("cpu")
        return (expect(args.dry_run, cpu, torch.float32, "reference")
                or check(args.dry_run, cpu, "reference"))
    if not torch.cuda.is_available():
        print("sanitize_cuda: no CUDA device")
        return 2
    from fastres import backends

    if backends.load("cuda") is None:
        print(f"sanitize_cuda: cuda backend not available: {backends.load_error('cuda')}")
        return 1
    dev = torch.device("cuda")
    if args.expect:
        return expect(args.expect, dev, torch.bfloat16, "cuda")
    return check(args.check, dev, "cuda")


if __name__ == "__main__":
    sys.exit(main())
