# Thin wrappers; each target sets up its own environment from scratch.
.PHONY: test bench bench-pytest info demo
test:
	bash scripts/test.sh
bench:
	bash scripts/bench.sh
bench-pytest:
	bash scripts/bootstrap.sh && .venv/bin/pytest benchmarks/test_cpu_op.py --benchmark-only
info:
	bash scripts/bootstrap.sh && .venv/bin/fastmdl info   # the console script: the checkout cannot shadow the install

demo:
	bash scripts/demo.sh
