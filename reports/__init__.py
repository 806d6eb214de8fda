"""Paper-style tables from results files (see issue 5)."""
