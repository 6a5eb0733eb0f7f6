# Two entry points: `make demo` and `make test`. Both build .venv from pinned versions first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_PINS := torch==2.13.0 triton==3.7.1 deepspeed==0.19.8 'ray[default]==2.60.0' mpi4py==4.1.2 \
            datasets==5.2.0 tokenizers==0.23.3 tensorboard==2.21.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so nothing below pulls a CUDA build.
	DS_BUILD_OPS=0 $(BIN)/pip install -q $(PIP_PINS)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dcwdist train recipes/tiny_cpu.yaml

test: $(STAMP)
	bash tests/run.sh

clean:
	rm -rf $(VENV) runs
