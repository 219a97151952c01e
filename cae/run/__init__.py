"""A run directory (local or at a URI): its files, checkpoints, records of what each trial
ran, outcomes, the lease of its driver, disk space, and Ray Tune's state files read without
importing Ray."""
