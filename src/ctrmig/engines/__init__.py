"""Engine adapters, one module per engine; each implements the Migrator protocol."""
