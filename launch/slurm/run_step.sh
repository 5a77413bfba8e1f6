# run_step.sh -- what every launch/slurm/*.sbatch shares, sourced from the repo root:
#   ava_train_args            train.py and its arguments, from the AVA_* settings, into AVA_TRAIN_ARGS
#   ava_check_ranks_per_node  (srun scripts) the job's --ntasks-per-node must be GPUS_PER_NODE
#   ava_run_step srun ...     run the training step; requeue the job when the run was preempted
#
# Preemption. A warning signal reaching the batch shell -- USR1 from `#SBATCH --signal=B:USR1@T`
# ahead of the time limit, or TERM -- is passed to the job's steps as USR1 with
# `scancel --signal=USR1 $SLURM_JOB_ID` (without --batch or --full it reaches the steps, not this
# shell). Every Ava rank handles USR1 like TERM: it finishes its step, writes a checkpoint and
# summary.json {"status": "preempted"}, and exits 75. The job is then requeued (same job id, so the
# same AVA_OUTPUT_DIR) and the new run resumes there through --auto_resume.
#   Not `kill -TERM <srun>`: srun answers SIGTERM by SIGKILLing its tasks. Not TERM to the steps: the
#   deepspeed launcher answers it by terminating its ranks with a 30 s deadline and exit status 1
#   (train.sbatch has the launcher ignore USR1, which its ranks inherit until Ava takes the signal).
#
# A failed rank. The steps run with `srun --kill-on-bad-exit=1`: the first task to exit non-zero makes
# SLURM send TERM to the step's other tasks, then SIGKILL after KillWait (30 s by default), instead of
# leaving them blocked in a collective with a dead peer until a timeout. A preempted run's exit 75 is
# non-zero too, but every rank has written the checkpoint by then (they write it together), and a
# rank that TERM reaches afterwards is only finishing: Ava's handler takes TERM, so it still writes
# summary.json and exits 75. The requeue below reads 75 or that summary.json, whichever task srun
# reports.

# train.py and its arguments; AVA_EXTRA_ARGS is split on whitespace (no glob expansion).
ava_train_args() {
    local extra
    read -r -a extra <<< "$AVA_EXTRA_ARGS"
    # shellcheck disable=SC2034  # read by the sbatch script that sourced this file
    AVA_TRAIN_ARGS=(train.py --config "$AVA_CONFIG"
        ${AVA_HARDWARE_CONFIG:+--hardware_config "$AVA_HARDWARE_CONFIG"}
        ${AVA_DISTRIBUTED_CONFIG:+--distributed_config "$AVA_DISTRIBUTED_CONFIG"}
        --output_dir "$AVA_OUTPUT_DIR" --auto_resume "${extra[@]}")
}

ava_check_ranks_per_node() {
    if [ "${SLURM_NTASKS_PER_NODE:-$GPUS_PER_NODE}" != "$GPUS_PER_NODE" ]; then
        echo "ava: GPUS_PER_NODE=$GPUS_PER_NODE ranks per node, but the job has --ntasks-per-node=$SLURM_NTASKS_PER_NODE:" \
             "one task per rank, so give both the same value" >&2
        exit 2
    fi
}

_ava_on_signal() {
    _AVA_INTERRUPTED=1
    if [ -z "$_AVA_FORWARDED" ]; then
        _AVA_FORWARDED=1
        echo "ava: job $SLURM_JOB_ID got SIG$1 at $(date '+%F %T'): asking the training step to checkpoint and stop"
        scancel --signal=USR1 "$SLURM_JOB_ID"
    fi
}

# ava_run_step COMMAND...: run COMMAND (an srun step), then exit: 0 after a requeue, else its status.
ava_run_step() {
    local started rc status state summary="$AVA_OUTPUT_DIR/summary.json" preempted=""
    started=$(date +%s)
    _AVA_FORWARDED=""
    _AVA_INTERRUPTED=0
    trap '_ava_on_signal USR1' USR1
    trap '_ava_on_signal TERM' TERM
    "$@" &  # in the background: bash runs a trap only between commands or during `wait`
    local step=$!
    wait "$step"
    rc=$?
    # A trapped signal ends `wait` early (128+n) while the step runs on: wait again until the step's
    # own status comes back (127 means the previous wait had already collected it).
    while [ "$_AVA_INTERRUPTED" = 1 ]; do
        _AVA_INTERRUPTED=0
        wait "$step"
        status=$?
        [ "$status" = 127 ] || rc=$status
    done
    trap '' USR1  # a late warning must not kill this script now: the step has ended, its status stands
    trap - TERM

    if [ "$rc" = 75 ]; then
        preempted="exit status 75"
    elif [ -f "$summary" ] && [ "$(stat -c %Y "$summary")" -ge "$started" ] \
            && grep -Eq '"status": *"preempted"' "$summary"; then
        preempted="$summary says preempted"  # e.g. the deepspeed launcher reported another status
    fi
    if [ -z "$preempted" ]; then
        echo "ava: training step ended with status $rc"
        exit "$rc"
    fi
    # A job being cancelled (scancel, time limit) is no longer RUNNING; requeueing it would undo the cancel.
    state=$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null)
    if [ -n "$state" ] && [ "$state" != RUNNING ]; then
        echo "ava: the run stopped for a requeue ($preempted), but job $SLURM_JOB_ID is $state: not requeued"
        exit "$rc"
    fi
    echo "ava: the run stopped for a requeue ($preempted); requeueing job $SLURM_JOB_ID," \
         "which resumes from the latest checkpoint in $AVA_OUTPUT_DIR"
    # scontrol requeue ends this script (the job's first run shows as CANCELLED DUE TO JOB REQUEUE).
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "ava: scontrol requeue $SLURM_JOB_ID failed; resubmit this script with AVA_OUTPUT_DIR=$AVA_OUTPUT_DIR" >&2
    exit "$rc"
}
