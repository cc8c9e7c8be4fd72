# bench/lib.sh - what udp.sh and icmp.sh share; sourced by both, not run.
# shellcheck shell=bash
#
# Before sourcing it, a script sets:
#   PREFIX    names its namespaces ($PREFIX-s, $PREFIX-c), veth ends and temp
#             dir, so that the scripts' leftovers never collide
#   PATHS     the paths --only accepts, comma-separated, in measuring order
#   ALIASES   (long=short ...) longer names --only also accepts
# and afterwards may redefine teardown_hook for cleanup of its own.
#
# A script then runs: parse_args "$@"; bench_start; its own tools; netns_up;
# one measure_* / measure per path; print_table; write_json.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NS_S=$PREFIX-s
NS_C=$PREFIX-c
VETH_S=$PREFIX-veth-s
VETH_C=$PREFIX-veth-c
UL_S=192.0.2.1   # server underlay address
UL_C=192.0.2.2   # client underlay address
IPTUN_TUN=iptun0
IPTUN_ADDR_S=10.1.0.1
IPTUN_PORT=3000

RUNS=${RUNS:-1}
DURATION=${DURATION:-10}
PINGS=${PINGS:-20}
PAUSE=${PAUSE:-3}

PIDS=()                           # background processes, stopped by teardown
declare -gA MBIT=() RTT=() RTT_NOTE=() MTU=() # results by path name; RTT "-": none
ORDER=()                          # path names, in the order measured
RUN=0                             # current run number, for file names

log() { echo "[${0##*/}] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- options
usage() { # the script's header comment, without the first line
    awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
}

parse_args() { # "$@" -> ONLY
    ONLY=$PATHS
    while [[ $# -gt 0 ]]; do
        case $1 in
            --only) ONLY=${2:?--only needs a list}; shift 2 ;;
            --only=*) ONLY=${1#--only=}; shift ;;
            -h|--help) usage; exit 0 ;;
            *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
        esac
    done
    local a w
    for a in "${ALIASES[@]}"; do ONLY=${ONLY//"${a%%=*}"/"${a#*=}"}; done
    for w in ${ONLY//,/ }; do
        [[ ",$PATHS," == *",$w,"* ]] || { echo "--only: unknown path '$w' ($PATHS)" >&2; exit 2; }
    done
}

want() { [[ ",$ONLY," == *",$1,"* ]]; }

# ---------------------------------------------------------------- life cycle
# Root check, temp dir, exit trap, and the tools every script needs.
bench_start() {
    [[ $EUID -eq 0 ]] || { echo "must run as root" >&2; exit 1; }
    TMP=$(mktemp -d "/tmp/$PREFIX.XXXXXX")
    trap on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    ensure_apt iperf3 iperf3
    ensure_apt ping iputils-ping
    ensure_apt python3 python3
}

teardown_hook() { :; }   # the script's own cleanup; runs at every teardown

kill_ns_procs() {
    local ns=$1 p
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
}

teardown() {
    local p ns
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    PIDS=()
    # also catches what PIDS missed, e.g. children of a killed process
    for ns in "$NS_C" "$NS_S"; do
        if ip netns list | grep -qw "$ns"; then
            kill_ns_procs "$ns"
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    teardown_hook
}

# On failure, the tail of every log: the error is usually in a tunnel's log,
# not in the message the script died with.
on_exit() {
    local rc=$? f
    trap - EXIT INT TERM
    set +e
    if [[ $rc -ne 0 ]]; then
        log "failed (exit $rc); logs in $TMP:"
        for f in "$TMP"/*.log; do
            [[ -s $f ]] || continue
            echo "----- $(basename "$f") (last 40 lines) -----" >&2
            tail -n 40 "$f" >&2
        done
    fi
    teardown
    if [[ $rc -eq 0 && -z ${KEEP_LOGS:-} ]]; then rm -rf "$TMP"; else log "logs kept in $TMP"; fi
    exit "$rc"
}

# ---------------------------------------------------------------- tools
ensure_apt() { # cmd package
    command -v "$1" >/dev/null && return
    log "installing $2"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "$2" >"$TMP/apt.log" 2>&1 || {
        apt-get update -qq >>"$TMP/apt.log" 2>&1
        apt-get install -y -qq "$2" >>"$TMP/apt.log" 2>&1
    }
}

# The iptun binary (built when missing) and a key pair for each end.
iptun_setup() {
    IPTUN=${IPTUN:-$ROOT/target/release/iptun}
    if [[ ! -x $IPTUN ]]; then
        log "$IPTUN missing: cargo build --release -p iptun"
        (cd "$ROOT" && cargo build --release -p iptun) >"$TMP/cargo-build.log" 2>&1
    fi
    [[ -x $IPTUN ]] || die "no iptun binary at $IPTUN"
    IPTUN=$(readlink -f "$IPTUN")
    local end
    umask 077
    for end in s c; do
        "$IPTUN" genkey >"$TMP/iptun-$end.key" && "$IPTUN" pubkey <"$TMP/iptun-$end.key" >"$TMP/iptun-$end.pub" \
            || die "$IPTUN genkey / pubkey failed"
    done
    umask 022
}

# ---------------------------------------------------------------- processes
# background process in a namespace; sets BG_PID (ip netns exec execs, so the
# PID is the program's own)
bg() { # ns logfile cmd...
    local ns=$1 logf=$2; shift 2
    ip netns exec "$ns" "$@" >"$logf" 2>&1 &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

wait_listen() { # ns port pid what
    local _
    for _ in $(seq 50); do
        ip netns exec "$1" ss -ltn 2>/dev/null | grep -q ":$2 " && return 0
        kill -0 "$3" 2>/dev/null || die "$4 exited"
        sleep 0.1
    done
    die "$4: nothing listens on TCP $2 after 5 s"
}

wait_ipv4() { # ns dev seconds pid
    local _
    for _ in $(seq $(($3 * 10))); do
        ip -n "$1" -4 addr show dev "$2" 2>/dev/null | grep -q 'inet ' && return 0
        kill -0 "$4" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

alive() { kill -0 "$1" 2>/dev/null || echo " (process exited)"; }

stop_pids() {
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
    local keep=() q
    for q in "${PIDS[@]}"; do [[ " $* " == *" $q "* ]] || keep+=("$q"); done
    PIDS=("${keep[@]}")
}

# ---------------------------------------------------------------- topology
# $NS_S ($UL_S/24) <-veth-> $NS_C ($UL_C/24), iperf3 -s in $NS_S.
netns_up() {
    local ns
    teardown   # stale namespaces / processes from an earlier run
    ip netns add "$NS_S"
    ip netns add "$NS_C"
    ip link add "$VETH_S" netns "$NS_S" type veth peer name "$VETH_C" netns "$NS_C"
    ip -n "$NS_S" addr add $UL_S/24 dev "$VETH_S"
    ip -n "$NS_C" addr add $UL_C/24 dev "$VETH_C"
    for ns in "$NS_S" "$NS_C"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$NS_S" link set "$VETH_S" up
    ip -n "$NS_C" link set "$VETH_C" up

    bg "$NS_S" "$TMP/iperf3-server.log" iperf3 -s
    wait_listen "$NS_S" 5201 "$BG_PID" "iperf3 -s"
    # underlay reachable (also fills the neighbour cache)
    ip netns exec "$NS_C" ping -c 1 -W 2 $UL_S >/dev/null || die "veth $UL_C -> $UL_S not reachable"
}

# ---------------------------------------------------------------- measuring
ping_avg() { # ns dst -> avg RTT ms
    local out
    out=$(ip netns exec "$1" ping -q -c "$PINGS" -i 0.2 -W 2 "$2" 2>&1) || { echo "$out" >&2; return 1; }
    sed -n 's#^rtt [^=]*= [0-9.]*/\([0-9.]*\)/.*#\1#p' <<<"$out"
}

ping_median() { # ns dst [interval [count]] -> median RTT ms: one slow wakeup
    # moves an average of an idle link's few pings far more than the link's
    # typical RTT
    local out
    out=$(ip netns exec "$1" ping -c "${4:-$PINGS}" -i "${3:-0.2}" -W 2 "$2" 2>&1) || { echo "$out" >&2; return 1; }
    sed -n 's#.* time=\([0-9.]*\) ms#\1#p' <<<"$out" | sort -g | awk '{v[NR]=$1} END {
        if (NR == 0) exit 1
        printf "%.3f\n", NR % 2 ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2 }'
}

iperf3_mbit() { # ns dst tag [iperf3 args] -> Mbit/s received
    local ns=$1 dst=$2 js="$TMP/iperf3-$3-$RUN.json"; shift 3
    timeout $((DURATION + 30)) ip netns exec "$ns" iperf3 -c "$dst" -t "$DURATION" -J "$@" >"$js" 2>&1 \
        || { cat "$js" >&2; return 1; }
    python3 - "$js" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d:
    sys.exit("iperf3: " + d["error"])
print("%.1f" % (d["end"]["sum_received"]["bits_per_second"] / 1e6))
EOF
}

# A measurement failed: the run ends, unless MAY_FAIL=1 (a peer known to
# fail on this path): then the path is logged as not measured and left out.
measurement_failed() { # name what
    [[ ${MAY_FAIL:-0} == 1 ]] || die "$1: $2 measurement failed"
    log "$1: $2 measurement failed: not measured"
}

# RUNS rounds of: RTT, then throughput; keeps the best of each in RTT/MBIT.
# The commands are words, split on spaces (so: no spaces inside arguments).
measure() { # name "rtt-cmd args" "mbit-cmd args"   (rtt-cmd "-": no RTT)
    local name=$1 best_m=0 best_r="" m r i rtt_cmd mbit_cmd
    read -ra rtt_cmd <<<"$2"
    read -ra mbit_cmd <<<"$3"
    for i in $(seq "$RUNS"); do
        RUN=$i
        # not in $(...): a command may keep state in this shell (icmp.sh's
        # ptunnel-ng helpers do)
        r="-"
        if [[ $2 != - ]]; then
            "${rtt_cmd[@]}" >"$TMP/result" || { measurement_failed "$name" RTT; return 0; }
            r=$(<"$TMP/result")
        fi
        "${mbit_cmd[@]}" >"$TMP/result" || { measurement_failed "$name" throughput; return 0; }
        m=$(<"$TMP/result")
        log "$name run $i: $m Mbit/s$([[ $r == - ]] || echo ", rtt avg $r ms")"
        awk -v a="$m" -v b="$best_m" 'BEGIN{exit !(a>b)}' && best_m=$m
        if [[ $r != - ]]; then
            if [[ -z $best_r ]] || awk -v a="$r" -v b="$best_r" 'BEGIN{exit !(a<b)}'; then best_r=$r; fi
        fi
        if [[ $i -lt $RUNS ]]; then sleep "$PAUSE"; fi
    done
    MBIT[$name]=$best_m
    RTT[$name]=${best_r:--}
    ORDER+=("$name")
}

# PAUSE idle seconds before every path but the first, so that what the last
# path left running or queued has wound down
first=1
pause() { if [[ $first -eq 1 ]]; then first=0; else sleep "$PAUSE"; fi; }

measure_raw() {
    pause
    log "raw veth: $UL_C -> $UL_S"
    measure "raw veth" "ping_avg $NS_C $UL_S" "iperf3_mbit $NS_C $UL_S raw"
}

# iptun server + client over one transport; sets IT_S, IT_C
iptun_up() { # tag listen-url server-url [client flags...]
    bg "$NS_S" "$TMP/iptun-$1-server.log" "$IPTUN" server --private-key "$TMP/iptun-s.key" \
        --allow "$(cat "$TMP/iptun-c.pub")" --listen "$2" --tun $IPTUN_TUN
    IT_S=$BG_PID
    wait_ipv4 "$NS_S" $IPTUN_TUN 10 $IT_S || die "iptun server: no IPv4 on $IPTUN_TUN within 10 s$(alive $IT_S)"
    bg "$NS_C" "$TMP/iptun-$1-client.log" "$IPTUN" client --private-key "$TMP/iptun-c.key" \
        --server-key "$(cat "$TMP/iptun-s.pub")" --server "$3" --tun $IPTUN_TUN "${@:4}"
    IT_C=$BG_PID
    wait_ipv4 "$NS_C" $IPTUN_TUN 10 $IT_C || die "iptun client: no IPv4 on $IPTUN_TUN within 10 s$(alive $IT_C)"
    log "iptun client address: $(ip -n "$NS_C" -4 -o addr show dev $IPTUN_TUN | awk '{print $4}')"
    # the first packets may go before the session is up; give it a few tries
    ip netns exec "$NS_C" ping -c 5 -i 0.2 -W 2 $IPTUN_ADDR_S >/dev/null 2>&1 || \
        ip netns exec "$NS_C" ping -c 1 -W 3 $IPTUN_ADDR_S >/dev/null || die "iptun-$1: no ping through tunnel"
}

iptun_down() {
    kill -0 "$IT_S" 2>/dev/null && kill -0 "$IT_C" 2>/dev/null || die "iptun exited during the measurement"
    stop_pids "$IT_S" "$IT_C"
}

# iptun over UDP: udp.sh's subject, icmp.sh's reference.
measure_iptun_udp() { # [function to run while the tunnel is still up]
    pause
    log "iptun-udp: client -> $IPTUN_ADDR_S over udp $UL_S:$IPTUN_PORT ($IPTUN)"
    iptun_up udp udp://0.0.0.0:$IPTUN_PORT udp://$UL_S:$IPTUN_PORT
    measure iptun-udp "ping_avg $NS_C $IPTUN_ADDR_S" "iperf3_mbit $NS_C $IPTUN_ADDR_S udp"
    if [[ -n ${1:-} ]]; then "$1"; fi
    iptun_down
}

# ---------------------------------------------------------------- report
# A blank line, then one row per path: Mbit/s, rtt_ms (with RTT_NOTE), a
# column per "header:reference path:width:decimals" holding Mbit/s divided by
# the reference's ("-" if it was not measured), and mtu if any was recorded.
# A "%" in the reference stands for the row's variant, the part of its name
# after the first space ("iptun-udp 4up" against "nulltun %" is divided by
# "nulltun 4up").
print_table() { # path-width mbit-decimals column...
    local pw=$1 md=$2 n r spec head ref w d; shift 2
    echo
    printf "%-${pw}s %9s %8s" path Mbit/s rtt_ms
    for spec in "$@"; do
        IFS=: read -r head ref w d <<<"$spec"
        printf " %${w}s" "$head"
    done
    [[ ${#MTU[@]} -eq 0 ]] || printf ' %6s' mtu
    echo
    for n in "${ORDER[@]}"; do
        r=${RTT[$n]}
        [[ $r == - ]] || r=$(awk -v r="$r" 'BEGIN{printf "%.3f", r}')${RTT_NOTE[$n]:-}
        printf "%-${pw}s %9s %8s" "$n" "$(awk -v m="${MBIT[$n]}" -v f="%.${md}f" 'BEGIN{printf f, m}')" "$r"
        for spec in "$@"; do
            IFS=: read -r head ref w d <<<"$spec"
            [[ $n == *" "* ]] && ref=${ref//%/${n#* }}
            printf " %${w}s" "$(awk -v a="${MBIT[$n]}" -v b="${MBIT[$ref]:-}" -v f="%.${d}f" \
                'BEGIN{ if (b == "") print "-"; else printf f, a / b }')"
        done
        [[ ${#MTU[@]} -eq 0 ]] || printf ' %6s' "${MTU[$n]:-${MTU[${n%% *}]:-}}"
        echo
    done
}

# {"runs":..,"duration_s":..,<head>"paths":{..}<tail>} to $JSON, if set; head
# and tail are the script's own fields (head ends and tail starts with ",").
write_json() { # head tail
    local n r sep="" mtu=""
    [[ -n ${JSON:-} ]] || return 0
    {
        printf '{"runs":%s,"duration_s":%s,%s"paths":{' "$RUNS" "$DURATION" "$1"
        for n in "${ORDER[@]}"; do
            r=${RTT[$n]}; [[ $r == - ]] && r=null
            [[ ${#MTU[@]} -eq 0 ]] || mtu=",\"mtu\":${MTU[$n]:-null}"
            printf '%s"%s":{"mbit_s":%s,"rtt_ms":%s%s}' "$sep" "$n" "${MBIT[$n]}" "$r" "$mtu"
            sep=","
        done
        printf '}%s}\n' "$2"
    } >"$JSON"
}
