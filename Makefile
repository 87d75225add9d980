test:
	scripts/test.sh

env:
	scripts/env.sh

.PHONY: test env
