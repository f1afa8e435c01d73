"""The inner NT-DM search: the published local method reproduced, the global one better."""

import numpy as np
import pytest
import scipy

from ralu.calibrate.presets import PAPER_H0, preset
from ralu.calibrate.search import NTDMObjective, StageLayout, optimise_global, optimise_paper

PUBLISHED_4X, PUBLISHED_5X, PUBLISHED_7X = (preset(f"flux-dev-{n}x") for n in (4, 5, 7))
FLUX_4X = StageLayout(PUBLISHED_4X.steps, PUBLISHED_4X.ends)
FLUX_7X = StageLayout(PUBLISHED_7X.steps, PUBLISHED_7X.ends)

#: SciPy 1.15 replaced the Fortran L-BFGS-B by a C translation; from the same start and the
#: same objective the two take different paths on this flat landscape (checked: 1.14.1 old,
#: 1.15.0 and 1.17.1 new).  The published presets were made with the old one.
NEW_LBFGSB = tuple(int(part) for part in scipy.__version__.split(".")[:2]) >= (1, 15)

# Golden numbers: (steps, ends, (h1, h2, h3, Z) found, JS distance at that point) from the
# published optimiser run from its own code (ignoww/RALU, RALU_NTDM.py at commit 23c21fd:
# NT_DM(N, E, h_ori=3), L-BFGS-B from [3, 3, 3, 2]), transcribed into a scratch script outside
# this repository and run under each SciPy generation (numpy 2.4.6 / 2.0.2).
PUBLISHED_RUNS_NEW_LBFGSB = [  # SciPy 1.17.1 (1.15.0 gives the same)
    ((5, 6, 7), (0.3, 0.45, 1.0), (5.019259754552158, 2.589012689253443, 2.2261941553668745, 6.316892455194862), 0.017461463893805415),
    ((2, 3, 5), (0.2, 0.3, 1.0), (8.139522262288857, 2.855327703069111, 2.192358651777258, 6.261160722590676), 0.026638165535229633),
    ((3, 4, 8), (0.25, 0.4, 1.0), (4.889289566588435, 2.550899073793985, 2.5488048436598905, 66.83183223801488), 0.009313934831794808),
    ((4, 5, 6), (0.3, 0.45, 1.0), (5.105992204692773, 2.640545385198756, 2.2511743207521837, 7.522265674511939), 0.01626233049055351),
    ((5, 6, 9), (0.2, 0.3, 1.0), (6.120588663682771, 2.2368646021332954, 1.9728493473408084, 4.131579030359797), 0.03665969412063313),
    ((3, 3, 6), (0.25, 0.3, 1.0), (6.401520622709353, 2.6015000771660657, 2.2733965761219674, 6.257569807595027), 0.021312428101449944),
    ((2, 2, 4), (0.15, 0.35, 1.0), (4.224277813961165, 2.503905664248957, 3.109136375658244, 2.76176476167657), 0.01769749762090071),
    ((6, 8, 10), (0.35, 0.6, 1.0), (4.461501025739286, 2.577123745780474, 2.7232584216716846, 22.84949833629742), 0.006225493200883595),
]
PUBLISHED_RUNS_OLD_LBFGSB = [  # SciPy 1.14.1
    ((5, 6, 7), (0.3, 0.45, 1.0), (5.019259300173326, 2.589013286298066, 2.2261931157762973, 6.316903630666334), 0.017461463917609304),
    ((2, 3, 5), (0.2, 0.3, 1.0), (8.141068260711172, 2.8555718466579543, 2.193036360989111, 6.261163716554034), 0.026638279267037282),
    ((3, 4, 8), (0.25, 0.4, 1.0), (5.7405421195157, 2.571753138743857, 2.6379479444637326, 25.973333152222587), 0.010649343051059685),
    ((4, 5, 6), (0.3, 0.45, 1.0), (5.115231639572645, 2.6422046970835447, 2.2534355614204644, 7.522263738302197), 0.0162626277798992),
    ((5, 6, 9), (0.2, 0.3, 1.0), (6.120562947770002, 2.23685613428839, 1.9728493627658688, 4.131579057839579), 0.0366596996339583),
    ((3, 3, 6), (0.25, 0.3, 1.0), (6.401280884767203, 2.6014200687755906, 2.273385160521326, 6.258597610415845), 0.021312426115192767),
    ((2, 2, 4), (0.15, 0.35, 1.0), (4.224830552376833, 2.503413663753977, 3.1093098758739792, 2.761700077299715), 0.017711148501759005),
    ((6, 8, 10), (0.35, 0.6, 1.0), (4.36639022970924, 2.584754320380607, 2.6677618068768507, 26.357692428760675), 0.006137924547559985),
]
PUBLISHED_RUNS = PUBLISHED_RUNS_NEW_LBFGSB if NEW_LBFGSB else PUBLISHED_RUNS_OLD_LBFGSB


@pytest.mark.parametrize("steps, ends, found, js", PUBLISHED_RUNS, ids=["/".join(map(str, run[0])) for run in PUBLISHED_RUNS])
def test_paper_optimizer_follows_the_published_optimizer_on_any_layout(steps, ends, found, js):
    # The objective is bit-identical to the published one: at the published optimiser's answer
    # it gives the published JS distance to the last bits, on any CPU.
    problem = NTDMObjective(StageLayout(steps, ends), h0=3.0)
    assert problem(np.array(found)) == pytest.approx(js, rel=1e-12)
    # L-BFGS-B from the same start then takes the same path only where its own arithmetic
    # rounds the same: on the CPU the golden runs were made on the answers agreed to rtol 1e-9;
    # on another Xeon they wander along this flat landscape's valleys (3/4/8: Z 94 instead of
    # 67) to a JS distance within 4 % of the published one.
    result = optimise_paper(problem)
    assert result.js_distance == pytest.approx(js, rel=0.05)
    assert result.js_distance == pytest.approx(problem(np.array([*result.shifts, result.z])), rel=1e-12)


def test_paper_optimizer_reproduces_published_flux_4x():
    result = optimise_paper(NTDMObjective(FLUX_4X, h0=PAPER_H0))
    np.testing.assert_allclose(result.shifts, PUBLISHED_4X.shifts, atol=2e-3)
    assert result.z == pytest.approx(PUBLISHED_4X.z, abs=2e-3)
    assert result.js_distance == pytest.approx(PUBLISHED_4X.js_distance, abs=2e-6)


def test_paper_optimizer_reproduces_published_flux_7x():
    result = optimise_paper(NTDMObjective(FLUX_7X, h0=PAPER_H0))
    np.testing.assert_allclose(result.shifts[1:], PUBLISHED_7X.shifts[1:], atol=2e-3)
    assert result.z == pytest.approx(PUBLISHED_7X.z, abs=2e-3)
    assert result.js_distance == pytest.approx(PUBLISHED_7X.js_distance, abs=2e-6)
    # h1 (2 steps on [0, 0.2]) lies along an almost flat valley: SciPy >= 1.15 (and the
    # published script run under it) stops at 8.1395, older SciPy (the preset) at 8.1411.
    assert result.shifts[0] == pytest.approx(PUBLISHED_7X.shifts[0], abs=6e-3)
    problem = NTDMObjective(FLUX_7X, h0=PAPER_H0)
    assert problem([*result.shifts, result.z]) <= problem([*PUBLISHED_7X.shifts, PUBLISHED_7X.z])


def test_paper_optimizer_reproduces_published_flux_5x():
    result = optimise_paper(NTDMObjective(StageLayout(PUBLISHED_5X.steps, PUBLISHED_5X.ends), h0=PAPER_H0))
    assert result.z == pytest.approx(PUBLISHED_5X.z, abs=2e-3)
    assert result.js_distance == pytest.approx(0.0163, abs=5e-5)
    # The printed preset came from the old L-BFGS-B; the new one (and the published script
    # under it, see PUBLISHED_RUNS_NEW_LBFGSB) stops 0.009 lower in h1 on the same objective.
    np.testing.assert_allclose(result.shifts, PUBLISHED_5X.shifts, atol=1e-2 if NEW_LBFGSB else 2e-3)


@pytest.mark.parametrize("layout, bound", [(FLUX_4X, 0.01690), (FLUX_7X, 0.02640)])
def test_global_optimizer_beats_published(layout, bound):
    problem = NTDMObjective(layout, h0=3.0)
    result = optimise_global(problem, seed=0)
    assert result.js_distance <= bound
    assert result.js_distance < optimise_paper(problem).js_distance
    assert problem([*result.shifts, result.z]) == pytest.approx(result.js_distance)
    assert optimise_global(problem, seed=0) == result  # deterministic for a seed


def test_global_never_worse_than_paper_on_random_layouts():
    rng = np.random.default_rng(1)
    for _ in range(6):
        steps = tuple(int(n) for n in rng.integers(1, 9, size=3))
        first = round(float(rng.uniform(0.1, 0.5)), 2)
        layout = StageLayout(steps, (first, round(first + float(rng.uniform(0.05, 0.3)), 2), 1.0))
        for objective in ("continuous", "discrete"):
            problem = NTDMObjective(layout, h0=3.158, objective=objective)
            assert optimise_global(problem, seed=0, effort="quick").js_distance <= optimise_paper(problem).js_distance + 1e-12


def test_layout_rejects_bad_input():
    with pytest.raises(ValueError, match="same, non-zero length"):
        StageLayout((1, 2), (0.5, 0.7, 1.0))
    with pytest.raises(ValueError, match="at least 1 step"):
        StageLayout((0, 2, 3), (0.2, 0.3, 1.0))
    with pytest.raises(ValueError, match="increase strictly"):
        StageLayout((1, 2, 3), (0.3, 0.2, 1.0))
    with pytest.raises(ValueError, match="end at 1.0"):
        StageLayout((1, 2, 3), (0.2, 0.3, 0.9))


def test_z_bounds_restrict_or_fix_the_noise_strength():
    free = optimise_global(NTDMObjective(StageLayout((4, 5, 6), (0.3, 0.45, 1.0)), h0=3.158), seed=0)
    bounded = optimise_global(NTDMObjective(StageLayout((4, 5, 6), (0.3, 0.45, 1.0)), h0=3.158, z_bounds=(2.0, 12.0)), seed=0)
    fixed = optimise_paper(NTDMObjective(StageLayout((4, 5, 6), (0.3, 0.45, 1.0)), h0=3.158, z_bounds=(10.0, 10.0)))
    assert free.z > 12.0 >= bounded.z and fixed.z == 10.0
    assert free.js_distance <= bounded.js_distance <= fixed.js_distance
    with pytest.raises(ValueError, match="Z bounds"):
        NTDMObjective(FLUX_4X, h0=3.0, z_bounds=(1.0, 10.0))
