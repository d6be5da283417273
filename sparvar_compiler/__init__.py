"""sparvar-compiler: turn a VAR model's scale schedule into tuned block-sparse attention kernels.

Pipeline stages, one sub-package each: ``planner`` (schedules, plans, layouts) -> ``codegen`` -> ``tuner`` ->
``db`` -> ``emit`` -> ``runtime``. See README.md.
"""

__version__ = "0.1.0"
