"""The layering of docs/architecture.md, read from the code: every import statement of every module
(at the top or inside a function), parsed with `ast`, never imported.

    jobs -> pipelines -> udfs -> net -> schemas     (a layer may skip those below it)

net imports no pipelines, udfs or jobs; udfs no pipelines or jobs; schemas and world nothing of ours;
nothing imports a job. Our code is imported as capfilt.<sub> only (a bare `pipelines` is not installed).
"""
import ast

from tests.conftest import ROOT

# What each folder may import of ours, besides itself: the "may import" column of docs/architecture.md.
MAY_IMPORT = {
    "schemas": set(),
    "net": {"schemas"},
    "udfs": {"net", "schemas"},
    "pipelines": {"udfs", "net", "schemas"},
    "jobs": {"pipelines", "udfs", "net", "schemas", "world"},
    "world": set(),
    "lab": {"udfs", "net", "world"},
    "capfilt": set(),  # capfilt/__init__.py: finds the folders, imports none of them
}
# Narrower than the folder's rule: the only job that may import the shapes world.
WORLD_FROM_JOBS = {"jobs/demo.py"}
# Imports that break the rules and wait for a redesign: (module path, imported subpackage) -> why.
# Empty: udfs/decontaminate.py's worker_model moved down into udfs/models/cache.py. An entry that no
# longer breaks a rule fails the test, so the list cannot go stale.
ALLOWED: dict[tuple[str, str], str] = {}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in `source`, the source of the dotted `module`
    (relative imports resolved against its package; `from a import b` gives a and a.b: b may be a module)."""
    package = module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def imported_layers(path: str, source: str) -> set[tuple[int, str, bool]]:
    """(line, folder, bare) for each import of one of our folders in the file at `path` (relative to
    the repository root): bare when it is spelt `pipelines...` instead of `capfilt.pipelines...`."""
    module = "capfilt." + path.removesuffix(".py").replace("/", ".")
    ours = set(MAY_IMPORT) - {"capfilt"}
    found = set()
    for line, name in imported_modules(source, module):
        parts = name.split(".")
        if parts[0] in ours:
            found.add((line, parts[0], True))
        elif parts[0] == "capfilt" and len(parts) > 1 and parts[1] in ours:
            found.add((line, parts[1], False))
    return found


def violations(path: str, source: str) -> list[str]:
    """'path:line imports capfilt.<folder>' for each import in `source` (the file at `path`) that its
    folder's rule forbids, and each bare one."""
    layer = path.split("/")[0]
    out = []
    for line, target, bare in imported_layers(path, source):
        if bare:
            out.append(f"{path}:{line} imports {target} bare (spell it capfilt.{target})")
        elif target != layer and (path, target) not in ALLOWED and not (
                target in MAY_IMPORT[layer] and not (layer == "jobs" and target == "world" and path not in WORLD_FROM_JOBS)):
            out.append(f"{path}:{line} imports capfilt.{target}")
    return sorted(out)


def _modules():
    for layer in MAY_IMPORT:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path.relative_to(ROOT).as_posix(), path.read_text()


def test_every_code_folder_has_a_layer_rule():
    """A new top-level package folder must get a rule here (and a row in docs/architecture.md)."""
    assert {init.parent.name for init in ROOT.glob("*/__init__.py")} == set(MAY_IMPORT)


def test_each_module_imports_only_the_layers_below_it():
    found = [v for path, source in _modules() for v in violations(path, source)]
    assert found == [], "imports against docs/architecture.md's layers:\n" + "\n".join(found)


def test_the_allowlist_holds_only_imports_that_still_break_a_rule():
    modules = dict(_modules())
    for path, target in ALLOWED:
        assert target not in MAY_IMPORT[path.split("/")[0]], f"{path} may import {target}: drop it from ALLOWED"
        assert target in {t for _, t, _ in imported_layers(path, modules[path])}, \
            f"{path} no longer imports capfilt.{target}: drop it from ALLOWED"


def test_the_rules_catch_upward_relative_and_bare_imports():
    """The checker itself: a fetcher importing a stage or a udf, a udf importing a job from inside a
    function, a relative import climbing out of udfs/models into pipelines, a contract importing the
    fetcher, a bare folder name, a job other than the demo importing the shapes world."""
    assert violations("net/fetch.py", "from capfilt.pipelines.config import DownloadSettings\n") == [
        "net/fetch.py:1 imports capfilt.pipelines"]
    assert violations("net/fetch.py", "import capfilt.udfs.images\n") == ["net/fetch.py:1 imports capfilt.udfs"]
    assert violations("net/fetch.py", "from capfilt import udfs\n") == ["net/fetch.py:1 imports capfilt.udfs"]
    assert violations("udfs/images.py", "def f():\n    from capfilt.jobs import common\n") == [
        "udfs/images.py:2 imports capfilt.jobs"]
    assert violations("udfs/models/clip.py", "from ...pipelines import stage\n") == [
        "udfs/models/clip.py:1 imports capfilt.pipelines"]
    assert violations("schemas/records.py", "from capfilt.net import fetch\n") == [
        "schemas/records.py:1 imports capfilt.net"]
    assert violations("pipelines/stage.py", "import pipelines.config\n") == [
        "pipelines/stage.py:1 imports pipelines bare (spell it capfilt.pipelines)"]
    assert violations("jobs/curate.py", "from capfilt.world import corpus\n") == ["jobs/curate.py:1 imports capfilt.world"]
    # and lets through what the layers allow
    assert violations("udfs/models/clip.py", "from .refs import Reference\nfrom ..images import decode_image\n") == []
    assert violations("udfs/images.py", "from capfilt.net.fetch import normalise\n") == []
    assert violations("jobs/demo.py", "from capfilt.world import corpus\n") == []
    assert violations("pipelines/download.py", "from capfilt.net.polite import RETRYABLE_CODES\n") == []
