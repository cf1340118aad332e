"""Every docstring example in the package runs and prints what it says, so the documentation stays true to the code.

The standard library's doctest runs each module's examples (``# doctest: +SKIP`` marks the ones that
need a model or data on disk). pytest's ``--doctest-modules`` would do the same, but it also imports
every test file and both ``conftest.py`` files as plain modules, which fails on the repeated basename.
"""

import doctest
import importlib
import pkgutil

import pytest

import lowrank

MODULES = sorted(info.name for info in pkgutil.walk_packages(lowrank.__path__, "lowrank."))


def test_every_module_is_found():
    assert {"lowrank.compress", "lowrank.linalg.nystrom", "lowrank.calibration.statistics"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
