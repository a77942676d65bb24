#!/usr/bin/env bash
# On-premise Ray cluster for `dtrain launch --ray`, started by hand with `ray start` (Ray 2.60).
#
#   cluster/onprem.sh token                      # once, on the head: make ~/.ray/auth_token (0600)
#   cluster/onprem.sh head  HEAD_IP              # on the head machine
#   cluster/onprem.sh worker HEAD_IP NODE_IP     # on every worker machine (after copying the token)
#   RAY_AUTH_MODE=token dtrain launch --ray --address HEAD_IP:6379 --nodes 2 --nproc 4 train.py
#   cluster/onprem.sh stop                       # on every machine (stops the Ray processes `ray start` made)
#
# One worker machine = one dtrain node (dtrain puts a node's NPROC ranks in one placement-group
# bundle, the NODES bundles on different Ray nodes). Pass --num-cpus/--num-gpus through
# RAY_NUM_CPUS / RAY_NUM_GPUS to control what a node offers. Every machine needs the same Python
# environment (pip install 'dtrain[ray]') and, for restarts from disk, a shared checkpoint.dir.
#
# Security: token authentication is on (RAY_AUTH_MODE=token; the token file is copied to the
# workers over SSH and never printed); bind Ray to the cluster's private interface (NODE_IP), keep
# port 6379 and the worker ports firewalled from everything but the cluster, and leave the
# dashboard on 127.0.0.1 (ssh -L 8265:127.0.0.1:8265 to see it). Set GLOO_SOCKET_IFNAME /
# NCCL_SOCKET_IFNAME to that interface: dtrain passes them to every rank.
set -euo pipefail
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
cmd=${1:-}
case "$cmd" in
  token)
    mkdir -p ~/.ray
    [ -s ~/.ray/auth_token ] || (umask 077 && python3 -c "import secrets; print(secrets.token_hex(32))" > ~/.ray/auth_token)
    echo "token in ~/.ray/auth_token; copy it to each worker: scp ~/.ray/auth_token WORKER:.ray/auth_token"
    ;;
  head)
    head_ip=${2:?usage: onprem.sh head HEAD_IP}
    ray start --head --node-ip-address "$head_ip" --port 6379 --num-cpus "${RAY_NUM_CPUS:-0}" \
      --dashboard-host 127.0.0.1 --disable-usage-stats
    ;;
  worker)
    head_ip=${2:?usage: onprem.sh worker HEAD_IP NODE_IP}; node_ip=${3:?usage: onprem.sh worker HEAD_IP NODE_IP}
    extra=()
    [ -n "${RAY_NUM_CPUS:-}" ] && extra+=(--num-cpus "$RAY_NUM_CPUS")
    [ -n "${RAY_NUM_GPUS:-}" ] && extra+=(--num-gpus "$RAY_NUM_GPUS")
    ray start --address "$head_ip:6379" --node-ip-address "$node_ip" --disable-usage-stats "${extra[@]}"
    ;;
  stop)
    ray stop   # stops the Ray processes of this machine's `ray start`
    ;;
  *)
    sed -n '2,21p' "$0"; exit 2
    ;;
esac
