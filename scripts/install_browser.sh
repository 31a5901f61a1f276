#!/usr/bin/env bash
# Install what the report's browser test needs: headless Chromium + its WebDriver (Debian packages
# `chromium` and `chromium-driver`, no browser download) and the Selenium client in .venv.
# Idempotent: does nothing when they are present. Needs root for apt; without root (or when apt
# fails) it prints why and exits 0, and the browser test skips (or fails when CI=true).
# Usage: scripts/install_browser.sh
set -uo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
[ -x "$VPY" ] || VPY=python3

have_browser() {
  { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } &&
    { command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ]; }
}

if ! have_browser; then
  if [ "$(id -u)" != "0" ]; then
    echo "install_browser: chromium/chromedriver missing and not root; the browser test will skip" >&2
  elif ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: chromium/chromedriver missing and no apt-get; the browser test will skip" >&2
  else
    echo "install_browser: installing chromium and chromium-driver with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >/tmp/install_browser.log 2>&1; then
      echo "install_browser: apt-get failed (see /tmp/install_browser.log); the browser test will skip" >&2
    fi
  fi
fi

if ! "$VPY" -c "import selenium" >/dev/null 2>&1; then
  echo "install_browser: installing the selenium client into $(dirname "$(dirname "$VPY")")" >&2
  "$VPY" -m pip install -q --disable-pip-version-check "selenium>=4.10" >&2 ||
    echo "install_browser: pip install selenium failed; the browser test will skip" >&2
fi
have_browser && echo "install_browser: $(chromium --version 2>/dev/null || chromium-browser --version)" >&2
exit 0
