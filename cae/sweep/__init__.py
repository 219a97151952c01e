"""Running a sweep: planning and the dry run, the driver, the Tuner and its trainables, the
guard, signals, cluster checks, the console and the live report, and the Ray internals cae
relies on (checked when a sweep or a resume starts). Importing this package imports no Ray."""
