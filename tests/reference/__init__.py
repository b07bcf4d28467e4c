"""Independent re-implementations used as oracles by the tests (no ``freesegdiff`` imports)."""
