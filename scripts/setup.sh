#!/usr/bin/env bash
# Sets up everything the pipeline needs on Debian 12 with Python 3.11, as root: the apt packages that
# FFCV compiles against (a C compiler, OpenCV and libjpeg-turbo headers), then the project venv from the
# fully pinned requirements.txt. Idempotent: a second run checks and returns in seconds, because the venv
# records the hash of the requirements it was built from.
#
#   bash scripts/setup.sh             what `make run` and `make test` use: also Chromium and the test
#                                     packages (requirements-test.txt: pytest, Playwright, moto)
#   bash scripts/setup.sh --runtime   what a cluster node or the container image needs to run stages
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
APT_PACKAGES=(build-essential pkg-config libopencv-dev libturbojpeg0-dev)
REQUIREMENTS=(requirements.txt)
case "${1:-}" in
  --runtime) mode=runtime ;;
  "") mode=full; APT_PACKAGES+=(chromium); REQUIREMENTS+=(requirements-test.txt) ;;
  *) echo "usage: bash scripts/setup.sh [--runtime]" >&2; exit 2 ;;
esac

fail() { echo "setup: $*" >&2; exit 1; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || fail "Python 3.11 is required (FFCV 1.0.2 imports distutils, gone in 3.12; the pins are for 3.11); '$PYTHON' is $("$PYTHON" --version 2>&1). Set PYTHON=python3.11, or use the container image (Dockerfile)"

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || fail "apt packages missing: ${missing[*]}; run as root, or first: sudo apt-get install -y ${missing[*]}"
  echo "setup: installing apt packages: ${missing[*]}"
  apt-get update -qq || fail "apt-get update failed (no network to the Debian mirrors?)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed"
fi

# A full venv also serves --runtime; a runtime venv is completed by a full setup.
wanted=$(cat "${REQUIREMENTS[@]}" pyproject.toml | sha256sum | cut -d' ' -f1)
full=$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -d' ' -f1)
stamp=$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)
if [ "$stamp" = "$wanted" ] || { [ "$mode" = runtime ] && [ "$stamp" = "$full" ]; }; then
  exit 0
fi
echo "setup: building $VENV from ${REQUIREMENTS[*]} (about 4 minutes the first time)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || fail "could not create $VENV (Debian: apt-get install python3-venv)"
"$VENV/bin/python" -m pip install -q --upgrade pip==25.3 || fail "pip upgrade failed (no network to PyPI?)"
for requirements in "${REQUIREMENTS[@]}"; do
  "$VENV/bin/python" -m pip install -q -r "$requirements" || fail "pip install -r $requirements failed (see above)"
done
"$VENV/bin/python" -m pip install -q --no-deps -e . --config-settings editable_mode=compat || fail "installing the project into $VENV failed"
echo "$wanted" > "$VENV/.requirements.sha256"
echo "setup: done"
