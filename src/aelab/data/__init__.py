"""Dataset catalog, IDX reading and downloading."""
