"""One script per question; each writes a table and a figure (see experiments/README.md)."""
