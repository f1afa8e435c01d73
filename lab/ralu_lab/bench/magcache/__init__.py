"""``ralu-bench magcache``: measure MagCache's per-stage magnitude ratios of a schedule on the
offline testbed v2 and write the schedule with a ``cache`` section that uses them.

The ratios depend on the model as well as on the step grid: these are testbed v2's FLUX or
SD3 generator's (the schedule's family), at the testbed's 64 px (the schedule is moved there,
as ``ralu-bench quality`` does).  For a real checkpoint use ``ralu-calibrate --magcache
SCHEDULE --pipeline DIR`` (or call :func:`ralu.calibrate.magcache.measure_mag_ratios` with its
pipeline and put the result in the schedule's ``cache`` section the same way).
"""
