# make serve IMAGES=~/Pictures [ARGS="--model /models/ViT-B-32.pt --port 8080"]: index a folder and serve it
# make test [ARGS="tests/app -k search"]: build .venv, lint, type-check, run the whole test suite
serve:
	@test -n "$(IMAGES)" || { echo "usage: make serve IMAGES=/path/to/photos [ARGS='--model ... --port ...']" >&2; exit 2; }
	scripts/serve.sh "$(IMAGES)" $(ARGS)

test:
	scripts/test.sh $(ARGS)

env:
	scripts/env.sh

.PHONY: serve test env
