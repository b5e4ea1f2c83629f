"""`python -m tsvae_dist.stage2 [overrides]`: the job `tsvae_dist.stages.stage2` as a command (a plain
process, or under torchrun or srun), its config composed as launch/submit.py composes it."""

from tsvae_dist.cli import main
from tsvae_dist.stages.stage2 import run

if __name__ == "__main__":
    main(run)
