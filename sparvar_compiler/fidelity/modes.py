"""Names of the plan modes the fidelity report evaluates (no heavy imports: the CLI reads these at start-up).

See :mod:`sparvar_compiler.fidelity.masks` for what each mode attends to.
"""

CSLA_MODES = ("csla_block", "csla_exact", "csla_gather")
CS4A_VARIANTS = {  # mode name -> (cs4a mode, key mapping)
    "cs4a_token": ("token", "identity"),
    "cs4a_token_flat": ("token", "flat"),
    "cs4a_token_dap": ("token", "dap"),
    "cs4a_block": ("block", "identity"),
}
ALL_MODES = ("dense",) + CSLA_MODES + ("random",) + tuple(CS4A_VARIANTS) + ("random_cs4a", "sparvar")
DEFAULT_MODES = ("dense", "csla_block", "csla_exact", "csla_gather", "random", "cs4a_token", "cs4a_block",
                 "random_cs4a", "sparvar")

#: ``calibrate``'s default cap on the relative L2 output error of the worst (scale, layer); why this value:
#: :mod:`sparvar_compiler.fidelity.calibrate`. Here so that the command line shows it without importing torch.
DEFAULT_MAX_ERROR = 0.45
