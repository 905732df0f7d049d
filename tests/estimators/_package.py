"""The package side of every estimator test: one MetaGradient run on a reference problem."""

import metagrad as mg

try:
    import reference as ref
except ImportError:  # tests/ made a package
    from tests import reference as ref

#: Relative tolerance of every float64 equality in the estimator tests.
RTOL = 1e-10


def meta_gradient(problem, estimator, K, lr):
    """The package's meta-gradient (flattened) and the φ_K its fmodel holds."""
    model = problem.module()
    with mg.MetaGradient(model, inner_opt=mg.optim.SGD(lr=lr.package), estimator=estimator) as meta:
        for k in range(K):
            meta.step(problem.closure(k))
        fmodel = meta.fmodel
        phi = ref.flat(list(fmodel.params.values())).detach().clone()
        problem.package_query_loss(fmodel).backward()
    return ref.flat([p.grad for p in model.parameters()]), phi
