"""What a run needs at run time in every process: the stop token and signals, progress, the
startup timeline, the bytecode cache."""
