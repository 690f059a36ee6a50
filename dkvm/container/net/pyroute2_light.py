"""Importing `pyroute2` runs its package __init__, which imports the whole library
(asyncio, NDB, IPDB, conntrack, ...): 0.3 s natively, on every container start. DKVM
needs a few of its modules; this lets them import without that __init__."""
import os
import sys
import types


def light_pyroute2():
    if "pyroute2" in sys.modules:
        return
    import importlib.util
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pyroute2 is not installed")
    package = types.ModuleType("pyroute2")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = os.path.join(package.__path__[0], "__init__.py")
    sys.modules["pyroute2"] = package
