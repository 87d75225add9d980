# make serve IMAGES=~/Pictures [ARGS="--model /models/ViT-B-32.pt --port 8080"]: index a folder and serve it
# make demo [ARGS="--port 8080"]: offline demo: train (or reuse) the shapes model, index its images, serve
# make test [ARGS="tests/app -k search"]: build .venv, lint, type-check, run the whole test suite
# make check [ARGS=...]: the same without the tests marked slow: the fast loop while you work
# make bench [ARGS="--only server,encoders --workdir /var/tmp/bench"]: the benchmark suite (python -m bench.suite)
# make bench-smoke: every benchmark at tiny sizes (what CI runs through tests/test_bench_smoke.py)
serve:
	@test -n "$(IMAGES)" || { echo "usage: make serve IMAGES=/path/to/photos [ARGS='--model ... --port ...']" >&2; exit 2; }
	scripts/serve.sh "$(IMAGES)" $(ARGS)

demo:
	scripts/demo.sh $(ARGS)

test:
	scripts/test.sh $(ARGS)

check:
	scripts/test.sh -m "not slow" $(ARGS)

env:
	scripts/env.sh

bench: env
	.venv/bin/python -m bench.suite $(ARGS)

bench-smoke: env
	.venv/bin/python -m bench.suite --smoke $(ARGS)

.PHONY: serve demo test check env bench bench-smoke
