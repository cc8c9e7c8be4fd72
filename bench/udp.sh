#!/usr/bin/env bash
# bench/udp.sh - throughput and RTT of iptun over UDP, compared in one run with
# the raw veth path, with nulltun-offload (an unencrypted TUN<->UDP forwarder
# using the same kernel offloads: the limit of a userspace tunnel here) and
# with boringtun (userspace WireGuard).
#
# Usage (as root):
#   bench/udp.sh                       # raw, nulltun, boringtun, iptun, cworkers, clients
#   bench/udp.sh --only raw,boringtun  # any subset of: raw,nulltun,boringtun,iptun,cworkers,clients
#
# Each path is measured four ways (the row's variant): 1up (one TCP stream
# client -> server), 4up (iperf3 -P 4), 1down (-R: server -> client) and
# 4down (-R -P 4); the idle ping RTT with the first. `cworkers` measures 4up
# and 4down again with the client's `--workers CLIENT_WORKERS` (one stream
# each on most of its threads), beside iptun's own. `clients` runs CLIENTS
# iptun clients (each in its own namespace, on its own veth) against one
# server at once, one stream up each, and reports the aggregate: with the
# server's default workers (one per core), then with --workers 1.
#
# Environment:
#   IPTUN=path     iptun binary (default: <repo>/target/release/iptun; built
#                  with `cargo build --release -p iptun` when missing)
#   NULLTUN=path   nulltun-offload binary (default: <repo>/target/bench-peers/
#                  release/nulltun-offload, built from NULLTUN_SRC when missing)
#   NULLTUN_SRC=d  its sources (default: /work/shared/peers/nulltun-offload);
#                  a benchmark peer only, never part of iptun
#   CLIENTS=n      clients of the `clients` row (default 4)
#   CLIENT_WORKERS=n  the client's --workers in the `cworkers` rows (default 2)
#   RUNS=n         measure each path n times, keep the best (default 1)
#   DURATION=s     iperf3 seconds per measurement (default 10)
#   PINGS=n        pings per measurement, 0.2 s apart (default 50); the
#                  rtt_ms column is their median. After each path's rows,
#                  300 pings 10 ms apart give the RTT of ends kept awake
#   PAUSE=s        idle seconds between measurements (default 3)
#   JSON=file      also write the results there as JSON
#   KEEP_LOGS=1    keep the temp dir with logs (it is kept on failure anyway)
#
# Topology: netns iptb-s (192.0.2.1/24) <-veth-> netns iptb-c (192.0.2.2/24).
# All tunnels run over that one link; iperf3 -s runs in iptb-s, the iperf3
# client in iptb-c. The `clients` row adds namespaces iptb-c2.. with a veth
# each to iptb-s (198.51.100.4k+1/30 <-> .4k+2). Nothing leaves the namespaces.
set -euo pipefail

PREFIX=iptb
PINGS=${PINGS:-50}
PATHS=raw,nulltun,boringtun,iptun,cworkers,clients
ALIASES=(iptun-udp=iptun nulltun-offload=nulltun)
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # namespaces, measuring, iptun, report

WG_S=iptbwgs     # boringtun interface names: must differ, because the UAPI
WG_C=iptbwgc     # socket /var/run/wireguard/NAME.sock is not per-namespace
WG_SOCKS=("/var/run/wireguard/$WG_S.sock" "/var/run/wireguard/$WG_C.sock")
WG_NET_S=10.2.0.1
WG_NET_C=10.2.0.2
WG_PORT=51820
NT_S=iptbnts     # nulltun-offload interfaces, addresses, ports
NT_C=iptbntc
NT_NET_S=10.3.0.1
NT_NET_C=10.3.0.2
NT_PORT_S=40010
NT_PORT_C=40011
CLIENTS=${CLIENTS:-4}
CLIENT_WORKERS=${CLIENT_WORKERS:-2}
CW=iptun-cw$CLIENT_WORKERS  # the `cworkers` rows' name
EXTRA_NS=()      # the `clients` row's namespaces
teardown_hook() {
    local ns
    rm -f "${WG_SOCKS[@]}"
    for ns in "${EXTRA_NS[@]}"; do
        kill_ns_procs "$ns"
        ip netns del "$ns" 2>/dev/null || true
    done
}

declare -A RSS   # peak RSS (VmHWM, MiB) of each tunnel's ends: RSS[name end]
# RTT with pings 10 ms apart: the ends stay awake, so this is the tunnel's
# own work per packet; 0.2 s apart (the table's rtt_ms), each ping also
# wakes idle CPUs, which on a small VM can cost more than the work
declare -A BUSY_RTT
VARIANTS=(1up 4up 1down 4down)
declare -A VARIANT_ARGS=([1up]="" [4up]="-P 4" [1down]="-R" [4down]="-R -P 4")

parse_args "$@"
bench_start

# ---------------------------------------------------------------- tools
if want boringtun; then
    ensure_apt wg wireguard-tools
    export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
    if ! command -v boringtun-cli >/dev/null; then
        log "installing boringtun-cli (cargo install, slow)"
        (cd /tmp && cargo install boringtun-cli --locked) >"$TMP/cargo-install.log" 2>&1
    fi
    BORINGTUN=$(command -v boringtun-cli)
fi
if want nulltun; then
    NULLTUN=${NULLTUN:-$ROOT/target/bench-peers/release/nulltun-offload}
    NULLTUN_SRC=${NULLTUN_SRC:-/work/shared/peers/nulltun-offload}
    if [[ ! -x $NULLTUN ]]; then
        log "$NULLTUN missing: building it from $NULLTUN_SRC"
        cargo build --release --manifest-path "$NULLTUN_SRC/Cargo.toml" \
            --target-dir "$ROOT/target/bench-peers" >"$TMP/cargo-nulltun.log" 2>&1
    fi
    [[ -x $NULLTUN ]] || die "no nulltun-offload binary at $NULLTUN"
fi
if want iptun || want cworkers || want clients; then iptun_setup; fi

netns_up

# ---------------------------------------------------------------- measuring
note_mtu() { # name dev (in the client namespace)
    MTU[$1]=$(ip -n "$NS_C" -o link show dev "$2" | sed -n 's/.* mtu \([0-9]*\).*/\1/p')
}

vmhwm() { awk '/^VmHWM/{printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }

note_rss() { # name server-pid client-pid (while they still run)
    RSS[$1 server]=$(vmhwm "$2")
    RSS[$1 client]=$(vmhwm "$3")
}

# The four variants of one path: "$name 1up" (with the idle RTT), "$name 4up",
# "$name 1down", "$name 4down".
measure_variants() { # name ns dst
    local v rtt
    for v in "${VARIANTS[@]}"; do
        rtt="-"
        [[ $v == 1up ]] && rtt="ping_median $2 $3"
        measure "$1 $v" "$rtt" "iperf3_mbit $2 $3 $1-$v ${VARIANT_ARGS[$v]}"
    done
    BUSY_RTT[$1]=$(ping_median "$2" "$3" 0.01 300) || BUSY_RTT[$1]="?"
}

# 1. raw veth
if want raw; then
    pause
    log "raw veth: $UL_C -> $UL_S"
    measure_variants raw "$NS_C" $UL_S
    note_mtu raw "$VETH_C"
fi

# 2. nulltun-offload
if want nulltun; then
    pause
    log "nulltun-offload: $NT_NET_C -> $NT_NET_S over udp $UL_S:$NT_PORT_S ($NULLTUN)"
    bg "$NS_S" "$TMP/nulltun-server.log" "$NULLTUN" $NT_S $UL_S $NT_PORT_S $UL_C $NT_PORT_C
    NT_PID_S=$BG_PID
    bg "$NS_C" "$TMP/nulltun-client.log" "$NULLTUN" $NT_C $UL_C $NT_PORT_C $UL_S $NT_PORT_S
    NT_PID_C=$BG_PID
    for _ in $(seq 50); do
        ip -n "$NS_S" link show $NT_S >/dev/null 2>&1 && ip -n "$NS_C" link show $NT_C >/dev/null 2>&1 && break
        kill -0 $NT_PID_S 2>/dev/null && kill -0 $NT_PID_C 2>/dev/null || die "nulltun-offload exited"
        sleep 0.1
    done
    ip -n "$NS_S" addr add $NT_NET_S/24 dev $NT_S
    ip -n "$NS_C" addr add $NT_NET_C/24 dev $NT_C
    ip -n "$NS_S" link set $NT_S mtu 1420 up
    ip -n "$NS_C" link set $NT_C mtu 1420 up
    ip netns exec "$NS_C" ping -c 3 -i 0.2 -W 2 $NT_NET_S >/dev/null || die "nulltun-offload: no ping through it"
    measure_variants nulltun "$NS_C" $NT_NET_S
    note_mtu nulltun $NT_C
    note_rss nulltun $NT_PID_S $NT_PID_C
    stop_pids $NT_PID_S $NT_PID_C
fi

# 3. boringtun
if want boringtun; then
    pause
    log "boringtun: $WG_NET_C -> $WG_NET_S over udp $UL_S:$WG_PORT ($BORINGTUN)"
    umask 077
    wg genkey >"$TMP/wg-s.key"; wg pubkey <"$TMP/wg-s.key" >"$TMP/wg-s.pub"
    wg genkey >"$TMP/wg-c.key"; wg pubkey <"$TMP/wg-c.key" >"$TMP/wg-c.pub"
    umask 022
    rm -f "${WG_SOCKS[@]}"
    bg "$NS_S" "$TMP/boringtun-server.log" env WG_SUDO=1 "$BORINGTUN" --foreground --disable-drop-privileges $WG_S
    BT_S=$BG_PID
    bg "$NS_C" "$TMP/boringtun-client.log" env WG_SUDO=1 "$BORINGTUN" --foreground --disable-drop-privileges $WG_C
    BT_C=$BG_PID
    for _ in $(seq 100); do
        [[ -S ${WG_SOCKS[0]} && -S ${WG_SOCKS[1]} ]] && break
        kill -0 $BT_S 2>/dev/null && kill -0 $BT_C 2>/dev/null || die "boringtun-cli exited"
        sleep 0.1
    done
    [[ -S ${WG_SOCKS[0]} && -S ${WG_SOCKS[1]} ]] || die "boringtun UAPI sockets missing"
    ip netns exec "$NS_S" wg set $WG_S private-key "$TMP/wg-s.key" listen-port $WG_PORT \
        peer "$(cat "$TMP/wg-c.pub")" allowed-ips $WG_NET_C/32
    ip netns exec "$NS_C" wg set $WG_C private-key "$TMP/wg-c.key" \
        peer "$(cat "$TMP/wg-s.pub")" endpoint $UL_S:$WG_PORT allowed-ips $WG_NET_S/32
    ip -n "$NS_S" addr add $WG_NET_S/24 dev $WG_S
    ip -n "$NS_C" addr add $WG_NET_C/24 dev $WG_C
    ip -n "$NS_S" link set $WG_S mtu 1420 up
    ip -n "$NS_C" link set $WG_C mtu 1420 up
    # first packet triggers the handshake; give it a few tries
    ip netns exec "$NS_C" ping -c 5 -i 0.2 -W 2 $WG_NET_S >/dev/null 2>&1 || \
        ip netns exec "$NS_C" ping -c 1 -W 3 $WG_NET_S >/dev/null || die "boringtun: no ping through tunnel"
    measure_variants boringtun "$NS_C" $WG_NET_S
    note_mtu boringtun $WG_C
    note_rss boringtun $BT_S $BT_C
    stop_pids $BT_S $BT_C
    rm -f "${WG_SOCKS[@]}"
fi

# 4. iptun over UDP
if want iptun; then
    pause
    log "iptun-udp: client -> $IPTUN_ADDR_S over udp $UL_S:$IPTUN_PORT ($IPTUN)"
    iptun_up udp udp://0.0.0.0:$IPTUN_PORT udp://$UL_S:$IPTUN_PORT
    measure_variants iptun-udp "$NS_C" $IPTUN_ADDR_S
    note_mtu iptun-udp $IPTUN_TUN
    note_rss iptun-udp "$IT_S" "$IT_C"
    iptun_down
fi

# 5. the same with the client's workers: several streams on several threads
if want cworkers; then
    pause
    log "$CW: iptun-udp with client --workers $CLIENT_WORKERS"
    iptun_up udpcw udp://0.0.0.0:$IPTUN_PORT udp://$UL_S:$IPTUN_PORT --workers "$CLIENT_WORKERS"
    for v in 4up 4down; do
        measure "$CW $v" "-" "iperf3_mbit $NS_C $IPTUN_ADDR_S $CW-$v ${VARIANT_ARGS[$v]}"
    done
    note_mtu "$CW" $IPTUN_TUN
    note_rss "$CW" "$IT_S" "$IT_C"
    iptun_down
fi

# 6. several iptun clients on one server at once
# Client k's iperf3 goes to its own iperf3 -s (port 5200+k); prints the sum
# and leaves each client's figure in PER_CLIENT.
PER_CLIENT=()
declare -A PER_CLIENT_OF=()
clients_mbit() {
    local k pids=() sum=0 m
    for k in $(seq "$CLIENTS"); do
        timeout $((DURATION + 30)) ip netns exec "${CLIENT_NS[$k]}" iperf3 -c $IPTUN_ADDR_S \
            -p $((5200 + k)) -t "$DURATION" -J >"$TMP/iperf3-clients-$k-$RUN.json" 2>&1 &
        pids+=($!)
    done
    for k in "${pids[@]}"; do wait "$k" || { log "a client's iperf3 failed"; return 1; }; done
    PER_CLIENT=()
    for k in $(seq "$CLIENTS"); do
        m=$(python3 - "$TMP/iperf3-clients-$k-$RUN.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d:
    sys.exit("iperf3: " + d["error"])
print("%.1f" % (d["end"]["sum_received"]["bits_per_second"] / 1e6))
EOF
        ) || return 1
        PER_CLIENT+=("$m")
        sum=$(awk -v a="$sum" -v b="$m" 'BEGIN{printf "%.1f", a + b}')
    done
    echo "$sum"
}

if want clients; then
    pause
    log "iptun-udp: $CLIENTS clients at once, one stream up each"
    declare -A CLIENT_NS=([1]=$NS_C) CLIENT_SERVER=([1]=$UL_S)
    allow=(--allow "$(cat "$TMP/iptun-c.pub")")
    for k in $(seq 2 "$CLIENTS"); do
        ns=$PREFIX-c$k
        EXTRA_NS+=("$ns")
        ip netns add "$ns"
        ip link add $PREFIX-vs$k netns "$NS_S" type veth peer name $PREFIX-vc$k netns "$ns"
        ip -n "$NS_S" addr add 198.51.100.$((4 * k + 1))/30 dev $PREFIX-vs$k
        ip -n "$ns" addr add 198.51.100.$((4 * k + 2))/30 dev $PREFIX-vc$k
        ip -n "$ns" link set lo up
        ip -n "$ns" link set $PREFIX-vc$k up
        ip -n "$NS_S" link set $PREFIX-vs$k up
        CLIENT_NS[$k]=$ns
        CLIENT_SERVER[$k]=198.51.100.$((4 * k + 1))
        umask 077
        "$IPTUN" genkey >"$TMP/iptun-c$k.key" && "$IPTUN" pubkey <"$TMP/iptun-c$k.key" >"$TMP/iptun-c$k.pub"
        umask 022
        allow+=(--allow "$(cat "$TMP/iptun-c$k.pub")")
    done
    for k in $(seq "$CLIENTS"); do
        bg "$NS_S" "$TMP/iperf3-server-$k.log" iperf3 -s -p $((5200 + k))
        wait_listen "$NS_S" $((5200 + k)) "$BG_PID" "iperf3 -s -p $((5200 + k))"
    done
    # The server with its default workers (one per core), then with one
    # loop: the baseline of the same sitting.
    for workers in default 1; do
        [[ $workers == 1 ]] && pause
        server_args=()
        [[ $workers == default ]] || server_args=(--workers "$workers")
        bg "$NS_S" "$TMP/iptun-clients-$workers-server.log" "$IPTUN" server --private-key "$TMP/iptun-s.key" \
            "${allow[@]}" --listen udp://0.0.0.0:$IPTUN_PORT --tun $IPTUN_TUN "${server_args[@]}"
        IT_S=$BG_PID
        wait_ipv4 "$NS_S" $IPTUN_TUN 10 $IT_S || die "iptun server: no IPv4 on $IPTUN_TUN within 10 s$(alive $IT_S)"
        CLIENT_PIDS=()
        for k in $(seq "$CLIENTS"); do
            key=$TMP/iptun-c$k.key
            [[ $k -eq 1 ]] && key=$TMP/iptun-c.key
            bg "${CLIENT_NS[$k]}" "$TMP/iptun-clients-$workers-client-$k.log" "$IPTUN" client --private-key "$key" \
                --server-key "$(cat "$TMP/iptun-s.pub")" --server "udp://${CLIENT_SERVER[$k]}:$IPTUN_PORT" --tun $IPTUN_TUN
            CLIENT_PIDS+=("$BG_PID")
        done
        for k in $(seq "$CLIENTS"); do
            wait_ipv4 "${CLIENT_NS[$k]}" $IPTUN_TUN 10 "${CLIENT_PIDS[$((k - 1))]}" || die "iptun client $k: no IPv4"
            ip netns exec "${CLIENT_NS[$k]}" ping -c 3 -i 0.2 -W 2 $IPTUN_ADDR_S >/dev/null 2>&1 || \
                ip netns exec "${CLIENT_NS[$k]}" ping -c 1 -W 3 $IPTUN_ADDR_S >/dev/null || die "iptun client $k: no ping"
        done
        name="iptun-udp ${CLIENTS}clients"
        [[ $workers == default ]] || name+=" ${workers}worker"
        measure "$name" "-" "clients_mbit"
        log "$name: per client ${PER_CLIENT[*]} Mbit/s"
        PER_CLIENT_OF[$name]="${PER_CLIENT[*]}"
        note_rss "$name" "$IT_S" "${CLIENT_PIDS[0]}"
        log "$name: $(ip netns exec "$NS_S" "$IPTUN" status | grep -o '[0-9]* workers.*' || echo 'one loop')"
        kill -0 "$IT_S" 2>/dev/null || die "iptun server exited during the measurement"
        stop_pids "$IT_S" "${CLIENT_PIDS[@]}"
    done
    log "iptun server workers (default): $(grep -o 'on [0-9]* loops' "$TMP/iptun-clients-default-server.log" | head -1)"
fi

# ---------------------------------------------------------------- report
print_table 22 0 "vs_raw:raw %:8:3" "vs_nulltun:nulltun %:10:2" "vs_boringtun:boringtun %:12:2"
echo
echo "peak RSS (VmHWM, MiB):"
for n in nulltun boringtun iptun-udp "$CW" "iptun-udp ${CLIENTS}clients" "iptun-udp ${CLIENTS}clients 1worker"; do
    [[ -n ${RSS[$n server]:-} ]] || continue
    printf '  %-22s server %6s  client %6s\n' "$n" "${RSS[$n server]}" "${RSS[$n client]}"
done
if [[ ${#BUSY_RTT[@]} -gt 0 ]]; then
    echo
    echo "rtt with pings 10 ms apart (median of 300, ms; the ends stay awake):"
    for n in raw nulltun boringtun iptun-udp; do
        [[ -n ${BUSY_RTT[$n]:-} ]] && printf '  %-22s %6s\n' "$n" "${BUSY_RTT[$n]}"
    done
fi
for n in "${!PER_CLIENT_OF[@]}"; do echo "$n, per client (Mbit/s): ${PER_CLIENT_OF[$n]}"; done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{if (b > 0) printf "%.2f", a / b; else print "-"}'; }
for v in 4up 4down; do
    if [[ -n ${MBIT[$CW $v]:-} && -n ${MBIT[iptun-udp $v]:-} ]]; then
        echo "client workers: $v with --workers $CLIENT_WORKERS / with one: $(ratio "${MBIT[$CW $v]}" "${MBIT[iptun-udp $v]}")"
    fi
done
one="iptun-udp ${CLIENTS}clients 1worker"
if [[ -n ${MBIT[$one]:-} && -n ${MBIT[iptun-udp ${CLIENTS}clients]:-} ]]; then
    echo "workers: ${CLIENTS} clients with the default workers / with one: $(ratio "${MBIT[iptun-udp ${CLIENTS}clients]}" "${MBIT[$one]}")"
fi
echo "(runs=$RUNS, best of; iperf3 ${DURATION}s; 1up/4up: 1/4 TCP streams client->server, 1down/4down: -R;"
echo " rtt_ms: median of ${PINGS} pings 0.2 s apart (idle) on the 1up row; $(nproc) cores)"

json_map() { # key assoc-array-name -> ,"key":{"name":"value",...} (nothing if empty)
    local -n map=$2
    local n fields=""
    for n in "${!map[@]}"; do fields+=$(printf ',"%s":"%s"' "$n" "${map[$n]}"); done
    [[ -z $fields ]] || printf ',"%s":{%s}' "$1" "${fields#,}"
}
write_json "" "$(json_map vmhwm_mib RSS)$(json_map rtt_ms_pings_10ms_apart BUSY_RTT)"
