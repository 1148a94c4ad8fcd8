"""One name, one meaning: a public name (`__all__`) of two kdbook modules is the same object in both
(a re-export), never two different functions or values that happen to share a name."""
import importlib
import pkgutil

import kdbook

# The interface every chapter module offers by contract, read by kdbook.costs and the build: the same meaning
# ("this chapter's ...") in each module, so the same name.
CHAPTER_PROTOCOL = {"CHAPTER", "PROFILE_SIZES", "profile_params", "gpu_plan"}


def public_names() -> dict:
    names = {}
    for info in pkgutil.walk_packages(kdbook.__path__, prefix="kdbook."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        mod = importlib.import_module(info.name)
        for name in getattr(mod, "__all__", []):
            names.setdefault(name, []).append((info.name, getattr(mod, name)))
    return names


def test_no_public_name_has_two_meanings():
    clashes = {}
    for name, where in public_names().items():
        if name in CHAPTER_PROTOCOL:
            continue
        objs = {id(obj): mod for mod, obj in where}
        if len(objs) > 1:
            clashes[name] = sorted(mod for mod, _ in where)
    assert not clashes, ("these public names are defined more than once with different meanings; rename one or "
                         f"re-export the other: {clashes}")
