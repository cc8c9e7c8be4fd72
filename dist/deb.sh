#!/usr/bin/env bash
# Build the Debian package: the release binary, its shell completions and
# manual page (generated from the binary's own flag definitions), and the
# systemd units. Needs cargo-deb (`cargo install cargo-deb --locked`).
#
# Usage: dist/deb.sh        -> target/debian/iptun_<version>_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p iptun
gen=target/dist
mkdir -p "$gen"
bin=target/release/iptun
"$bin" completions bash >"$gen/iptun.bash"
"$bin" completions zsh >"$gen/_iptun"
"$bin" completions fish >"$gen/iptun.fish"
"$bin" man | gzip -9n >"$gen/iptun.1.gz"
cargo deb --no-build -p iptun "$@"
