"""The plugin system: hook specs, entry-point discovery, selection, and a third-party plugin
package installed into the test environment and used by the engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pagedllm import hookspecs
from pagedllm.plugin_manager import (PluginError, build_registry, get_registry,
                                     make_plugin_manager, select)

from tiny_models import build_tiny_model

PLUGIN_SOURCE = '''
"""A throwaway third-party plugin: an attention backend that counts its calls."""
import os
from pagedllm import hookimpl
from pagedllm.plugins.attention.torch_backend import TorchAttentionBackend


class CountingBackend(TorchAttentionBackend):
    name = "counting"
    priority = -1
    calls = 0

    def forward(self, *args, **kwargs):
        CountingBackend.calls += 1
        return super().forward(*args, **kwargs)


@hookimpl
def register_attention_backends():
    return [CountingBackend]
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "pagedllm-counting"
version = "0.0.1"

[project.entry-points.pagedllm]
counting_attention = "pagedllm_counting"

[tool.setuptools]
py-modules = ["pagedllm_counting"]
'''

USE_IT = textwrap.dedent('''
    import json, sys
    from pagedllm import LLM, SamplingParams
    import pagedllm_counting
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": [11, 12, 13]}]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ours = LLM(model=sys.argv[1], attention_backend="counting", device="cpu")
    got = [o.outputs[0].token_ids for o in ours.generate(prompts, params, use_tqdm=False)]
    ref = LLM(model=sys.argv[1], attention_backend="torch", device="cpu")
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    print(json.dumps({"calls": pagedllm_counting.CountingBackend.calls, "same": got == want}))
''')


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "src"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "pagedllm_counting.py").write_text(PLUGIN_SOURCE)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(pkg)],
        check=True, capture_output=True, text=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(Path(__file__).parent),
                                         env.get("PYTHONPATH", "")])
    model_dir = root / "model"
    build_tiny_model("llama", model_dir)
    return env, model_dir


def run(args, env):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_engine_finds_and_uses_an_installed_third_party_backend(installed_plugin):
    env, model_dir = installed_plugin
    proc = run(["-c", USE_IT, str(model_dir)], env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["calls"] > 0
    assert result["same"]


def test_plugins_command_lists_the_third_party_plugin_with_its_package(installed_plugin):
    env, _ = installed_plugin
    proc = run(["-m", "pagedllm.cli", "plugins", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    found = {(r["kind"], r["name"], r["package"]) for r in rows}
    assert ("attention", "counting", "pagedllm-counting") in found
    assert ("attention", "torch", "pagedllm") in found


def test_environment_variable_keeps_a_plugin_out(installed_plugin):
    env, model_dir = installed_plugin
    env = dict(env, PAGEDLLM_PLUGINS="-counting_attention")
    code = ("from pagedllm import LLM\n"
            f"LLM(model={str(model_dir)!r}, attention_backend='counting')")
    proc = run(["-c", code], env)
    assert proc.returncode != 0
    assert "unknown attention plugin 'counting'" in proc.stderr
    assert "installed attention plugins: torch" in proc.stderr


def test_builtin_plugins_register_through_entry_points():
    registry = get_registry()
    assert "torch" in registry.names("attention")
    assert "fcfs" in registry.names("scheduler")
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        entry = registry.get("model", arch)
        assert entry.package == "pagedllm"
    assert registry.get("attention", "torch").plugin == "torch_attention"


def test_allow_list_loads_only_named_plugins():
    pm, packages = make_plugin_manager({"PAGEDLLM_PLUGINS": "fcfs_scheduler"})
    registry = build_registry(pm, packages)
    assert registry.names("scheduler") == ["fcfs"]
    assert registry.names("attention") == [] and registry.names("model") == []


def test_unknown_name_lists_installed_and_auto_picks_a_supported_backend():
    with pytest.raises(PluginError, match="unknown scheduler plugin 'nope'.*fcfs"):
        select("scheduler", "nope")
    import torch

    entry = select("attention", "auto", head_dim=64, dtype=torch.float32,
                   device=torch.device("cpu"))
    assert entry.cls.supports(head_dim=64, dtype=torch.float32, device=torch.device("cpu"))


def test_two_plugins_claiming_one_name_is_an_error():
    import pluggy

    class A:
        @hookspecs.hookimpl
        def register_schedulers(self):
            class S:
                name = "dup"
            return [S]

    class B(A):
        pass

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(A(), name="a")
    pm.register(B(), name="b")
    with pytest.raises(PluginError, match="registered twice"):
        build_registry(pm, {})


def test_every_hook_spec_has_a_contract_docstring():
    specs = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("register_")]
    assert len(specs) == 5
    for spec in specs:
        assert spec.__doc__ and "Called once" in spec.__doc__
