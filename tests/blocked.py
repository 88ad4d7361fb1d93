"""A preamble for subprocess scripts that must run where a package cannot be imported (tests only)."""


def blocked(package: str = "hf_mlpfusion") -> str:
    """Python source that makes `import <package>` (and its submodules) fail in the running process."""
    return f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {package!r} or name.startswith({package + "."!r}):
            raise ImportError({package + " is blocked in this process"!r})
sys.meta_path.insert(0, Block())
"""
