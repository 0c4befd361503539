"""The catalog (registered names read from the sources, #27) against the registries filled by importing.

``list`` and ``suite status`` read the built-in methods and datasets without importing them; these
tests fail if that reading and the imported registries ever disagree, and check that plugins (which
only importing can read) still show, through the real command line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmark.core import catalog as catalog_module
from benchmark.core.catalog import catalog, imported_catalog

ROOT = Path(__file__).resolve().parents[2]


def test_the_sources_read_give_what_importing_registers() -> None:
    static = catalog()  # no plugin installed here: read from the sources
    assert not catalog_module.plugins_present()
    imported = imported_catalog()
    builtin = lambda entries: {n: e for n, e in entries.items() if e.class_path.startswith(("methods.", "datamodules."))}  # noqa: E731
    assert static.methods == builtin(imported.methods)
    assert static.datasets == builtin(imported.datasets)
    assert static.backbones == imported.backbones
    # Not vacuous: the seven methods, the five datasets, their one-line descriptions and Recall@K.
    assert set(static.methods) >= {"ms", "proxy_anchor", "margin", "dmcac", "intra_batch", "context_refine",
                                   "cross_image_attention"}  # fmt: skip
    assert static.datasets["sop"].recall_ks == (1, 10, 100, 1000) and static.datasets["sop"].class_path.startswith("datamodules.sop.")
    assert all(e.description for e in [*static.methods.values(), *static.datasets.values()])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    probe = ("import sys; import benchmark.__main__ as m; code = m.main(sys.argv[1:]); "
             "heavy = sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'lightning', 'timm'}); "
             "print('HEAVY', heavy); sys.exit(code)")  # fmt: skip
    return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"COLUMNS": "250", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_list_shows_every_method_without_importing_torch_and_a_plugin_by_importing_it() -> None:
    shown = _cli("list")
    assert shown.returncode == 0, shown.stderr
    assert "HEAVY []" in shown.stdout
    for name, entry in imported_catalog().methods.items():
        if entry.class_path.startswith("methods."):
            assert name in shown.stdout and entry.class_path in shown.stdout
    with_plugin = _cli("list", "--plugin", "tests.benchmark.plugin_methods")
    assert with_plugin.returncode == 0, with_plugin.stderr
    assert "step_marker" in with_plugin.stdout and "tests.benchmark.plugin_methods" in with_plugin.stdout
    assert "HEAVY []" not in with_plugin.stdout  # a plugin is imported: only that tells what it registers
    missing = _cli("list", "--plugin", "no_such_plugin_module")
    assert missing.returncode == 2 and "no_such_plugin_module" in missing.stderr and "Traceback" not in missing.stderr


def test_a_suite_naming_an_unknown_method_is_refused_by_the_light_status(tmp_path: Path) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ngrid:\n  methods: [dmcacc]\n  datasets: [synthetic]\n")
    shown = _cli("suite", "status", str(suite), "--output", str(tmp_path / "out"))
    assert shown.returncode == 2, shown.stdout + shown.stderr
    assert "unknown method 'dmcacc'" in shown.stderr and "dmcac" in shown.stderr and "Traceback" not in shown.stderr
