#!/usr/bin/env bash
# bench/scale.sh - one iptun server under many sessions and under a handshake
# flood, in network namespaces (iptsc-s, iptsc-c); prints figures, no verdict
# beyond what the load generator checks.
#
#   bench/scale.sh                       # sessions, exhaustion, flood
#   bench/scale.sh --only sessions       # any subset of: sessions,exhaust,flood
#
#   N=10000        sessions to bring up (pool /16)
#   SOURCES=26     prefix length of the client source addresses (10.77.0.0/26:
#                  62 addresses, one socket each; a local route)
#   FLOOD_SECS=10  length of the flood
#   IPTUN=path     iptun binary (default: <repo>/target/release/iptun)
#   LOAD=path      load generator (default: <repo>/target/release/examples/load)
#
# sessions: `load sessions` brings up N sessions from one process (sans-IO
#   client engines over UDP sockets, one per source address), each pings the
#   server's tunnel address through its own session; prints handshakes/s,
#   the time until all were up, the server's RSS per session.
# exhaust: a /24 pool (253 addresses) and 263 admitted keys: the last ten
#   are refused (counted by the server), the others keep carrying data.
# flood: one session (a real `iptun client`) pings throughout; the generator
#   replays one captured init from 50 spoofed addresses as fast as it can;
#   one second in, a second real client starts and must be up within 5 s.

PREFIX=iptsc
PATHS=sessions,exhaust,flood
ALIASES=()
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

N=${N:-10000}
SOURCES=${SOURCES:-26}
FLOOD_SECS=${FLOOD_SECS:-10}
SRC_NET=10.77.0.0

parse_args "$@"
bench_start
iptun_setup
LOAD=${LOAD:-$ROOT/target/release/examples/load}
if [[ ! -x $LOAD ]]; then
    log "$LOAD missing: cargo build --release --example load -p iptun"
    (cd "$ROOT" && cargo build --release --example load -p iptun) >"$TMP/cargo-load.log" 2>&1
fi
[[ -x $LOAD ]] || die "no load generator at $LOAD"
netns_up

# The generator's source addresses: any address of 10.77/16 is local in the
# client namespace (a local route), routed back to it from the server's.
ip -n "$NS_C" route add local $SRC_NET/16 dev lo
ip -n "$NS_S" route add $SRC_NET/16 via $UL_C
# Spoofed sources' answers go back to the client namespace too, which has no
# such address and drops them (and the server's reverse-path filter keeps
# taking them).
ip -n "$NS_S" route add 10.66.0.0/16 via $UL_C

server_up() { # tag pool allow-file -> IT_S
    bg "$NS_S" "$TMP/server-$1.log" "$IPTUN" server --private-key "$TMP/iptun-s.key" \
        --allow-file "$3" --listen udp://0.0.0.0:$IPTUN_PORT --tun $IPTUN_TUN --pool "$2"
    IT_S=$BG_PID
    wait_ipv4 "$NS_S" $IPTUN_TUN 10 $IT_S || die "iptun server: no IPv4 on $IPTUN_TUN within 10 s$(alive $IT_S)"
    grep -h 'handshake costs' "$TMP/server-$1.log" | sed 's/^.*INFO[^:]*: //' >&2 || true
}

server_status() {
    ip netns exec "$NS_S" "$IPTUN" status 2>&1 | grep -E 'handshakes|dropped' | head -3
}

run_sessions() { # tag pool count extra
    "$LOAD" keys --count $(($3 + $4)) --keys "$TMP/load-$1.keys" --allow "$TMP/load-$1.allow"
    server_up "$1" "$2" "$TMP/load-$1.allow"
    local server_ip=${2%.*}.1
    ip netns exec "$NS_C" "$LOAD" sessions --server $UL_S:$IPTUN_PORT \
        --server-key "$(cat "$TMP/iptun-s.pub")" --keys "$TMP/load-$1.keys" \
        --count "$3" --extra "$4" --sources $SRC_NET/$SOURCES --server-pid "$IT_S" \
        | tee "$TMP/load-$1.out" || log "$1: the load generator reported a failure"
    server_status
    log "server peak RSS (VmHWM): $(awk '/VmHWM/ { print $2, $3 }' /proc/"$IT_S"/status)"
    stop_pids "$IT_S"
}

if want sessions; then
    log "sessions: $N from $SRC_NET/$SOURCES, pool 10.1.0.0/16"
    run_sessions sessions 10.1.0.0/16 "$N" 0
fi

if want exhaust; then
    pause
    log "pool exhaustion: 253 addresses, 263 keys"
    run_sessions exhaust 10.1.0.0/24 253 10
fi

# Seconds until `ping` through the tunnel of the client in namespace $1
# answers, polling every 0.1 s; at most $2 seconds.
seconds_until_ping() {
    local start end
    start=$(date +%s.%N)
    end=$(awk -v s="$start" -v m="$2" 'BEGIN { printf "%.3f", s + m }')
    while awk -v n="$(date +%s.%N)" -v e="$end" 'BEGIN { exit !(n < e) }'; do
        if ip netns exec "$1" ping -c 1 -W 1 $IPTUN_ADDR_S >/dev/null 2>&1; then
            awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", n - s }'
            return 0
        fi
        sleep 0.1
    done
    echo "never"
    return 1
}

if want flood; then
    pause
    log "flood: 50 spoofed sources for ${FLOOD_SECS}s, one session pinging, a new client 1 s in"
    NS_C2=$PREFIX-c2
    ip netns add "$NS_C2"
    teardown_hook() { ip netns del "$NS_C2" 2>/dev/null || true; }
    ip link add $PREFIX-veth-c2 netns "$NS_C2" type veth peer name $PREFIX-veth-s2 netns "$NS_S"
    ip -n "$NS_C2" addr add 192.0.2.130/25 dev $PREFIX-veth-c2
    ip -n "$NS_S" addr add 192.0.2.129/25 dev $PREFIX-veth-s2
    ip -n "$NS_C2" link set lo up
    ip -n "$NS_C2" link set $PREFIX-veth-c2 up
    ip -n "$NS_S" link set $PREFIX-veth-s2 up
    "$IPTUN" genkey >"$TMP/c2.key" && "$IPTUN" pubkey <"$TMP/c2.key" >"$TMP/c2.pub"
    cat "$TMP/iptun-c.pub" "$TMP/c2.pub" >"$TMP/flood.allow"
    server_up flood 10.1.0.0/24 "$TMP/flood.allow"
    bg "$NS_C" "$TMP/client-1.log" "$IPTUN" client --private-key "$TMP/iptun-c.key" \
        --server-key "$(cat "$TMP/iptun-s.pub")" --server udp://$UL_S:$IPTUN_PORT --tun $IPTUN_TUN
    C1=$BG_PID
    wait_ipv4 "$NS_C" $IPTUN_TUN 10 $C1 || die "client 1: no tunnel address"
    seconds_until_ping "$NS_C" 5 >/dev/null || die "client 1: no ping through the tunnel"
    pings=$((FLOOD_SECS * 10))
    bg "$NS_C" "$TMP/ping-1.log" ping -i 0.1 -c $pings -W 1 $IPTUN_ADDR_S
    PING1=$BG_PID
    bg "$NS_C" "$TMP/flood.log" "$LOAD" flood --server $UL_S:$IPTUN_PORT \
        --server-key "$(cat "$TMP/iptun-s.pub")" --key "$(cat "$TMP/iptun-c.key")" \
        --spoof 50 --secs "$FLOOD_SECS"
    FLOOD=$BG_PID
    sleep 1
    bg "$NS_C2" "$TMP/client-2.log" "$IPTUN" client --private-key "$TMP/c2.key" \
        --server-key "$(cat "$TMP/iptun-s.pub")" --server udp://192.0.2.129:$IPTUN_PORT --tun $IPTUN_TUN
    up=$(seconds_until_ping "$NS_C2" 8) || true
    echo "new client during the flood: up (first ping answered) after $up s"
    echo "server during the flood: $(server_status | head -1)"
    wait "$FLOOD" || true
    cat "$TMP/flood.log"
    wait "$PING1" || true
    echo "existing session during the flood: $(grep -E 'packets transmitted' "$TMP/ping-1.log")"
    server_status
fi
