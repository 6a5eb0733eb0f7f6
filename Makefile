# Two entry points: `make demo` and `make test`. Both build .venv from pinned versions first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_PINS := torch==2.13.0 triton==3.7.1 deepspeed==0.19.8 'ray[default]==2.60.0' mpi4py==4.1.2 \
            datasets==5.2.0 tokenizers==0.23.3 tensorboard==2.21.0 \
            transformers==5.23.0 safetensors==0.8.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so nothing below pulls a CUDA build.
	DS_BUILD_OPS=0 $(BIN)/pip install -q $(PIP_PINS)
	$(BIN)/pip install -q -e '.[test,hf]'
	touch $(STAMP)

install: $(STAMP)

# Two CPU ranks over gloo, DeepSpeed ZeRO-2 sharding the optimizer: the 512-token stage runs
# data-parallel (dp=2), the 2k stage context-parallel (cp=2, one sequence over both ranks).
# The first leg stops at step 40 as a preemption would (checkpoint, exit 0); the second resumes.
DEMO_ENV := DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$(HOME)/.cache/dcwdist/torch_extensions
DEMO_RUN := $(DEMO_ENV) $(BIN)/python -m torch.distributed.run --nproc-per-node 2 \
	  --master-addr 127.0.0.1 --master-port 29533 -m dcwdist.cli train recipes/tiny_cpu.yaml \
	  zero.enabled=true zero.stage=2 stages.1.cp=2 checkpoint.every=20 --run-dir runs/tiny_cpu
demo: $(STAMP)
	rm -rf runs/tiny_cpu
	$(DEMO_RUN) checkpoint.stop_at=40
	$(DEMO_RUN) checkpoint.resume=auto
	$(BIN)/dcwdist tb runs/tiny_cpu

test: $(STAMP)
	bash tests/run.sh

clean:
	rm -rf $(VENV) runs
