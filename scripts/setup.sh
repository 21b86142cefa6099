#!/usr/bin/env bash
# Sets up everything the pipeline needs on Debian 12 with Python 3.11, as root: the apt packages that
# FFCV compiles against (OpenCV, libjpeg-turbo headers) plus Chromium for the MLflow UI test, then the
# project venv from the fully pinned requirements.txt. Idempotent: a second run checks and returns in
# seconds, because the venv records the hash of the requirements it was built from.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
APT_PACKAGES=(libopencv-dev libturbojpeg0-dev pkg-config chromium)

fail() { echo "setup: $*" >&2; exit 1; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || fail "Python 3.11 is required (FFCV 1.0.2 imports distutils); '$PYTHON' is $("$PYTHON" --version 2>&1)"

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

wanted=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.requirements.sha256" ] && [ "$(cat "$VENV/.requirements.sha256")" = "$wanted" ]; then
  exit 0
fi
echo "setup: building $VENV from requirements.txt (about 4 minutes the first time)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || fail "could not create $VENV (Debian: apt-get install python3-venv)"
"$VENV/bin/python" -m pip install -q --upgrade pip==25.3 || fail "pip upgrade failed (no network to PyPI?)"
"$VENV/bin/python" -m pip install -q -r requirements.txt || fail "pip install -r requirements.txt failed (see above)"
"$VENV/bin/python" -m pip install -q --no-deps -e . --config-settings editable_mode=compat || fail "installing the project into $VENV failed"
echo "$wanted" > "$VENV/.requirements.sha256"
echo "setup: done"
