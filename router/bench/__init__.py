"""Router benchmarks: scripts that print a table and write JSON (docs/design.md §20)."""
