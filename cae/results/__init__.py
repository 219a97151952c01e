"""What a run directory becomes: the trials, epochs and baselines tables, a run's status, and
the end of a run (tables, baselines, report). Readable where Ray is absent."""
