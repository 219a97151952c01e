"""Experiment trackers: every trial of a sweep as a run in MLflow or Weights & Biases.

``runs`` says what a trial and a sweep become in a tracker, from the rows of the run's
tables; ``mlflowtracker`` and ``wandbtracker`` send them, only what the tracker lacks;
``feed`` sends in the background, off the training path; ``send`` ties them to a sweep
(its ``tracking:`` block) and to ``cae track``; ``live`` makes the tables' rows from what
the driver sees as the sweep runs, and ``callback`` is the Ray Tune callback that hands it
over. Only ``callback`` imports Ray: ``cae track`` works without it.
"""
