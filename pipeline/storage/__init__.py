"""Where state lives: the checkpoint (parts, per-unit records, marker), its lease, input
fingerprints, and the stores behind them (a local directory, or object storage via pyarrow.fs)."""
