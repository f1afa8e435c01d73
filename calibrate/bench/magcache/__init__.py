"""``ralu-bench magcache``: measure MagCache's per-stage magnitude ratios of a schedule on the
offline testbed model and write the schedule with a ``cache`` section that uses them.

The ratios depend on the model as well as on the step grid: these are the testbed FLUX
model's, at the testbed's 32x32 (the schedule is moved there, as ``ralu-bench quality`` does).
For a real checkpoint call :func:`ralu.calibrate.magcache.measure_mag_ratios` with its
pipeline and put the result in the schedule's ``cache`` section the same way.
"""
