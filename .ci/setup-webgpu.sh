#!/usr/bin/env bash
# Installs what the WebGPU tests need on Debian 12 (bookworm): a Vulkan loader, Mesa's lavapipe
# software Vulkan driver (>= 23, from bookworm-backports: Dawn refuses bookworm's Mesa 22.3 for
# lacking shaderUniform*ArrayDynamicIndexing) and chromium (SwiftShader WebGPU for the browser test).
# Idempotent and non-interactive; does nothing when everything is already there. Sourced by .ci/run
# or run on its own (needs root, or sudo).
fastmax_webgpu_setup() (
  # A subshell body: strict mode here never leaks into a shell that sources this file.
  set -euo pipefail
  local sudo=''
  if [ "$(id -u)" != 0 ]; then sudo='sudo'; fi
  local mesa_version
  mesa_version="$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)"
  local mesa_ok=0
  if [ -n "$mesa_version" ] && dpkg --compare-versions "$mesa_version" ge 23 \
    && dpkg-query -W -f='${Status}' libvulkan1 2>/dev/null | grep -q 'install ok installed'; then
    mesa_ok=1
  fi
  local chromium_ok=0
  if [ -x /usr/bin/chromium ]; then chromium_ok=1; fi
  if [ "$mesa_ok" = 1 ] && [ "$chromium_ok" = 1 ]; then
    echo "setup-webgpu: Mesa $mesa_version and chromium already installed"
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  local backports=/etc/apt/sources.list.d/bookworm-backports.sources
  if [ "$mesa_ok" = 0 ] && [ ! -f "$backports" ]; then
    # The stock stanza (mirror, keyring, components) with only the suite changed; the plain Debian
    # mirror when the image has no deb822 stanza for bookworm.
    local stanza=''
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
      stanza="$(awk 'BEGIN { RS = ""; ORS = "\n" } /Suites: bookworm bookworm-updates/ {
        sub(/Suites: bookworm bookworm-updates/, "Suites: bookworm-backports"); print; exit }' \
        /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "$stanza" ]; then
      stanza="$(printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
        'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg')"
    fi
    printf '%s\n' "$stanza" | $sudo tee "$backports" >/dev/null
  fi
  $sudo apt-get update -qq
  if [ "$mesa_ok" = 0 ]; then
    $sudo apt-get install -y -qq --no-install-recommends -t bookworm-backports mesa-vulkan-drivers libvulkan1
  fi
  if [ "$chromium_ok" = 0 ]; then
    $sudo apt-get install -y -qq --no-install-recommends chromium
  fi
  echo "setup-webgpu: mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers), $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium missing')"
)

fastmax_webgpu_setup
