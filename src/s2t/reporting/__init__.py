"""Reports: tables, JSON summaries and plots, one module per kind of run."""
