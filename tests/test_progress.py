import io
import time

from learner.progress import steady_range


def test_the_eta_leaves_out_the_first_iterations_warm_up():
    """A 1 s warm-up then 0.02 s iterations: the rate is that of the steady iterations, not dragged down by the
    first one (without the clock restart tqdm reports about 6 it/s here, and an ETA of seconds instead of ~0.1)."""
    steps = steady_range(3, 20, file=io.StringIO(), mininterval=0, smoothing=0)
    for i in steps:
        time.sleep(1.0 if i == 3 else 0.02)
        if i == 10:
            meter = steps.bar.format_dict
    assert meter["n"] == 10 and meter["initial"] == 4  # 3 already done (a resumed run) + the warm-up iteration
    rate = (meter["n"] - meter["initial"]) / meter["elapsed"]
    assert rate > 20, rate  # 6 steady iterations in ~0.12 s; with the warm-up counted it would be < 7
    assert steps.bar.n == 20  # every iteration counted, the warm-up one too
