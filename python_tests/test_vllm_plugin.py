"""divprune_ext.vllm without vLLM: importing it costs nothing, its version gate and ratio checks.

The plugin's behaviour inside vLLM is tested in python_tests/vllm (scripts/vllm_env.sh)."""
import math
import subprocess
import sys

import pytest

import divprune_ext.vllm
from divprune_ext.vllm import is_supported, supported_range
from divprune_ext.vllm.core import check_ratio, default_ratio, ratios_from_bits, _ratio_bits


def test_importing_the_plugin_does_not_import_vllm():
    code = "import sys, divprune_ext, divprune_ext.vllm, divprune_ext.vllm.core; print('vllm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.32.0+cpu", "0.33.0", "0.33.2rc1", "0.34.0", "0.34.1+cu130"])
def test_supported_versions(version):
    assert is_supported(version)


@pytest.mark.parametrize("version", ["0.31.9", "0.35.0", "1.0.0", "0.10.2", "0.4.0"])
def test_other_versions_are_not(version):
    assert not is_supported(version)


def test_the_range_reads_as_pip_writes_it():
    assert supported_range() == ">=0.32.0,<0.35.0"


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), "0.5", True, None, [0.5]])
def test_bad_ratios_name_the_key_and_the_value(value):
    with pytest.raises(ValueError) as error:
        check_ratio(value)
    assert "divprune_keep_ratio" in str(error.value) and repr(value) in str(error.value)


@pytest.mark.parametrize("value", [1, 1.0, 0.5, 1e-6])
def test_good_ratios(value):
    assert check_ratio(value) == float(value)


def test_server_wide_default_comes_from_the_model_config():
    class Config:
        pass
    config = Config()
    assert default_ratio(config) == 1.0
    config.divprune_keep_ratio = 0.25
    assert default_ratio(config) == 0.25
    config.divprune_keep_ratio = 2
    with pytest.raises(ValueError, match="hf-overrides"):
        default_ratio(config)


def test_ratio_field_is_exact_whatever_the_value():
    ratios = [0.1, 1 / 3, 0.098, 1.0, 2.0 ** -40]
    bits = _ratio_bits(ratios[0], 1)
    assert bits.dtype.is_floating_point is False
    decoded = ratios_from_bits(__import__("torch").cat([_ratio_bits(r, 1) for r in ratios]))
    assert decoded == ratios and not any(math.isnan(r) for r in decoded)


def test_architectures_point_at_family_modules():
    for architecture, target in divprune_ext.vllm.SUPPORTED_ARCHITECTURES.items():
        module, cls = target.split(":")
        assert module.startswith("divprune_ext.vllm.") and cls.startswith("DivPrune")
