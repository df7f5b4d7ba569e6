# Shared by run.sh and test.sh: create (once) and activate a virtual environment of the project.
# $1 = the environment's folder name under the checkout (for example .venv or .venv-test),
# $2 = the pip extras to install into it (for example "train" or "test").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HACBO_VENV:-$root/$1}"
extras="${2:-}"
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
stamp="$venv/.hacbo-installed-$(echo "$extras" | tr ',' '-')"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # pip's and the build backend's chatter goes to a log, shown only when the install fails.
  echo "[hacbo-jax] installing into $venv (extras: ${extras:-none}); log: $venv/install.log" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  if ! { "$venv/bin/python" -m pip install --quiet --upgrade pip \
         && "$venv/bin/python" -m pip install --quiet -e "$spec"; } > "$venv/install.log" 2>&1; then
    cat "$venv/install.log" >&2
    echo "[hacbo-jax] the install into $venv failed (log above)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
# Offline: nothing here reads a model or data set hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$root"
