"""Plugins: code outside rise-edge that registers data sets, teachers, backends or methods.

A package declares an entry point in the group `rise_edge.plugins` whose object is a function taking
no arguments; rise-edge calls it once, the first time it looks a name up, and the function calls the
public register functions:

    # pyproject.toml of the plugin
    [project.entry-points."rise_edge.plugins"]
    my_cameras = "my_package.rise_edge_plugin:register"

    # my_package/rise_edge_plugin.py
    def register() -> None:
        from rise_edge.data import KnownDataset, register_dataset
        register_dataset("MyCameras", KnownDataset("my_cameras", ("day", "night"), ("car", "person")))

Register functions: rise_edge.data.register_dataset, rise_edge.train.teacher.register_teacher,
rise_edge.backends.register_backend, rise_edge.train.methods.register_method and
rise_edge.cli.register_command. timm models are registered with timm's own @register_model in the
plugin's module and named in recipes as usual.
"""

from __future__ import annotations

GROUP = "rise_edge.plugins"
_loaded = False


def load_plugins() -> list[str]:
    """Call every installed plugin's register function once; return their names."""
    global _loaded
    if _loaded:
        return []
    _loaded = True
    from importlib.metadata import entry_points

    from rise_edge.errors import UserError

    names = []
    for entry in entry_points(group=GROUP):
        try:
            entry.load()()
        except Exception as exc:  # a broken plugin must say which one, not crash with its traceback
            raise UserError(f"rise-edge plugin '{entry.name}' ({entry.value}) failed to register: "
                            f"{type(exc).__name__}: {exc}; fix or uninstall it") from None
        names.append(entry.name)
    return names
