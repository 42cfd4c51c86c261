#!/usr/bin/env bash
# usage (from the repository root, after cargo build --release -p slotq-cli and
#   slotq dev-cluster up --masters M --replicas 0 --port PORT):
#   bash tests/idle_cost.sh PORT M N group|alone
# Idle cost of N consumers of one queue on a local cluster: connections, blocked clients,
# commands/s (server-side count, script calls included).
set -u
B=${SLOTQ_BIN:-target/release/slotq}
PORT=$1; MASTERS=$2; N=$3; MODE=$4   # MODE: group | alone
U=redis://127.0.0.1:$PORT
ports=$(seq $PORT $((PORT+MASTERS-1)))
sum() { local f=$1; local t=0; for p in $ports; do v=$(redis-cli -p $p info $2 | grep "^$f:" | cut -d: -f2 | tr -d '\r'); t=$((t+v)); done; echo $t; }
$B --url $U push idle$MODE x >/dev/null; $B --url $U pop idle$MODE >/dev/null
pids=()
for i in $(seq 1 $N); do
  if [ $MODE = group ]; then g=default; else g=solo$i; fi
  $B --url $U consume idle$MODE --group $g >/dev/null 2>&1 & pids+=($!)
done
sleep 8
c0=$(sum total_commands_processed stats); sleep 10; c1=$(sum total_commands_processed stats)
conn=$(sum connected_clients clients); blocked=$(sum blocked_clients clients)
echo "$MASTERS masters, $N idle consumers ($MODE): connections $conn (per node $((conn/MASTERS))), blocked clients $blocked, commands/s $(( (c1-c0-2*MASTERS) / 10 ))"
kill ${pids[@]} 2>/dev/null; wait 2>/dev/null
