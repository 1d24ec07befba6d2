# Environment for `ray start` on every node of a cluster started with cluster/aws-gpu.yaml
# (sourced by its head_start_ray_commands and worker_start_ray_commands). Ray worker processes
# inherit the environment of the `ray start` that launched their raylet, so NCCL, wandb and
# auth settings exported here reach every Ray Train worker of every job.
#
# Not for shared hosts: this only sets variables, but the commands that source it restart Ray on
# machines the cluster launcher created for this cluster alone.

# Token authentication (Ray >= 2.52). `ray start --head` only turns it on when RAY_AUTH_MODE=token
# is set or a token file already exists, so set it explicitly on every node. The token itself is
# ~/.ray/auth_token, copied to every node by the launcher's file_mounts (the same file the
# client uses for `ray job submit`). Never set it to "disabled".
export RAY_AUTH_MODE=token

# ---------------------------------------------------------------- NCCL (multi-node training)
# Sockets: every interface except loopback and docker bridges (NCCL's "^" excludes prefixes);
# set an explicit name (e.g. ens32 on p4d, ens5 on g5) if NCCL picks a wrong one.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
# WARN in production; run a job with NCCL_DEBUG=INFO (runtime env env_vars) to see which
# transport (NET/OFI = EFA, NET/IB, NET/Socket) and interfaces NCCL chose.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# A rank that dies or hangs inside a collective raises instead of blocking the others forever,
# so Ray Train's FailureConfig can restart the worker group from the latest checkpoint.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

# EFA (p4d/p5 with EFA network interfaces, see aws-gpu.yaml): NCCL talks to EFA through the
# aws-ofi-nccl plugin that the AWS Deep Learning AMIs install under /opt/amazon. Only enabled
# when libfabric really sees an EFA device, so the same file works on nodes without EFA (NCCL
# then uses TCP sockets over ENA: correct, but slow across nodes).
if [ -x /opt/amazon/efa/bin/fi_info ] && /opt/amazon/efa/bin/fi_info -p efa -t FI_EP_RDM >/dev/null 2>&1; then
    export FI_PROVIDER=efa
    # GPUDirect RDMA (p4d, p5): GPU memory goes to the NIC without a host copy.
    export FI_EFA_USE_DEVICE_RDMA=1
    export LD_LIBRARY_PATH="/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib:${LD_LIBRARY_PATH:-}"
fi

# ---------------------------------------------------------------- wandb (optional)
# An env file on the shared storage, readable only by its owner, e.g.
#   install -m 600 /dev/null /shared/.secrets/wandb.env && echo WANDB_API_KEY=... > /shared/.secrets/wandb.env
# With WANDB_API_KEY set, `--wandb auto` logs online (unless the job's runtime env sets
# WANDB_MODE, as cluster/runtime_env.yaml does: pass --wandb online then).
if [ -r /shared/.secrets/wandb.env ]; then
    set -a
    . /shared/.secrets/wandb.env
    set +a
fi
