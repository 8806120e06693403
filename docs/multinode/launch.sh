#!/usr/bin/env bash
# Starts the command it is given (a stage: `safedpo train`) under torchrun on this node, one
# process per GPU, rendezvousing with the launchers of the other nodes of the job.
#
# `dvc repro` calls it through the stage cmd `$SAFEDPO_LAUNCH safedpo train` (dvc.yaml) when
# SAFEDPO_LAUNCH names it; train.sbatch sets that to `srun ... launch.sh`, one per node.
# tests/test_sharding.py runs this very script with SAFEDPO_NPROC_PER_NODE=2 on one CPU node.
#
#   SAFEDPO_NNODES          nodes in the job (default 1)
#   SAFEDPO_NPROC_PER_NODE  processes per node (default: one per GPU)
#   SAFEDPO_RDZV_ENDPOINT   host:port of the rendezvous, the first node (default localhost:0,
#                           a free port: one node only)
#   SAFEDPO_RDZV_ID         the same id on every node of one job (default safedpo)
set -euo pipefail
exec torchrun \
    --nnodes "${SAFEDPO_NNODES:-1}" \
    --nproc-per-node "${SAFEDPO_NPROC_PER_NODE:-gpu}" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${SAFEDPO_RDZV_ENDPOINT:-localhost:0}" \
    --rdzv-id "${SAFEDPO_RDZV_ID:-safedpo}" \
    --no-python "$@"
