"""How vLLM loads the plugin: its entry point, the architectures it registers (each on the class vLLM
would serve), the version gate.

Each check runs in a fresh interpreter: vLLM loads general plugins once per process."""
import subprocess
import sys

import pytest

import divprune_ext.vllm


def run(code: str, **env) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, **env))


def test_entry_point_is_in_the_installed_metadata():
    from importlib.metadata import entry_points
    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert found.get("divprune") == "divprune_ext.vllm:register"


def test_vllm_loads_it_and_serves_the_architectures_with_the_plugin_classes():
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins()\n"
            "from vllm import ModelRegistry\n"
            "import json; print(json.dumps({a: ModelRegistry._try_load_model_cls(a).__qualname__ for a in %r}))"
            % sorted(divprune_ext.vllm.SUPPORTED_ARCHITECTURES))
    done = run(code)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {a: target.split(":")[1] for a, target in divprune_ext.vllm.SUPPORTED_ARCHITECTURES.items()}


def test_vllm_plugins_empty_leaves_vllm_unpatched():
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins()\n"
            "from vllm import ModelRegistry\n"
            "print(ModelRegistry._try_load_model_cls('LlavaForConditionalGeneration').__module__)")
    done = run(code, VLLM_PLUGINS="")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "vllm.model_executor.models.llava"


def test_the_installed_vllm_is_in_the_supported_range():
    import vllm
    assert divprune_ext.vllm.is_supported(vllm.__version__), vllm.__version__


def outside_the_range():
    """Versions just below and at the first unsupported release, derived from SUPPORTED_VLLM."""
    (low_major, low_minor, _), (high_major, high_minor, high_patch) = divprune_ext.vllm.SUPPORTED_VLLM
    below = f"{low_major}.{low_minor - 1}.9" if low_minor else f"{low_major - 1}.99.0"
    return [below, f"{high_major}.{high_minor}.{high_patch}"]


def test_another_vllm_version_registers_nothing_and_says_so():
    """Outside the range the engine is not stopped: vLLM's own classes stay, a warning names the range."""
    for version in outside_the_range():
        code = ("import vllm; vllm.__version__ = %r\n"
                "from vllm.plugins import load_general_plugins; load_general_plugins()\n"
                "from vllm import ModelRegistry\n"
                "print(ModelRegistry._try_load_model_cls('Qwen2VLForConditionalGeneration').__module__)" % version)
        done = run(code)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == "vllm.model_executor.models.qwen2_vl"
        low, high = divprune_ext.vllm.SUPPORTED_VLLM
        span = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        assert f"divprune_ext's vLLM plugin supports vLLM {span}; installed: vLLM {version}" in done.stderr + done.stdout


def engine_config(**changes):
    """The parts of a VllmConfig that ``check_model_config`` reads, as vLLM names them."""
    from types import SimpleNamespace
    from vllm.config import CompilationConfig, LoRAConfig

    config = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace()),
                             compilation_config=CompilationConfig(), lora_config=None)
    for name, value in changes.items():
        if name == "enable_tower_connector_lora":
            config.lora_config = LoRAConfig(enable_tower_connector_lora=value)
        elif name == "cudagraph_mm_encoder":
            config.compilation_config = CompilationConfig(cudagraph_mm_encoder=value)
        else:
            setattr(config.model_config.hf_config, name, value)
    return config


@pytest.mark.parametrize("setting, value, message", [
    ("cudagraph_mm_encoder", True, "cudagraph_mm_encoder"),
    ("enable_tower_connector_lora", True, "enable_tower_connector_lora"),
    ("divprune_keep_ratio", 1.5, "divprune_keep_ratio"),
])
def test_engine_start_refuses_what_the_plugin_cannot_serve(setting, value, message):
    """Configurations under which the pruned items would be wrong are a ValueError naming the setting
    (vLLM's own config classes, so a renamed field fails here)."""
    from divprune_ext.vllm.core import check_model_config
    check_model_config(engine_config())  # the defaults pass
    check_model_config(engine_config(**{setting: not value if isinstance(value, bool) else 0.5}))
    with pytest.raises(ValueError, match=message):
        check_model_config(engine_config(**{setting: value}))

def test_each_plugin_class_sits_on_the_class_vllm_serves_unpatched():
    """Each architecture's plugin class subclasses the very class vLLM's registry loads without the
    plugin (vLLM 0.34 serves Qwen3.5 from a per-platform module: the plugin must follow it)."""
    code = ("from vllm import ModelRegistry\n"
            "from vllm.plugins import load_general_plugins\n"
            "architectures = %r\n"
            "plain = [ModelRegistry._try_load_model_cls(a) for a in architectures]\n"
            "load_general_plugins()\n"
            "ours = [ModelRegistry._try_load_model_cls(a) for a in architectures]\n"
            "print([o is not p and issubclass(o, p) and not p.__module__.startswith('divprune_ext') "
            "for o, p in zip(ours, plain)])" % sorted(divprune_ext.vllm.SUPPORTED_ARCHITECTURES))
    done = run(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str([True] * len(divprune_ext.vllm.SUPPORTED_ARCHITECTURES))


def test_qwen3_5_follows_vllm_0_34s_module_where_it_exists(monkeypatch):
    """vLLM 0.34's registry names ``vllm.models.qwen3_5`` for Qwen3.5, which gives other classes on
    CUDA (new code) than elsewhere: where that module exists, the plugin subclasses what it gives."""
    import importlib.machinery
    import importlib.util
    import os
    import types

    import vllm.model_executor.models.qwen3_5 as current
    from divprune_ext.vllm.core import MRoPEPruning
    try:  # vLLM 0.34: the classes its vllm.models.qwen3_5 gives on CUDA (they import on the CPU too)
        from vllm.models.qwen3_5.nvidia import model as cuda
    except ImportError:  # before 0.34: stand-ins
        cuda = None
    module = types.ModuleType("vllm.models.qwen3_5")  # stands for 0.34's module on CUDA
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        setattr(module, name, getattr(cuda, name) if cuda is not None else
                type(name, (getattr(current, name),), {"__module__": module.__name__}))
    monkeypatch.setitem(__import__("sys").modules, module.__name__, module)
    path = os.path.join(os.path.dirname(divprune_ext.vllm.__file__), "qwen3_5.py")
    spec = importlib.util.spec_from_file_location("divprune_ext.vllm.qwen3_5_again", path)  # a fresh copy
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    assert module.Qwen3_5ForConditionalGeneration in plugin.DivPruneQwen3_5.__mro__
    assert module.Qwen3_5MoeForConditionalGeneration in plugin.DivPruneQwen3_5Moe.__mro__
    for cls in (plugin.DivPruneQwen3_5, plugin.DivPruneQwen3_5Moe):  # the position code runs first there too
        for method in ("forward", "embed_input_ids", "get_mrope_input_positions", "embed_multimodal"):
            assert getattr(cls, method) is getattr(MRoPEPruning, method), (cls, method)
