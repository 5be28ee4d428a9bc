"""Model engines: reranker families and templates, tokenizing to ids, the Scorer (load, budget,
pack, recover from OOM), attention kernels, the fused Qwen3 and encoder forwards, prefix sharing."""
