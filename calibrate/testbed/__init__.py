"""ralu.calibrate.testbed: a quality testbed that needs no real weights.

A procedurally generated dataset with checkable conditioning (:mod:`.data`), fixed "text"
embeddings for its labels (:mod:`.conditioning`), a small rectified-flow model of the real
``FluxTransformer2DModel`` class served through a real ``diffusers.FluxPipeline``
(:mod:`.model`, trained by :mod:`.train`), a classifier that checks samples
(:mod:`.classifier`) and sample-accuracy evaluation (:mod:`.evaluate`).  Weights ship in
``weights/`` with the commands that produced them.
"""
