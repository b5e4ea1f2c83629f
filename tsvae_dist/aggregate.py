"""`python -m tsvae_dist.aggregate [overrides]`: the job `tsvae_dist.stages.aggregate` as a command (mean ± std
over the seeds' reports of a `seeds=N` run), its config composed as launch/submit.py composes it."""

from tsvae_dist.cli import main
from tsvae_dist.stages.aggregate import run

if __name__ == "__main__":
    main(run)
