"""Synthetic lab frames (docs/architecture.md) with known numbers, for the report tests."""

from __future__ import annotations

import math

import pandas as pd

REF = "order=conv-bn-act-pool-drop noise=dropout"
BEFORE = "order=conv-drop-bn-act-pool noise=dropout"
UOUT = "order=conv-drop-bn-act-pool noise=uout"
# Final test accuracy per seed; None marks a failed trial.
ARMS: dict[str, list[float | None]] = {
    REF: [0.91, 0.92, 0.90, 0.93, 0.915],
    BEFORE: [0.85, 0.86, None, 0.84, 0.87],
    UOUT: [0.905, 0.91, 0.915, 0.90, 0.92],
}
RECAL_GAIN = {REF: 0.0, BEFORE: 0.04, UOUT: 0.002}
EPOCHS = 4
DEPTHS = 2
PNG = b"\x89PNG\r\n\x1a\n"


def curve(final: float, epoch: int) -> float:
    """Test accuracy after ``epoch``: climbs 0.05 per epoch to ``final``."""
    return final - 0.05 * (EPOCHS - epoch)


def shift_ratio(arm_index: int, depth: int, seed: int) -> float:
    return 1.0 - 0.03 * arm_index * depth + 0.002 * seed


def make_frames(arms: dict[str, list[float | None]] = ARMS, *, curves: bool = True,
                shifts: bool = True) -> dict[str, pd.DataFrame]:
    """The three lab frames (docs/architecture.md) for the given final accuracies, seed-major
    like a real study; BEFORE's shift has a theory prediction, the others none."""
    trials, epochs, layers = [], [], []
    seeds = max(len(values) for values in arms.values())
    for seed in range(seeds):
        for index, (arm, values) in enumerate(arms.items()):
            final = values[seed]
            trial_id = len(trials) + 1
            failed = final is None
            trials.append({
                "trial_id": trial_id, "arm": arm, "seed": seed,
                "status": "failed" if failed else "done", "metric_name": "accuracy",
                "higher_is_better": True,
                "test_metric": math.nan if final is None else final,
                "test_loss": math.nan if final is None else 1 - final,
                "recal_test_metric": math.nan if final is None else final + RECAL_GAIN.get(arm, 0),
                "recal_test_loss": math.nan, "wall_time_s": 2.0,
                "error": "RuntimeError: CUDA out of memory\n  traceback..." if failed else None,
            })
            if final is None:
                continue
            epochs += [{"trial_id": trial_id, "arm": arm, "seed": seed, "epoch": e,
                        "train_loss": 1.0 / e, "test_loss": 1.0 / e, "test_metric": curve(final, e)}
                       for e in range(1, EPOCHS + 1)]
            layers += [{"trial_id": trial_id, "arm": arm, "seed": seed, "layer": f"block{d}.bn",
                        "depth": d, "train_var": 1.0, "eval_var": shift_ratio(index, d, seed),
                        "running_var": 1.0, "ratio": shift_ratio(index, d, seed),
                        "predicted": 1.0 - 0.03 * index * d if arm == BEFORE else math.nan}
                       for d in range(1, DEPTHS + 1)]
    epoch_columns = ["trial_id", "arm", "seed", "epoch", "train_loss", "test_loss", "test_metric"]
    shift_columns = ["trial_id", "arm", "seed", "layer", "depth", "train_var", "eval_var",
                     "running_var", "ratio", "predicted"]
    return {
        "trials": pd.DataFrame(trials),
        "epochs": pd.DataFrame(epochs if curves else [], columns=epoch_columns),
        "layer_shift": pd.DataFrame(layers if shifts else [], columns=shift_columns),
    }
