#!/usr/bin/env bash
# Installs Debian's Chromium and its chromedriver for the dashboard's browser tests, when missing,
# and checks that the two agree on the major version (Selenium is pointed at /usr/bin/chromedriver,
# so Selenium Manager never downloads a driver). The Python side (selenium) is in requirements.txt.
set -euo pipefail
packages=(chromium chromium-driver)
missing=()
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run as root or: apt-get install ${missing[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
browser=$(/usr/bin/chromium --version 2>/dev/null | grep -o '[0-9][0-9.]*' | head -1)
driver=$(/usr/bin/chromedriver --version | grep -o '[0-9][0-9.]*' | head -1)
if [ "${browser%%.*}" != "${driver%%.*}" ]; then
  echo "chromium $browser and chromedriver $driver differ in major version" >&2
  exit 1
fi
echo "chromium $browser, chromedriver $driver"
