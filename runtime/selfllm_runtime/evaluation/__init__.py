"""What task `eval` makes of EvalScope's results (report.py: per-subset scores, the base-vs-adapter table, perf
figures and their plot) and the question set it ships for offline runs (data/selfllm_quiz, EvalScope's
`general_mcq` format)."""
