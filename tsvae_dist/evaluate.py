"""`python -m tsvae_dist.evaluate [overrides]`: the job `tsvae_dist.stages.evaluate` as a command (a plain
process, or under torchrun or srun), its config composed as launch/submit.py composes it."""

from tsvae_dist.cli import main
from tsvae_dist.stages.evaluate import run

if __name__ == "__main__":
    main(run)
