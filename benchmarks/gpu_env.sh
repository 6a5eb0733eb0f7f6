# Source on a GPU machine that cannot reach a package index, from the repository root:
#   . benchmarks/gpu_env.sh
# Installs the wheels carried in .whl/ (liger-kernel, DeepSpeed's pure-python deps, rouge-score
# and nltk for the eval suite's ROUGE-L) and DeepSpeed from its sdist without compiled ops (its
# FusedAdam JIT build fails on some CUDA images; the engine uses torch's Adam), maps the package
# dirs into dcwdist, sets PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
if ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1; then
    DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation \
        --no-compile --no-cache-dir --target /tmp/site .whl/deepspeed-*.tar.gz || return 1
fi
ln -sfn ../kernels dcwdist/kernels
ln -sfn ../launch dcwdist/launch
ln -sfn ../data_pipelines dcwdist/data_pipelines
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch, triton
print("gpu_env:", torch.__version__, triton.__version__, torch.cuda.get_device_name(0))
PY
