"""`python -m tsvae_dist.generate [overrides]`: the job `tsvae_dist.stages.generate` as a command (a plain
process, or under torchrun or srun), its config composed as launch/submit.py composes it."""

from tsvae_dist.cli import main
from tsvae_dist.stages.generate import run

if __name__ == "__main__":
    main(run)
