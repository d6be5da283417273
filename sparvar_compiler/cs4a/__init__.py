"""The dynamic half of CS4A: what the decision scale measures, what it selects, and the fixed-shape index
tables the later scales' kernels read.

``planner.cs4a`` holds everything that is static (groups, bands, key mappings, budgets); this package turns one
image's decision-scale statistics into per-(batch, head) tables on the device, without a host synchronisation,
so that a whole image stays capturable in one CUDA graph.
"""

from .select import (BlockTables, TokenTables, block_mass, example_selection, fill_tables,
                     kernel_tables_mask, block_tables, compact_rows, cs4a_masks,
                     decision_mask, dcsla_select, group_mass, group_mass_reference, tables_mask, token_tables,
                     topk_keys, upsample_grid, upsample_residual, tables_from_data,
                     tables_to_data)

__all__ = ["BlockTables", "TokenTables", "block_mass", "example_selection", "fill_tables", "kernel_tables_mask", "block_tables", "compact_rows", "cs4a_masks",
           "decision_mask", "dcsla_select", "group_mass", "group_mass_reference", "tables_mask", "token_tables",
           "topk_keys", "upsample_grid", "upsample_residual", "tables_from_data", "tables_to_data"]
