#!/usr/bin/env bash
# bench/fallback.sh - what a move between transports costs: 100 pings a
# second through the tunnel while the path in use is cut, then the path
# comes back. One server on UDP, ICMP, HTTPS and DNS (direct), one client
# given all four URLs (udp, icmp, https, dns: most preferred first).
#
# Usage (as root):
#   bench/fallback.sh
#
# Environment:
#   IPTUN=path     iptun binary (default: <repo>/target/release/iptun; built
#                  with `cargo build --release -p iptun` when missing)
#   BACK=secs      how long to wait for the move back to UDP (default 75)
#   JSON=file      also write the results there as JSON
#   KEEP_LOGS=1    keep the temp dir with logs (it is kept on failure anyway)
#
# Topology: netns iptfb-s (192.0.2.1/24) <-veth-> netns iptfb-c (192.0.2.2/24).
# The cuts are nftables rules in the server's namespace (input, on the veth);
# the pings go to the server's tunnel address, 10.1.0.1. Nothing leaves the
# namespaces.
#
# Per move it reports when it came (seconds after the cut), the pings lost
# (sent between the cut and the move, never answered) and the gap they make
# at 100 a second; and the number of moves the client counted.
set -euo pipefail

PREFIX=iptfb
PATHS=fallback
ALIASES=()
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BACK=${BACK:-75}

parse_args "$@"
bench_start
ensure_apt nft nftables
iptun_setup
netns_up

# ---------------------------------------------------------------- tunnel
URLS=(udp://$UL_S:3000 icmp://$UL_S https://$UL_S/tunnel "dns://tunnel.bench?resolver=$UL_S")
bg "$NS_S" "$TMP/server.log" "$IPTUN" server --private-key "$TMP/iptun-s.key" \
    --allow "$(cat "$TMP/iptun-c.pub")" --tun $IPTUN_TUN \
    --listen udp://0.0.0.0:3000 --listen icmp://0.0.0.0 \
    --listen https://$UL_S:443/tunnel --listen "dns://$UL_S:53?domain=tunnel.bench"
IT_S=$BG_PID
PIN=""
for _ in $(seq 100); do
    PIN=$(sed -n 's/.*TLS certificate pin: \(sha256:[0-9a-f]*\).*/\1/p' "$TMP/server.log" | head -n1)
    [[ -n $PIN ]] && break
    kill -0 $IT_S 2>/dev/null || die "iptun server exited"
    sleep 0.1
done
[[ -n $PIN ]] || die "no TLS pin in the server's log"
args=()
for u in "${URLS[@]}"; do args+=(--server "$u"); done
bg "$NS_C" "$TMP/client.log" env -u HTTPS_PROXY -u https_proxy -u HTTP_PROXY -u http_proxy \
    "$IPTUN" client --private-key "$TMP/iptun-c.key" --server-key "$(cat "$TMP/iptun-s.pub")" \
    --tun $IPTUN_TUN --tls-pin "$PIN" "${args[@]}"
IT_C=$BG_PID
wait_ipv4 "$NS_C" $IPTUN_TUN 15 $IT_C || die "iptun client: no tunnel address$(alive $IT_C)"
ip netns exec "$NS_C" ping -c 5 -i 0.2 -W 2 $IPTUN_ADDR_S >/dev/null || die "no ping through the tunnel"

transport() {
    ip netns exec "$NS_C" "$IPTUN" status --json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["sessions"][0]["transport"])' 2>/dev/null \
        || echo "?"
}
now() { date +%s.%N; }

ip netns exec "$NS_S" nft add table inet $PREFIX
ip netns exec "$NS_S" nft add chain inet $PREFIX cut '{ type filter hook input priority -10; }'

# ---------------------------------------------------------------- pings and cuts
log "100 pings a second to $IPTUN_ADDR_S through the tunnel"
ip netns exec "$NS_C" ping -n -D -i 0.01 -W 1 $IPTUN_ADDR_S >"$TMP/ping.log" 2>&1 &
PING=$!
PIDS+=("$PING")
sleep 3
EVENTS="$TMP/events"
: >"$EVENTS"
wait_move() { # from deadline-secs -> the transport moved to
    local from=$1 end t
    end=$(($(date +%s) + $2))
    while [[ $(date +%s) -lt $end ]]; do
        t=$(transport)
        if [[ $t != "$from" && $t != "?" ]]; then echo "$t"; return 0; fi
        sleep 0.05
    done
    echo "none"
}
cut() { # label nft-rule...
    local label=$1 from to at moved; shift
    from=$(transport)
    at=$(now)
    ip netns exec "$NS_S" nft add rule inet $PREFIX cut iifname "$VETH_S" "$@" drop
    log "cut $label at $(date +%T) (on $from)"
    to=$(wait_move "$from" 30)
    moved=$(now)
    log "  moved $from -> $to"
    echo "$from $to $at $moved" >>"$EVENTS"
    sleep 3
}
cut UDP udp dport 3000
cut ICMP icmp type echo-request
# UDP comes back: the client probes it (30 s after it failed, then less
# often) and moves back.
ip netns exec "$NS_S" nft flush chain inet $PREFIX cut
ip netns exec "$NS_S" nft add rule inet $PREFIX cut iifname "$VETH_S" icmp type echo-request drop
from=$(transport)
at=$(now)
log "UDP back at $(date +%T); waiting up to ${BACK}s for the move back"
to=$(wait_move "$from" "$BACK")
echo "$from $to $at $(now) back" >>"$EVENTS"
sleep 3
kill "$PING" 2>/dev/null || true
wait "$PING" 2>/dev/null || true
MOVES=$(ip netns exec "$NS_C" "$IPTUN" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["moves"])')
kill -0 $IT_S 2>/dev/null && kill -0 $IT_C 2>/dev/null || die "iptun exited during the run"

# ---------------------------------------------------------------- report
python3 - "$TMP/ping.log" "$EVENTS" "$MOVES" "${JSON:-}" <<'EOF'
import json, re, sys
ping, events, moves, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
# Replies in order: (time printed, icmp_seq). A move's cost is the longest
# silence between two replies around it, and the sequence numbers missing
# in between (ping may send slower than asked, so times come from replies).
replies = []
for line in open(ping):
    m = re.match(r"\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", line)
    if m:
        replies.append((float(m.group(1)), int(m.group(2))))
rows = []
for line in open(events):
    f = line.split()
    frm, to, at, moved = f[0], f[1], float(f[2]), float(f[3])
    window = [r for r in replies if at - 0.5 <= r[0] <= moved + 2.0]
    gap, lost = 0.0, 0
    for (t1, s1), (t2, s2) in zip(window, window[1:]):
        if t2 - t1 > gap:
            gap, lost = t2 - t1, max(0, s2 - s1 - 1)
    rows.append({
        "move": f"{frm} -> {to}",
        "cause": "path back" if len(f) > 4 else f"{frm} cut",
        "moved_after_s": round(moved - at, 2),
        "pings_lost": lost,
        "gap_ms": round(gap * 1000) if lost else 0,
    })
print()
print(f"{'move':<18} {'cause':<10} {'moved after':>12} {'pings lost':>11} {'gap':>9}")
for r in rows:
    print(f"{r['move']:<18} {r['cause']:<10} {r['moved_after_s']:>10.1f} s {r['pings_lost']:>11} {r['gap_ms']:>6} ms")
rate = (replies[-1][1] - replies[0][1]) / (replies[-1][0] - replies[0][0]) if len(replies) > 1 else 0
print(f"moves counted by the client: {moves}; {len(replies)} pings answered, {rate:.0f} sent a second")
print("(pings to the server's tunnel address; a cut drops the transport at the server's input;")
print(" 'moved after' is when the client's status showed the move, polled every 50 ms)")
if out:
    json.dump({"moves": moves, "rows": rows, "pings_answered": len(replies)}, open(out, "w"), indent=2)
EOF
