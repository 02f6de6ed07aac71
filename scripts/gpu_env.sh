# Source this first in a GPU job, from the repository root: `source scripts/gpu_env.sh`.
# A rented GPU machine may have torch but no access to a package index: install the wheels the job takes along in
# .gpu/whl (lpips, pytorch-fid; made by scripts/make_gpu_pack.py) into /tmp/site, make the checkout importable, and
# point dgaetok at the LPIPS weights in .gpu/. Run dgaetok there as `python3 -m dgaetok.cli ...` (the package is not
# pip-installed on that machine).
if ls .gpu/whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/whl/*.whl || return 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -f .gpu/lpips-alex.safetensors ]; then
  export DGAETOK_LPIPS_ALEX="$PWD/.gpu/lpips-alex.safetensors"
fi
export PYTHONUNBUFFERED=1
