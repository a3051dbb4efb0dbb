# Sourced by scripts/demo and scripts/test: make .venv and install the project into it, once.
# Re-installs only when pyproject.toml changes, so a second run is quiet and quick.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${CBAS_PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "CBAS needs Python 3.11 or newer; '$python' is $("$python" --version 2>&1). Set CBAS_PYTHON." >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "Creating $venv ..."
  "$python" -m venv "$venv"
fi
stamp="$venv/.cbas-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing CBAS and its dependencies into $venv ..."
  log="$venv/pip-install.log"
  if ! { "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip \
         && "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[dev]"; } >"$log" 2>&1; then
    echo "installation failed; the end of $log:" >&2
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 30 >&2
    exit 1
  fi
  "$venv/bin/python" -c 'import cbas' || { echo "installation failed: cbas does not import" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
