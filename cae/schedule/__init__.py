"""Schedulers and searchers of a sweep, extending Ray Tune through its own interfaces:
stratified successive halving, working ahead, shuffled grids and TPE."""
