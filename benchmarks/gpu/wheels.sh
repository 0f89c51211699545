#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before a GPU check: downloads into .whl/ the wheels
# the lent GPU machine lacks (its Python 3.12 has torch, numpy, grpcio, rich, xxhash,
# prometheus-client, safetensors, scikit-learn, but not these), pinned to this project's
# .venv versions. .whl/ is ignored by git (.git/info/exclude) and travels with `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude="$(git rev-parse --git-path info/exclude)"; mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir .whl
py="${VENV_PY:-.venv/bin/python}"  # the project venv whose versions to pin
ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
for pkg in pydantic pydantic_core annotated-types typing-inspection SQLAlchemy orjson zstandard tomli_w cryptography cffi pycparser; do
  spec="$pkg==$(ver "$pkg")"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64 -d .whl "$spec" \
    || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "$spec"
done
ls -la .whl && du -sh .whl
