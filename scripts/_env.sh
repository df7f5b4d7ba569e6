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
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[hacbo-jax] installing into $venv (extras: ${extras:-none})" >&2
  "$venv/bin/python" -m pip install --quiet -e "$spec"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
# Offline: nothing here reads a model or data set hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$root"
