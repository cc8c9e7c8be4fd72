#!/usr/bin/env bash
# Check the Debian package dist/deb.sh built: it holds the binary, the
# systemd units, the completions and the manual page, and the binary in it
# runs.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(ls -t target/debian/iptun_*.deb | head -n1)
listing=$(dpkg -c "$deb")
missing=0
for path in ./usr/bin/iptun \
    ./lib/systemd/system/iptun-server.service ./lib/systemd/system/iptun-client@.service \
    ./usr/share/bash-completion/completions/iptun ./usr/share/zsh/vendor-completions/_iptun \
    ./usr/share/fish/vendor_completions.d/iptun.fish ./usr/share/man/man1/iptun.1.gz; do
    if ! grep -q " $path\$" <<<"$listing"; then
        echo "dist/check-deb.sh: $deb lacks $path" >&2
        missing=1
    fi
done
[ "$missing" -eq 0 ] || { echo "$listing" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
dpkg-deb -x "$deb" "$dir"
"$dir/usr/bin/iptun" --version
echo "dist/check-deb.sh: $deb holds what it should"
