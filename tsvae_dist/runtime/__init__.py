"""What every process of a job needs: the distributed environment, stop signals, keyed noise, logging."""
