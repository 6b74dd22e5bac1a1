"""The kernel report's parts, without compiling: launch-time specialisation as Triton's JIT does
it, the SASS reading, the occupancy arithmetic, the rules, and the autotuner's pruning of the
configurations the report found spilling. (The compile itself: test_triton_compile.py.)"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import triton

from fastres.analysis import kernel_report, sass
from fastres.analysis.compile import MODULES, TARGETS, family, launch_source, representative
from fastres.backends import devices

COMMITTED = Path(__file__).resolve().parents[2] / "bench" / "kernel_report.json"
from fastres.backends.triton import _tuning
from fastres.backends.triton import bn as tbn
from fastres.backends.triton import conv as tconv
from fastres.backends.triton import conv_bwd as tconv_bwd


def _all_specs():
    return [*tconv.compile_specs(), *tbn.compile_specs(), *tconv_bwd.compile_specs()]


def _specs_with_classes():
    return [s for s in _all_specs() if s.ints is not None]


def test_launch_source_specialises_as_the_jit_does():
    """Integers equal to 1 become constants, multiples of 16 and pointers get divisibility 16:
    exactly what triton's own launch-time specialisation gives for the same values."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    aligned = torch.empty(8, dtype=torch.float32)  # torch allocations are 16-byte aligned
    seen = set()
    for spec in _specs_with_classes():
        signature, constexprs, attrs = launch_source(spec)
        for name, ty in spec.signature.items():
            value = aligned if ty.startswith("*") else spec.ints.get(name, 0.5)
            kind, flag = native_specialize_impl(BaseBackend, value, False, True, True)
            index = (spec.kernel.arg_names.index(name),)
            if kind == "constexpr":
                assert name not in signature and constexprs[name] == value, (spec.name, name)
            else:
                assert signature[name] == spec.signature[name], (spec.name, name)
                divisible = attrs.get(index) == [["tt.divisibility", 16]]
                assert divisible == (flag == "D"), (spec.name, name, value)
            seen.add(kind if kind == "constexpr" else flag or "plain")
    assert seen == {"constexpr", "D", "plain"}  # every outcome occurs in the shape classes


def test_unspecialised_specs_compile_the_plain_signature():
    plain = [s for s in _all_specs() if s.ints is None]
    kernels = {s.kernel for s in plain}
    # conv gemm and direct; every BN kernel; dgrad gemm and direct, wgrad gemm and direct, the
    # wgrad chunk sum
    assert len(kernels) == 2 + 10 + 5
    for spec in plain:
        assert launch_source(spec) == (spec.signature, spec.constexprs, {})


_SASS = """
        code for sm_90a
                Function : kernel_a
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 LDGSTS.E.BYPASS.LTC128B.128 [R9], desc[UR14][R2.64] ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0030*/                   STL.64 [R1], R4 ;
        /*1a40*/             @UP0 STL [R1+0x8], R6 ;
        /*1a50*/                   STL.U8 [R1+0xc], R7 ;
                Function : kernel_b
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
                Function : kernel_c
        /*0000*/                   UTMALDG.2D [UR8], [UR14] ;
        /*0010*/              @UP0 UTCHMMA gdesc[UR16], gdesc[UR18], tmem[UR6], idesc[UR23], UPT ;
        /*0020*/                   UTCBAR [UR10], URZ ;
"""


def test_sass_instruction_census():
    ops = sass._sass_by_function(_SASS)
    assert ops["kernel_a"]["STL_BYTES"] == 8 + 4 + 1
    usage = ("x", "40", "16", "0", "0")
    a = sass._stats(usage, ops["kernel_a"])
    assert (a.mma, a.g2s, a.spill_store_bytes, a.local_bytes) == ("HGMMA", "LDGSTS", 13, 16)
    b = sass._stats(usage, ops["kernel_b"])
    assert (b.mma, b.g2s, b.spill_store_bytes) == ("HMMA", "plain", 0)
    c = sass._stats(usage, ops["kernel_c"])  # sm_100a: tcgen05 MMA fed by TMA
    assert (c.mma, c.g2s) == ("UTCHMMA", "UTMALDG")


@pytest.mark.parametrize("cc, regs, shared, threads, want", [
    (90, 255, 98304, 256, 8 / 64),  # registers allow one 8-warp block
    (90, 128, 33792, 128, 16 / 64),  # 16384 registers per block: 4 blocks
    (80, 64, 0, 128, 32 / 64),  # 8 blocks of 4 warps
    (80, 32, 100000, 128, 4 / 64),  # shared memory: one block per SM
    (90, 32, 116224, 128, 4 / 64),  # half the SM's shared memory, plus 1 KiB reserved per block
    (90, 32, 0, 64, 32 * 2 / 64),  # the 32-block limit
    (80, 40, 170000, 128, 0.0),  # more shared memory than a block may have
    (89, 32, 0, 128, 48 / 48),  # 48 warps per SM on sm_89: 12 blocks of 4
    (89, 32, 100000, 128, 4 / 48),  # 100 KB per SM: one block
    (120, 32, 102000, 128, 0.0),  # over the 99 KB per block of sm_120 (fits on sm_100)
    (100, 32, 102000, 128, 8 / 64),  # 228 KB per SM: two blocks
])
def test_occupancy(cc, regs, shared, threads, want):
    assert sass.occupancy(cc, regs, shared, threads) == want


def _row(**kw):
    row = dict(status="ok", module="conv", pruned=None, shape_class="3x3s2", target="sm_90",
               tensor_cores=True, local_bytes=0, spill_store_bytes=0, occupancy=0.125, shared=0,
               mma="HGMMA", g2s="LDGSTS", ptx_max_f32=False)
    row.update(kw)
    return row


def test_rules():
    assert kernel_report.triton_violations(_row()) == []
    assert kernel_report.triton_violations(_row(target="sm_80", mma="HMMA")) == []
    assert kernel_report.triton_violations(_row(g2s="UTMALDG")) == []
    # each target's own tensor-core instruction (its device class's); sm_100 also takes HMMA
    for target, good, bad in (("sm_89", ("HMMA",), ("HGMMA", "UTCHMMA", "none")),
                              ("sm_120", ("HMMA",), ("HGMMA", "UTCHMMA", "none")),
                              ("sm_100", ("UTCHMMA", "HMMA"), ("HGMMA", "none")),
                              ("sm_90", ("HGMMA",), ("HMMA", "UTCHMMA"))):
        for mma in good:
            assert kernel_report.triton_violations(_row(target=target, mma=mma)) == [], target
        for mma in bad:
            assert kernel_report.triton_violations(_row(target=target, mma=mma)), (target, mma)
    # shared memory against that target's own limit per block (99 KB on sm_89 / sm_120)
    big = dict(shared=150 * 1024, occupancy=0.0, mma="HMMA")
    for target in ("sm_89", "sm_120"):
        found = kernel_report.triton_violations(_row(target=target, **big))
        assert found == ["150.0 KB of shared memory, over the 99 KB per block of " + target]
    assert kernel_report.triton_violations(_row(target="sm_80", **{**big, "occupancy": 0.1})) == []
    assert kernel_report.triton_violations(_row(target="sm_89", pruned="too big", **big)) == []
    for bad in (dict(local_bytes=8, spill_store_bytes=8), dict(occupancy=0.0),
                dict(mma="HMMA"), dict(mma="none"), dict(g2s="plain"),
                dict(status="FAILED CompilationError: x")):
        assert kernel_report.triton_violations(_row(**bad)), bad
    # not held to the rules: pruned, unspecialised, not a tensor-core kernel (but it may not spill)
    assert kernel_report.triton_violations(_row(pruned="spills", local_bytes=8)) == []
    assert kernel_report.triton_violations(_row(shape_class="unspecialised", g2s="plain")) == []
    assert kernel_report.triton_violations(_row(tensor_cores=False, mma="none")) == []
    assert kernel_report.triton_violations(_row(tensor_cores=False, local_bytes=8))
    # a NaN-dropping max in a conv kernel, whatever its shape class; BN kernels take maxima
    for where in (dict(), dict(shape_class="unspecialised"), dict(pruned="spills")):
        assert kernel_report.triton_violations(_row(ptx_max_f32=True, **where))
    assert kernel_report.triton_violations(_row(module="bn", ptx_max_f32=True)) == []
    assert kernel_report.NAN_DROPPING_MAX.search("max.f32 %f1, %f2, 0f00000000;")
    assert not kernel_report.NAN_DROPPING_MAX.search("max.NaN.f32 %f1, %f2, 0f00000000;")
    assert kernel_report.cuda_violations(dict(local_bytes=0, spill_store_bytes=0)) == []
    assert kernel_report.cuda_violations(dict(local_bytes=16, spill_store_bytes=0))


def test_autotuner_never_offers_a_tile_that_spills_there(monkeypatch):
    """The tiles the report found spilling are pruned for their dtype and target only."""
    assert tconv._gemm.prune is tconv._prune_gemm
    assert tconv._direct.prune is tconv._prune_direct
    # (the sm_90 TMA tiles, pruned without a conv geometry here: test_triton_tma.py)
    plain = [c for c in tconv.GPU_GEMM_CONFIGS if not c.kwargs.get("TMA")]
    big = [c for c in plain if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128**2]
    nargs = {"Kg": 256, "Cg": 256}
    # 128x128 tiles (BLOCK_K 32, 64) offered: fp32 spills on sm_90 and sm_100, and with BLOCK_K
    # 64 on sm_80 too; sm_89 / sm_120 spill with 32 and lack the shared memory for 64
    for cc, dtype, offered in ((90, torch.float32, (False, False)),
                               (80, torch.float32, (True, False)),
                               (100, torch.float32, (False, False)),
                               (89, torch.float32, (False, False)),
                               (90, torch.bfloat16, (True, True)),
                               (100, torch.bfloat16, (True, True))):
        monkeypatch.setattr(_tuning, "target", lambda x, cc=cc: cc)
        x = torch.empty(1, dtype=dtype)
        kept = tconv._prune_gemm(tconv.GPU_GEMM_CONFIGS, {**nargs, "x_ptr": x})
        assert tuple(c in kept for c in big) == offered, (cc, dtype)
        # besides the 128x128 tiles, one or two more fp32 tiles per target spill (TF32 rounding)
        assert len(kept) >= len(plain) - len(big) - 2 * (dtype == torch.float32)
    monkeypatch.setattr(_tuning, "target", lambda x: 90)
    # the direct bf16 128x64 tile spills with the statistics and the eval epilogue together only
    full = dict(STATS=True, HAS_AFFINE=True, HAS_RES=True)
    for dtype, flags, dropped in ((torch.bfloat16, full, {(128, 64)}), (torch.bfloat16, {}, set()),
                                  (torch.bfloat16, dict(STATS=True), set()),
                                  (torch.float16, full, set())):
        x = torch.empty(1, dtype=dtype)
        kept = tconv._prune_direct(tconv.GPU_DIRECT_CONFIGS, {"K": 256, "x_ptr": x}, **flags)
        tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tconv.GPU_DIRECT_CONFIGS
                 if c not in kept}
        assert tiles == dropped, (dtype, flags)
    # and the compile specs carry the same verdict, so the report knows what may be picked
    specs = {s.name: s for s in tconv.compile_specs()}
    name = f"conv_gemm-float32-all-{tconv._cfg_name(big[0])}-3x3s2"
    assert set(specs[name].pruned) == {89, 90, 100, 120}


def test_bn_backward_never_offers_a_tile_that_spills_there(monkeypatch):
    """fp32 tiles of 8 elements per thread spill on sm_80 / sm_89: not offered there, for that
    BLOCK_K; the reduction's fp16/bf16 8-per-thread tile on sm_100 for the flags it spills with."""
    assert tbn._bn_bwd_dx_kernel.prune is tbn._prune_bwd_dx
    configs = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in tbn._ELEMENTWISE_BLOCKS]
    for cc, dtype, block_k, dropped in ((80, torch.float32, 64, [(16, 4)]),
                                        (80, torch.float32, 16, [(64, 4), (128, 8)]),
                                        (89, torch.float32, 64, [(16, 4)]),
                                        (90, torch.float32, 64, []), (80, torch.bfloat16, 64, [])):
        monkeypatch.setattr(_tuning, "target", lambda x, cc=cc: cc)
        kept = tbn._prune_bwd_dx(configs, {"dz_ptr": torch.empty(1, dtype=dtype)}, BLOCK_K=block_k)
        got = [(c.kwargs["BLOCK_M"], c.num_warps) for c in configs if c not in kept]
        assert got == dropped, (cc, dtype, block_k)


def test_report_targets_are_the_device_classes_with_tensor_cores():
    """sm_86 runs sm_80's code path with sm_89's limits: sm_89 stands for both."""
    assert set(TARGETS) == {t for t in devices.TARGETS if devices.for_target(t).tensor_cores} - {86}
    for cc in TARGETS:  # the occupancy arithmetic knows each, and the block limit is the class's
        limit = devices.for_target(cc).smem_per_block
        assert sass.ARCHS[cc].smem_sm >= sass.smem_limit(cc) == limit


def test_representative_specs_are_one_per_family_and_offered_where_any_is():
    for module in MODULES:
        specs = importlib.import_module(module).compile_specs()
        families = {family(s) for s in specs}
        for cc in TARGETS:
            chosen = representative(specs, cc)
            assert sorted({family(specs[i]) for i in chosen}) == sorted(families)
            assert len(chosen) == len(families) < len(specs)
            for i in chosen:
                offered = [s for s in specs if family(s) == family(specs[i])
                           and s.ints is not None and cc not in s.pruned]
                # the first configuration a launch without autotuning would try, if any is offered
                assert specs[i] is (offered[0] if offered else next(
                    s for s in specs if family(s) == family(specs[i]))), (cc, specs[i].name)
    names = {family(s) for s in tconv.compile_specs()}
    assert {"conv_gemm-bfloat16-train", "conv_gemm_flat-float32-prologue",
            "conv_direct-float16-eval"} <= names


def test_committed_report_covers_every_target_without_violations():
    """CI fails on a violation in a selectable configuration of any target: the committed report
    (regenerated by hand, all targets; test_triton_compile.py compiles a subset of it again) holds
    every spec for each fully compiled target and at least the representative ones for the
    others, each judged by today's rules and pruning tables, and none breaks them."""
    report = json.loads(COMMITTED.read_text())
    assert report["targets"] == [f"sm_{cc}" for cc in TARGETS]
    subset = set(report["representative_targets"])
    assert subset <= {"sm_89", "sm_100", "sm_120"}  # sm_80 and sm_90 always in full
    rows = {(r["module"], r["spec"], r["target"]): r for r in report["triton_kernels"]}
    for module in MODULES:
        short = module.rsplit(".", 1)[-1]
        specs = importlib.import_module(module).compile_specs()
        for cc in TARGETS:
            target = f"sm_{cc}"
            want = representative(specs, cc) if target in subset else range(len(specs))
            for i in want:
                row = rows.get((short, specs[i].name, target))
                assert row is not None, f"bench/kernel_report.json lacks {specs[i].name} {target}"
                # judged with the autotuner's verdict of today (a table entry pruning it or not)
                now = {**row, "pruned": specs[i].pruned.get(cc)}
                assert kernel_report.triton_violations(now) == [], (
                    specs[i].name, target, kernel_report.triton_violations(now))
    for row in rows.values():
        assert row["status"] == "ok", (row["spec"], row["target"], row["status"])
        assert row["violations"] == [], (row["spec"], row["target"], row["violations"])
    assert not any(r["violations"] for r in report["cuda_kernels"])


def test_backward_pruner_falls_back_to_a_tile_that_fits(monkeypatch):
    """fp32 dgrad on sm_120: every tile lacks the 99 KB of shared memory but 64x64x32, which
    spills 16 bytes there; it is still what runs (a spill is slower, a tile that does not fit
    cannot launch). sm_89 has it clean."""
    x = torch.empty(1, dtype=torch.float32)
    for cc in (120, 89):
        monkeypatch.setattr(_tuning, "target", lambda t, cc=cc: cc)
        kept = tconv_bwd._prune_dgrad(tconv_bwd.GPU_DGRAD_GEMM_CONFIGS,
                                      {"dz_ptr": x, "Cg": 256, "Kg": 256})
        assert [tuple(c.kwargs.values()) for c in kept] == [(64, 64, 32)], cc

    configs = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in tbn._REDUCE_BLOCKS]
    relu_center_dres = dict(RELU=True, CENTER=True, WRITE_DRES=True, SECOND=False)
    gated_input = dict(CENTER=True, BRANCH_SCALE=True, BRANCH_ADD=True, PER_CHANNEL_SCALE=True,
                       ACT_MASK=True)
    for cc, dtype, flags, dropped in ((100, torch.float16, relu_center_dres, [(16, 4)]),
                                      (100, torch.float16, dict(RELU=True), []),
                                      (90, torch.float16, relu_center_dres, []),
                                      (100, torch.bfloat16, dict(RELU=True), [(16, 4)]),
                                      # a gate on a conv's input: ACT_MASK keys the table
                                      (100, torch.float16, gated_input, [(16, 4)]),
                                      (100, torch.float16, dict(CENTER=True), []),
                                      (90, torch.float16, gated_input, [])):
        monkeypatch.setattr(_tuning, "target", lambda x, cc=cc: cc)
        kept = tbn._prune_bwd_reduce(configs, {"dz_ptr": torch.empty(1, dtype=dtype)},
                                     BLOCK_K=64, **flags)
        got = [(c.kwargs["BLOCK_M"], c.num_warps) for c in configs if c not in kept]
        assert got == dropped, (cc, dtype, flags)
