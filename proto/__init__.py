"""Protocol buffers of package baton.v1 (the only format that crosses a process boundary)."""
