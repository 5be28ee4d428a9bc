"""Model engines: the Engine protocol (engine.py) and its implementation (score.py: load_engine),
reranker families and templates, tokenizing to ids, loading, the forwards and where one is
chosen (forwards.py), attention kernels, the fused Qwen3 and encoder forwards, the memory budget,
OOM recovery, prefix sharing."""
