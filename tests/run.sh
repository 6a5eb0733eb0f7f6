#!/usr/bin/env bash
# The whole suite, as `make test` runs it. Fails loudly, also when pytest collected nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export PYTHONUNBUFFERED=1
# No GPU here: Triton kernels run under the interpreter; one thread per worker (2 workers).
if ! $BIN/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dcwdist/torch_extensions}
WORKERS=${PYTEST_WORKERS:-2}
$BIN/python -m pytest tests -n "$WORKERS" --dist loadfile --timeout 900 "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "tests/run.sh: FAILED: pytest collected no tests" >&2
  exit 1
fi
if [ $rc -ne 0 ]; then
  echo "tests/run.sh: FAILED: pytest exited with $rc" >&2
fi
exit $rc
