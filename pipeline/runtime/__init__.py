"""What a run needs at run time in every process, and the bottom layer: nothing here imports the
rest of the pipeline. The stop token (stop.py) and the signals that set it (signals.py), progress
(progress.py), the startup timeline (startup.py), stage timings (timing.py), the bytecode cache
(bytecode.py) and our directories in the user's cache (user_cache.py)."""
