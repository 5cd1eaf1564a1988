"""Shared fixtures: the tiny CPU configuration (``tests/tiny_runs.py``), a clean working directory, tolerances.

Tests take these instead of keeping their own copies: ``tiny_config(**overrides)`` for the Python API,
``tiny_args`` for the command-line entry points, ``tiny_yaml`` for a config file, ``workdir`` for a test
whose run writes RecBole's ``log/`` (it must not land in the checkout), ``tolerance`` for float32 comparisons.
"""

import pytest
from tiny_runs import TINY, tiny

# Two float32 computations of the same quantity that differ only in summation order.
FLOAT32 = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture
def tolerance():
    return dict(FLOAT32)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """``tmp_path`` as the working directory (RecBole writes ``log/`` and ``saved/`` there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_config(tmp_path):
    """``tiny_config(**overrides)``: the tiny config dict, checkpoints under ``tmp_path/saved``."""
    return lambda **overrides: tiny(tmp_path, **overrides)


@pytest.fixture
def tiny_args():
    """The tiny config as ``--key=value`` arguments (checkpoints go to ``saved/`` of the working directory)."""
    return [f"--{key}={value}" for key, value in TINY.items()]


@pytest.fixture
def tiny_yaml(tmp_path):
    """``tiny_yaml(**extra)``: a yaml file holding the tiny config plus ``extra``; returns its path."""

    def write(**extra):
        path = tmp_path / "tiny.yaml"
        path.write_text("".join(f"{key}: {value!r}\n" if isinstance(value, str) else f"{key}: {value}\n"
                                for key, value in {**TINY, **extra}.items()))
        return path

    return write
