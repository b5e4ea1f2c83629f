"""What every process of a job needs: the distributed environment, stop signals, keyed noise, logging."""

# A file the ranks of one job meet through instead of MASTER_ADDR:MASTER_PORT. The local launcher sets
# it (submitit draws a local job's port from its pid, and any process on the machine may hold that
# port); `dist.init` reads it. Here, not in `dist`, so that the launcher need not import torch.
RENDEZVOUS_FILE_VAR = "TSVAE_RENDEZVOUS_FILE"
