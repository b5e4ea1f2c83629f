"""The jobs, one module each with a pure `run(cfg)`: stage1, encode, stage2, evaluate (the pipeline, in
the order `layout.STAGES` gives) and generate (samples from a finished run). No stage imports another:
what one stage hands the next is a file whose path `layout.RunLayout` owns."""
