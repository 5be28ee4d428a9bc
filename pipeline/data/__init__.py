"""The data path: input specs to files, Parquet units read in windows, pairs, and the final
rank-and-write of the scored parts (reader -> pairs -> ... -> writer)."""
