"""Model engines: the Engine protocol (engine.py) and its implementation (score.py: load_engine),
the model's files and what planning resolves once (families, templates, device, dtype, kernel:
model_files.py, resolve.py), tokenizing to ids, loading, the forwards and where one is
chosen (forwards.py), attention kernels, the fused Qwen3 and encoder forwards, the memory budget,
OOM recovery, prefix sharing."""
