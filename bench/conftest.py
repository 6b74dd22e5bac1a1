"""pytest-benchmark suites: ``pytest bench/ --benchmark-only``.

Separate from ``tests/`` (pyproject's testpaths is ``tests``): nothing here is collected by
``pytest tests/``, and this file does not touch the test configuration. Without a CUDA device the
suites run a tiny CPU configuration so that CI exercises them; its numbers say nothing about GPU
speed. Sizes and selections: see :mod:`fastres.benchmark.suite`.
"""

from __future__ import annotations

import pytest

from fastres.benchmark.suite import SuiteConfig, suite_config

_CONFIG: SuiteConfig | None = None
_CEILINGS = None


def config() -> SuiteConfig:
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = suite_config()
    return _CONFIG


def ceilings():
    """The card's ceilings, measured once per session (on first use)."""
    global _CEILINGS
    if _CEILINGS is None:
        from fastres.benchmark.runner import DTYPES
        from fastres.benchmark.timing import measure_ceilings

        cfg = config()
        _CEILINGS = measure_ceilings(cfg.device, DTYPES[cfg.dtype])
    return _CEILINGS


@pytest.fixture(scope="session")
def suite() -> SuiteConfig:
    return config()


@pytest.fixture(scope="session")
def card_ceilings():
    return ceilings()


def pytest_report_header(config):
    cfg = globals()["config"]()
    lines = [f"fastres bench: {cfg.device}, batch {cfg.batch}, {cfg.resolution}px, {cfg.dtype}"]
    if cfg.note:
        lines.append(f"NOTE: {cfg.note}")
    return lines


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-benchmark, absent without it
def pytest_benchmark_update_machine_info(config, machine_info):
    """Put the environment record and the card's ceilings in pytest-benchmark's JSON."""
    from fastres.benchmark.env import environment

    machine_info["fastres_environment"] = environment()
    machine_info["fastres_ceilings"] = ceilings().to_dict()
    note = globals()["config"]().note
    if note:
        machine_info["fastres_note"] = note


def pytest_terminal_summary(terminalreporter):
    note = config().note
    if note:
        terminalreporter.write_line(f"NOTE: {note}", yellow=True)
