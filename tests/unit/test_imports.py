"""The import-layering checker (tsvae_dist.tools.imports) on small fake trees, and on the real repository."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tsvae_dist.tools.imports import FLOORS, check, collect, main

REPO_ROOT = Path(__file__).resolve().parents[2]

# A clean fake tree: every import goes to its own unit or a lower floor, stages share code only via _common,
# and shards imports tsvae_dist (allowed), never the reverse.
CLEAN = {
    "tsvae_dist/__init__.py": '"""Fake package."""\n',
    "tsvae_dist/errors.py": "class E(Exception): ...\n",
    "tsvae_dist/storage.py": "import os\n\nfrom tsvae_dist.errors import E\n",
    "tsvae_dist/data/__init__.py": "",
    "tsvae_dist/data/loader.py": "from .. import storage\nfrom . import util\nfrom .util import helper\n",
    "tsvae_dist/data/util.py": "def helper(): ...\n",
    "tsvae_dist/models/__init__.py": "",
    "tsvae_dist/models/net.py": "import torch.nn\n",
    "tsvae_dist/config.py": "import numpy\n\nfrom tsvae_dist.data import loader\nfrom tsvae_dist.models import net\n",
    "tsvae_dist/stages/__init__.py": "",
    "tsvae_dist/stages/_common.py": "from tsvae_dist import config\n",
    "tsvae_dist/stages/a.py": "from tsvae_dist.stages._common import config\n",
    "tsvae_dist/stages/b.py": "from . import _common\n",
    "tsvae_dist/cli.py": "from tsvae_dist.stages import a, b\n",
    "tsvae_dist/stage1.py": "from tsvae_dist.cli import main\n",
    "shards/__init__.py": "",
    "shards/__main__.py": "from shards import writer\nfrom tsvae_dist import storage\n",
    "shards/writer.py": "from tsvae_dist.errors import E\n",
}
TYPE_CHECKING_IMPORT = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    {}\n"


def tree(tmp_path: Path, changes: dict[str, str] | None = None) -> Path:
    """Write CLEAN, with some files replaced or added, under tmp_path."""
    for rel, text in {**CLEAN, **(changes or {})}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    return tmp_path


def messages(root: Path, **kwargs) -> list[str]:
    return [str(v) for v in check(root, **kwargs)]


def test_clean_tree_has_no_violations_and_exits_0(tmp_path, capsys):
    root = tree(tmp_path)
    assert check(root) == []
    assert main(["--root", str(root)]) == 0
    assert capsys.readouterr().out == "imports: 15 modules, 0 violations\n"


def test_relative_imports_and_from_imports_are_resolved(tmp_path):
    root = tree(tmp_path, {"tsvae_dist/data/__init__.py": "from .loader import thing\nfrom . import not_a_module\n"})
    graph = collect(root)
    direct = {(e.src, e.dst) for e in graph.edges if not e.via}
    assert {
        ("tsvae_dist.data.loader", "tsvae_dist.storage"),  # from .. import storage: a module
        ("tsvae_dist.data.loader", "tsvae_dist.data.util"),  # from . import util / from .util import helper
        ("tsvae_dist.stages.b", "tsvae_dist.stages._common"),  # from . import _common
        ("tsvae_dist.stages.a", "tsvae_dist.stages._common"),  # from pkg.mod import name: the module
        ("tsvae_dist.config", "tsvae_dist.data.loader"),  # from pkg import mod: the submodule
        ("tsvae_dist.data", "tsvae_dist.data.loader"),  # from .loader import thing, in a package __init__
    } <= direct
    assert not [dst for src, dst in direct if src == "tsvae_dist.data" and dst != "tsvae_dist.data.loader"]
    assert {e.dst for e in graph.external if e.src == "tsvae_dist.config"} == {"numpy"}  # os is stdlib
    implied = {(e.src, e.dst, e.via) for e in graph.edges if e.via}
    assert ("tsvae_dist.config", "tsvae_dist.data", "tsvae_dist.data.loader") in implied  # its __init__ runs
    assert not [src for src, _, _ in implied if src.startswith("tsvae_dist.data.")]  # not the importer's ancestors


def test_relative_import_above_the_package_is_reported(tmp_path):
    root = tree(tmp_path, {"tsvae_dist/errors.py": "from .. import elsewhere\n"})
    assert messages(root) == ["tsvae_dist/errors.py:1: relative import goes above the tsvae_dist package"]


def test_cycle_through_a_function_local_import(tmp_path):
    root = tree(tmp_path, {"tsvae_dist/data/util.py": """\
        def helper():
            from tsvae_dist.data.loader import thing
        """})
    assert messages(root) == [
        "tsvae_dist/data/loader.py:2: import cycle: tsvae_dist.data.loader (line 2) -> "
        "tsvae_dist.data.util (line 2, in a function) -> tsvae_dist.data.loader"
    ]


def test_cycle_through_a_package_init_under_type_checking(tmp_path):
    # storage only names data.util, but importing it runs data/__init__, which imports loader, which imports storage
    root = tree(tmp_path, {
        "tsvae_dist/storage.py": TYPE_CHECKING_IMPORT.format("from tsvae_dist.data.util import helper"),
        "tsvae_dist/data/__init__.py": "from tsvae_dist.data.loader import thing\n",
    })
    cycles = [m for m in messages(root) if "import cycle" in m]
    assert cycles == [
        "tsvae_dist/data/__init__.py:1: import cycle: tsvae_dist.data (line 1) -> tsvae_dist.data.loader (line 1) -> "
        "tsvae_dist.storage (line 4, under TYPE_CHECKING, via tsvae_dist.data.util) -> tsvae_dist.data"
    ]


def test_upward_import_even_function_local(tmp_path, capsys):
    # a module nothing imports (else this would close a cycle through config)
    root = tree(tmp_path, {"tsvae_dist/models/extra.py": "import torch\n\ndef build():\n    from ..stages import a\n"})
    expected = (
        "tsvae_dist/models/extra.py:4: tsvae_dist.models.extra (models, floor 2) imports tsvae_dist.stages.a "
        "(stages, floor 6), on a higher floor: import only your own unit or lower floors"
    )
    assert messages(root) == [expected]
    assert main(["--root", str(root)]) == 1
    assert capsys.readouterr().out == f"{expected}\nimports: 16 modules, 1 violations\n"


def test_same_floor_cross_unit_import(tmp_path):
    root = tree(tmp_path, {"tsvae_dist/data/util.py": "from tsvae_dist.models.net import Net\n"})
    assert messages(root) == [
        "tsvae_dist/data/util.py:1: tsvae_dist.data.util (data, floor 2) imports tsvae_dist.models.net "
        "(models, floor 2), on the same floor (another unit): import only your own unit or lower floors"
    ]


def test_unit_without_a_floor_is_reported_once_and_floors_are_editable(tmp_path):
    root = tree(tmp_path, {
        "tsvae_dist/misc/__init__.py": "",
        "tsvae_dist/misc/x.py": "from tsvae_dist.misc import y\nfrom tsvae_dist import errors\n",
        "tsvae_dist/misc/y.py": "",
    })
    assert messages(root) == [
        "tsvae_dist/misc/__init__.py:1: unit misc has no floor in FLOORS (tsvae_dist/tools/imports.py)"
    ]
    assert check(root, floors=(*FLOORS, ("misc",))) == []


def test_package_init_may_import_nothing_from_the_project(tmp_path):
    root = tree(tmp_path, {"tsvae_dist/__init__.py": "from tsvae_dist.errors import E\n"})
    assert messages(root) == [
        "tsvae_dist/__init__.py:1: tsvae_dist imports tsvae_dist.errors: tsvae_dist/__init__.py may import nothing "
        "from the project"
    ]


def test_tsvae_dist_must_not_import_shards(tmp_path):
    root = tree(tmp_path, {"tsvae_dist/storage.py": "def write():\n    from shards.writer import finish\n"})
    assert messages(root) == [
        "tsvae_dist/storage.py:2: tsvae_dist.storage imports shards.writer: tsvae_dist must not import the shards CLI "
        "(only shards may import tsvae_dist)"
    ]


def test_stage_modules_never_import_each_other(tmp_path):
    root = tree(tmp_path, {"tsvae_dist/stages/b.py": "from . import _common\nfrom tsvae_dist.stages import a\n"})
    assert messages(root) == [
        "tsvae_dist/stages/b.py:2: stage module tsvae_dist.stages.b imports stage module tsvae_dist.stages.a: "
        "stages never import each other (share code via a stages._private module)"
    ]


def test_forbid_torch_catches_a_transitive_module_level_import(tmp_path, capsys):
    root = tree(tmp_path)
    expected = (
        "tsvae_dist/models/net.py:1: tsvae_dist.cli imports torch at module level: tsvae_dist.cli -> "
        "tsvae_dist.stages.a -> tsvae_dist.stages._common -> tsvae_dist.config -> tsvae_dist.models.net, "
        "which imports torch.nn"
    )
    assert messages(root, forbid_torch=["tsvae_dist.cli"]) == [expected]
    assert main(["--root", str(root), "--forbid-torch", "tsvae_dist.cli", "--forbid-torch", "tsvae_dist.errors"]) == 1
    assert capsys.readouterr().out == f"{expected}\nimports: 15 modules, 1 violations\n"
    with pytest.raises(SystemExit) as exc:
        main(["--root", str(root), "--forbid-torch", "tsvae_dist.nope"])
    assert exc.value.code == 2


def test_forbid_torch_ignores_function_local_and_type_checking_imports(tmp_path):
    root = tree(tmp_path, {
        "tsvae_dist/data/util.py": TYPE_CHECKING_IMPORT.format("import torch") + "\ndef helper():\n    import torch\n",
        "tsvae_dist/data/loader.py": "from .. import storage\nfrom . import util\n\n"
                                     "def load():\n    import torch\n",
    })
    assert check(root, forbid_torch=["tsvae_dist.data.loader"]) == []
    # ...but a module-level torch import in a package __init__ that importing the module runs does count
    (root / "tsvae_dist/data/__init__.py").write_text("import torch\n")
    assert messages(root, forbid_torch=["tsvae_dist.data.loader"]) == [
        "tsvae_dist/data/__init__.py:1: tsvae_dist.data.loader imports torch at module level: "
        "tsvae_dist.data.loader -> tsvae_dist.data, which imports torch"
    ]


def test_real_repository_has_no_violations():
    violations = check(Path(__file__).resolve().parents[2])
    assert violations == [], "\n".join(map(str, violations))


@pytest.mark.integration  # starts processes
def test_the_launcher_loads_neither_torch_nor_the_fid_network(tmp_path):
    """`launch/submit.py action=dry_run`, run as the user runs it, imports no torch and no Inception network."""
    probe = ("import atexit, runpy, sys\n"
             "atexit.register(lambda: print('loaded:', sorted(m for m in sys.modules\n"
             "    if m.split('.')[0] == 'torch' and '.' not in m or m == 'tsvae_dist.fid.inception')))\n"
             f"sys.argv = ['launch/submit.py', 'action=dry_run', 'run_dir={tmp_path / 'run'}']\n"
             "runpy.run_path('launch/submit.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "report: " in proc.stdout and proc.stdout.strip().endswith("loaded: []"), proc.stdout
