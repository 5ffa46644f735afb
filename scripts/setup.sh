#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Debian's Fashion-MNIST (and PostgreSQL for
# the tests), then paretoken and its Python dependencies into the current python3.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
if [ "${1:-}" = "--test" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then need_apt+=(postgresql); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${need_apt[*]}; run: sudo apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
fi

# torch and torchvision resolve together to the registry's newest matching pair.
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
