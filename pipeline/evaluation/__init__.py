"""Evaluation: prepare pairs from BEIR folders and multiple-choice sets, and trec_eval-exact metrics."""
