"""Reference values for the drift math tests (controller/src/drift/tests/math.rs).

Run with scipy 1.17.1 and numpy 2.4.6: `python3 scipy_reference.py`; paste the printed values.
Sparse bins are merged by the rule the Rust code states (adjacent bins pooled in order until a
group expects >= 5; a short last group joins the one before) before scipy sees them.
"""
import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon


def merge(observed, expected, min_expected=5.0):
    groups, start, acc = [], 0, 0.0
    for i, e in enumerate(expected):
        acc += e
        if acc >= min_expected and acc > 0:
            groups.append([start, i + 1])
            start, acc = i + 1, 0.0
    if start < len(expected):
        groups[-1][1] = len(expected)
    o = [sum(observed[a:b]) for a, b in groups]
    e = [sum(expected[a:b]) for a, b in groups]
    return o, e


def gof(name, counts, proportions):
    counts = np.asarray(counts, dtype=float)
    p = np.asarray(proportions, dtype=float)
    o, e = merge(list(counts), list(p * counts.sum()))
    res = stats.chisquare(o, e)
    print(f"{name}: statistic={res.statistic!r} dof={len(o) - 1} p={res.pvalue!r}")


gof("uniform", [12, 8, 15, 9, 11, 5, 10, 13, 7, 10], [0.1] * 10)
gof("unequal", [30, 45, 60, 50, 40, 35, 40], [0.1, 0.15, 0.2, 0.15, 0.15, 0.1, 0.15])
gof("shifted", [20, 25, 30, 40, 45, 55, 60, 70, 75, 80], [0.1] * 10)
gof("sparse", [3, 0, 40, 45, 4, 8], [0.01, 0.02, 0.47, 0.4, 0.05, 0.05])
# 20,000 values tested at 5,000: the counts scaled by 1/4.
gof("capped", [c / 4 for c in [1900, 2080, 2050, 1950, 2000, 2250, 1770, 2000, 2000, 2000]], [0.1] * 10)

res = stats.chi2_contingency([[30, 50, 20], [300, 400, 300]], correction=False)
print(f"two_sample: statistic={res.statistic!r} dof={res.dof} p={res.pvalue!r}")

p = np.full(10, 0.1)
q = np.array([5, 5, 10, 10, 10, 10, 10, 10, 15, 15]) / 100
print(f"psi={np.sum((q - p) * np.log(q / p))!r} js2={jensenshannon(p, q, base=2)!r}")
q0 = np.array([0, 10, 10, 10, 10, 10, 10, 10, 10, 20]) / 100
qf, pf = np.maximum(q0, 1e-4), np.maximum(p, 1e-4)
print(f"psi_empty_bin={np.sum((qf - pf) * np.log(qf / pf))!r} js2_empty_bin={jensenshannon(p, q0, base=2)!r}")

a = np.array([0.1, 0.4, 0.7, 1.2, 1.5, 2.2, 2.9, 3.1, 3.3, 4.0, 4.4, 5.0])
b = np.array([0.3, 0.9, 1.0, 1.6, 2.4, 3.5, 3.6, 3.9, 4.5, 5.5, 6.1, 6.4, 7.0])
d = stats.ks_2samp(a, b).statistic
en = len(a) * len(b) / (len(a) + len(b))
print(f"ks: d={d!r} p_kolmogorov={stats.kstwobign.sf(d * np.sqrt(en))!r}")
for x in [0.3, 0.8, 1.0, 1.358, 2.0]:
    print(f"kstwobign.sf({x})={stats.kstwobign.sf(x)!r}")
