#!/usr/bin/env bash
# The project's two entry points on a fresh Debian machine:
#   bash tests/run.sh        the whole test suite: format, lints, docs, every test (what CI runs)
#   bash tests/run.sh demo   a local cluster, traffic through slotq, and what it shows
# Both install redis-server/redis-tools first when they are missing; the suite also nftables
# (partition tests cut the network with rules of their own; they need root), chromium and
# playwright-core (the dashboard is tested in a real headless browser).
set -euo pipefail
cd "$(dirname "$0")/.."

ensure_redis() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null && command -v tmux >/dev/null \
    && { [ "${1:-}" != test ] || command -v nft >/dev/null; }; then return; fi
  echo "installing redis-server, redis-tools, tmux (terminal tests) and nftables (partition tests)" >&2
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server redis-tools tmux nftables >/dev/null
  else
    echo "please install redis-server (Redis 7 or newer), redis-cli, tmux and nftables, then run again" >&2
    exit 1
  fi
}

# The dashboard's browser test: Debian's chromium, driven by playwright-core from npm.
ensure_browser() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if ! command -v chromium >/dev/null || ! command -v npm >/dev/null; then
    echo "installing chromium and node (the dashboard's browser test)" >&2
    if command -v apt-get >/dev/null; then
      local pkgs="chromium"
      command -v npm >/dev/null || pkgs="$pkgs nodejs npm"
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $pkgs >/dev/null
    else
      echo "please install chromium and node (20 or newer), then run again" >&2
      exit 1
    fi
  fi
  if [ ! -d tests/browser/node_modules/playwright-core ]; then
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

ensure_redis "${1:-test}"
[ "${1:-test}" != test ] || ensure_browser
case "${1:-test}" in
  demo)
    cargo run --release -q -p slotq-cli -- demo
    ;;
  test)
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -q -- -D warnings
    RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps -q
    if cargo nextest --version >/dev/null 2>&1; then
      # Doc examples first, so that the run ends with the suite's summary line.
      cargo test --workspace --doc -q
      cargo nextest run --workspace --no-fail-fast
    else
      cargo test --workspace --no-fail-fast
    fi
    ;;
  *)
    echo "usage: bash tests/run.sh [test|demo]" >&2
    exit 2
    ;;
esac
