#!/usr/bin/env bash
# What `make test` / `make demo` need that pip cannot install: bubblewrap (`bwrap`, the sandbox of code
# rewards, megatron_vp2o/rewards/sandbox.py). Where it is missing, apt installs it if apt exists and we
# are root (quietly); otherwise one line says exactly what to install (the sandbox tests then skip with
# that reason; nothing else needs it). Idempotent: STAMP (first argument) records that bwrap is there.
set -u
stamp="${1:-.venv/.vp2o-system-deps}"
if command -v bwrap >/dev/null 2>&1; then
  [ -f "$stamp" ] || { mkdir -p "$(dirname "$stamp")" && touch "$stamp"; }
  exit 0
fi
rm -f "$stamp"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if (timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 \
        apt-get install -y -qq --no-install-recommends bubblewrap) >/dev/null 2>&1 \
     && command -v bwrap >/dev/null 2>&1; then
    echo "installed bubblewrap (apt-get install bubblewrap): code rewards run sandboxed"
    mkdir -p "$(dirname "$stamp")" && touch "$stamp"
    exit 0
  fi
  echo "note: apt-get could not install bubblewrap; install it (apt-get install bubblewrap) to run code rewards sandboxed (its tests skip until then)"
  exit 0
fi
echo "note: bubblewrap is not installed; install it (Debian/Ubuntu: sudo apt-get install bubblewrap; Fedora/RHEL: sudo dnf install bubblewrap) to run code rewards sandboxed (its tests skip until then)"
