"""The plugin manager: loads the ``pagedllm`` entry-point group and collects what it registers.

Built-in plugins are listed in our own pyproject.toml under ``[project.entry-points.pagedllm]``
exactly as a third-party package lists its own, so both load the same way.

``PAGEDLLM_PLUGINS`` limits what loads: a comma-separated list of entry-point names
(``torch_attention,fcfs_scheduler``) loads only those; names prefixed with ``-``
(``-my_plugin``) are excluded and everything else loads.  Unset or empty: everything loads.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from pagedllm import hookspecs

ENTRY_POINT_GROUP = "pagedllm"
PLUGINS_ENV = "PAGEDLLM_PLUGINS"

KINDS = ("attention", "scheduler", "quantization", "drafter", "model")
_HOOK_FOR_KIND = {
    "attention": "register_attention_backends",
    "scheduler": "register_schedulers",
    "quantization": "register_quantization_methods",
    "drafter": "register_speculative_drafters",
    "model": "register_model_architectures",
}


class PluginError(ValueError):
    """A plugin could not be found, loaded, or selected."""


@dataclass(frozen=True)
class PluginEntry:
    """One registered class, with where it came from."""

    kind: str
    name: str
    cls: Any
    plugin: str  # entry-point (or registration) name of the plugin that registered it
    package: str  # distribution that ships the plugin


@dataclass
class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    entries: dict[str, dict[str, PluginEntry]] = field(
        default_factory=lambda: {k: {} for k in KINDS}
    )

    def get(self, kind: str, name: str) -> PluginEntry:
        found = self.entries[kind].get(name)
        if found is None:
            installed = ", ".join(sorted(self.entries[kind])) or "(none)"
            raise PluginError(
                f"unknown {kind} plugin {name!r}; installed {kind} plugins: {installed}"
            )
        return found

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def all(self) -> list[PluginEntry]:
        return [e for kind in KINDS for e in self.entries[kind].values()]


def _selected(ep_name: str, spec: str | None) -> bool:
    if not spec or not spec.strip():
        return True
    names = [s.strip() for s in spec.split(",") if s.strip()]
    excluded = {n[1:] for n in names if n.startswith("-")}
    included = {n for n in names if not n.startswith("-")}
    if ep_name in excluded:
        return False
    return not included or ep_name in included


def make_plugin_manager(
    env: dict[str, str] | None = None,
) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A fresh plugin manager with every selected entry point of the group registered, and
    ``{plugin name: distribution name}`` for each."""
    env = os.environ if env is None else env
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    spec = env.get(PLUGINS_ENV)
    packages: dict[str, str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if not _selected(ep.name, spec) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        dist = getattr(ep, "dist", None)
        pm.register(module, name=ep.name)
        packages[ep.name] = dist.name if dist is not None else "?"
    return pm, packages


def build_registry(pm: pluggy.PluginManager, packages: dict[str, str]) -> Registry:
    """Call every registration hook once and index the results by kind and name."""
    registry = Registry()
    for kind, hook_name in _HOOK_FOR_KIND.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = pm.get_name(impl.plugin) or "?"
            result = impl.function()
            if result is None:
                continue
            items = result.items() if isinstance(result, dict) else (
                (cls.name, cls) for cls in result
            )
            for name, cls in items:
                previous = registry.entries[kind].get(name)
                if previous is not None and previous.cls is not cls:
                    raise PluginError(
                        f"{kind} plugin name {name!r} is registered twice: by "
                        f"{previous.plugin!r} and by {plugin_name!r}"
                    )
                registry.entries[kind][name] = PluginEntry(
                    kind, name, cls, plugin_name, packages.get(plugin_name, "?")
                )
    return registry


# The one piece of global mutable state the project allows: the loaded plugin registry.
_registry: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, built on first use (and again with ``reload=True``)."""
    global _registry
    if _registry is None or reload:
        _registry = build_registry(*make_plugin_manager())
    return _registry


def select(kind: str, name: str, **supports_kwargs: Any) -> PluginEntry:
    """Pick a plugin by name, or with ``name="auto"`` the highest-priority one that
    ``supports(**supports_kwargs)``."""
    registry = get_registry()
    if name != "auto":
        return registry.get(kind, name)
    candidates = []
    for entry in registry.entries[kind].values():
        supports = getattr(entry.cls, "supports", None)
        if supports is None or supports(**supports_kwargs):
            candidates.append(entry)
    if not candidates:
        installed = ", ".join(registry.names(kind)) or "(none)"
        raise PluginError(
            f"no installed {kind} plugin supports {supports_kwargs}; installed: {installed}"
        )
    best = max(candidates, key=lambda e: (getattr(e.cls, "priority", 0), e.name))
    print(f"pagedllm: {kind}='auto' picked {best.name!r} (from {best.package})", file=sys.stderr)
    return best
