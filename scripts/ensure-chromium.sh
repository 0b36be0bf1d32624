#!/usr/bin/env bash
# Make sure the browser tests (tests/e2e/test_dev.py) have Debian's Chromium and
# ChromeDriver: /usr/bin/chromium and /usr/bin/chromedriver. Installs them
# when missing (root or sudo needed); never downloads a browser of its own.
# PGRELAY_SKIP_BROWSER=1 skips the install (the browser tests then skip).
set -euo pipefail

if [ -n "${PGRELAY_SKIP_BROWSER:-}" ]; then
  exit 0
fi
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no /usr/bin/chromium or /usr/bin/chromedriver and no apt-get: the browser tests will skip" >&2
  exit 0
fi

echo "installing Debian's chromium and chromium-driver for the browser tests" >&2
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
