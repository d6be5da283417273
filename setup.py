"""The package list, found rather than written by hand (everything else is in pyproject.toml).

Every package under ``sparvar_compiler/`` (a directory with ``__init__.py``), plus the repository's top-level
``templates/`` and ``tuning_db/`` shipped as ``sparvar_compiler.templates`` and ``sparvar_compiler.tuning_db``
(mapped by ``package-dir`` in pyproject.toml). pyproject's ``packages.find`` cannot add those two: it only names
packages after the directories it walks.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["sparvar_compiler", "sparvar_compiler.*"]),
                "sparvar_compiler.templates", "sparvar_compiler.tuning_db"])
