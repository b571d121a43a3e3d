# Benchmark verbs (docs/performance.md). Each prints what it does.
#
#   make bench                       CPU report: bench/results/<utc>.{json,md,png}
#   make bench BENCH_QUICK=1         the same pieces at the debug shape, for a smoke run (figures meaningless)
#   make bench BENCH_STEPS=300       more training steps per stack (default 100)
#   make bench BENCH_ARGS='--val-tokens 0 --threads 1'   whole val split; 1 thread on a busy machine
#   make bench BENCH_ARGS='--pieces step,compress'   only the step-overhead and compression pieces
#   make gpu-check                   one CUDA GPU, <= 6 min: compile counts, FA3/SDPA, seed at full size (20 steps),
#                                    one GPTQ layer, one TTT chunk, 8xH100 projections,
#                                    JSON in bench/gpu/<yyyymmdd>-<gpu>.json (needs only the machine's python)

BENCH_QUICK ?=
BENCH_STEPS ?=
BENCH_ARGS ?=
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=

.PHONY: bench gpu-check

bench: venv ## CPU benchmark: throughput, quality A/B, quantizer, eval rates, demo phases -> bench/results/
	@echo ">> CPU bench$(if $(BENCH_QUICK), (quick: debug shape)): baseline vs seed vs seed-plus on the offline corpus; report in bench/results/"
	$(VPY) bench/cpu.py $(if $(BENCH_QUICK),--quick) $(if $(BENCH_STEPS),--steps $(BENCH_STEPS)) $(BENCH_ARGS)

gpu-check: ## one GPU, <= 6 min: compile counts, attention kernel, seed step time/memory, GPTQ, TTT chunk, 8xH100 projection -> bench/gpu/
	@echo ">> gpu-check with $(GPU_PYTHON) (no venv, no network): full-size seed, 48x2048 micro-batches, <= 6 min"
	PYTHONPATH=src $(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

.PHONY: bench-data
bench-data: venv ## data figures: CaseOps speed, sidecar, leakage check s/GB, bytes/token -> bench/results/data-*
	@echo ">> data bench$(if $(BENCH_QUICK), (quick)): CaseOps transform + sidecar on the offline corpus, leakage check on a synthetic export"
	$(VPY) bench/data.py $(if $(BENCH_QUICK),--quick) $(BENCH_DATA_ARGS)

.PHONY: bench-frontier
bench-frontier: venv ## frontier vs seed vs baseline at equal steps, then one element off at a time -> bench/results/frontier-*
	@echo ">> frontier ablation$(if $(BENCH_QUICK), (quick: debug shapes)): same tokens, same seed, one element off per row"
	$(VPY) bench/ablation.py $(if $(BENCH_QUICK),--quick) $(if $(BENCH_STEPS),--steps $(BENCH_STEPS)) $(BENCH_ABLATION_ARGS)
