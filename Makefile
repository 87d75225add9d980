# make serve IMAGES=~/Pictures [ARGS="--model /models/ViT-B-32.pt --port 8080"]: index a folder and serve it
# make demo [ARGS="--fast --port 8080"]: offline demo: train (or reuse) the shapes model, index its images, serve
# make test [ARGS="tests/app -k search"]: build .venv, lint, type-check, run the whole test suite
serve:
	@test -n "$(IMAGES)" || { echo "usage: make serve IMAGES=/path/to/photos [ARGS='--model ... --port ...']" >&2; exit 2; }
	scripts/serve.sh "$(IMAGES)" $(ARGS)

demo:
	scripts/demo.sh $(ARGS)

test:
	scripts/test.sh $(ARGS)

env:
	scripts/env.sh

.PHONY: serve demo test env
