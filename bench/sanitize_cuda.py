"""A small run of the ``cuda`` backend for ``compute-sanitizer --tool memcheck``.

Runs a few fused calls (dense, grouped, 1×1 with residual; eval and training with backward) at
odd sizes on the cuda backend, skipping what it does not serve, and checks each against the
reference backend loosely (memcheck is the point; tests/ check numerics). Run it with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so every tensor is its own allocation and memcheck sees its
true bounds. Exit status: 0 if every call that ran matched, 1 otherwise, 2 without CUDA.
``--dry-run`` runs the same calls on CPU, reference against reference, to check this script.
"""

from __future__ import annotations

import sys

import torch

CASES = [
    # (name, n, c, h, w, k, r, stride, padding, groups, residual)
    ("dense3x3", 3, 32, 9, 11, 48, 3, 1, 1, 1, False),
    ("dense3x3-s2", 2, 64, 13, 13, 64, 3, 2, 1, 1, False),
    ("grouped-g32", 2, 128, 10, 9, 128, 3, 1, 1, 32, False),
    ("1x1-residual", 3, 64, 7, 7, 256, 1, 1, 0, 1, True),
]


def main(dry_run: bool = False) -> int:
    """``dry_run``: on CPU, the reference backend against itself (checks this script only)."""
    import fastres
    from fastres import backends
    from fastres.backends import CallInfo, ConvParams

    if dry_run:
        dev, dtype, under_test = torch.device("cpu"), torch.float32, "reference"
    else:
        if not torch.cuda.is_available():
            print("sanitize_cuda: no CUDA device")
            return 2
        if backends.load("cuda") is None:
            print(f"sanitize_cuda: cuda backend not available: {backends.load_error('cuda')}")
            return 0
        dev, dtype, under_test = torch.device("cuda"), torch.bfloat16, "cuda"
    ran, bad = 0, 0
    for name, n, c, h, w, k, r, stride, padding, groups, has_res in CASES:
        for training in (False, True):
            conv = ConvParams((stride, stride), (padding, padding), (1, 1), groups)
            oh, ow = conv.out_hw(h, w, r, r)
            call = CallInfo(device=dev, dtype=dtype, x_shape=(n, c, h, w),
                            weight_shape=(k, c // groups, r, r), conv=conv, batch_stats=training,
                            has_residual=has_res, relu=True)
            reason = backends.availability(under_test, call)
            label = f"{name}-{'train' if training else 'eval'}"
            if reason is not None:
                print(f"  skip {label}: {reason}")
                continue
            torch.manual_seed(0)
            x = torch.randn(n, c, h, w, device=dev, dtype=dtype).to(
                memory_format=torch.channels_last)
            wt = torch.randn(k, c // groups, r, r, device=dev, dtype=dtype) * 0.1
            gamma = torch.rand(k, device=dev) + 0.5
            beta = torch.randn(k, device=dev)
            res = torch.randn(n, k, oh, ow, device=dev, dtype=dtype) if has_res else None
            mean = torch.randn(k, device=dev) * 0.1
            var = torch.rand(k, device=dev) + 0.5
            outs = []  # by position: under_test and "reference" may be the same name (--dry-run)
            for backend in (under_test, "reference"):
                leaves = [t.detach().clone().requires_grad_(training) for t in (x, wt, gamma,
                                                                                  beta)]
                z = fastres.ops.conv_bn_relu(
                    leaves[0], leaves[1], leaves[2], leaves[3], mean.clone(), var.clone(),
                    training=training,
                    stride=stride, padding=padding, groups=groups, residual=res,
                    backend=backend)
                grads = torch.autograd.grad(z.float().square().sum(), leaves) if training else ()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                outs.append((z.float(), *[g.float() for g in grads]))
            ok = all(
                torch.allclose(a, b, rtol=5e-2, atol=5e-2 * max(1.0, b.abs().max().item()))
                for a, b in zip(*outs)
            )
            ran += 1
            bad += not ok
            print(f"  {'ok  ' if ok else 'BAD '} {label}")
    print(f"sanitize_cuda: {ran} calls ran on the {under_test} backend, {bad} mismatched")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(dry_run="--dry-run" in sys.argv))
