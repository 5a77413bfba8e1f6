"""The coefficient of PPO's KL penalty: fixed, or adapted towards a target KL (Ziegler et al. 2019).

The trainer calls `update(current_kl, n_steps)` once per rollout batch and
reads `value`; `state_dict()` goes into the checkpoint so that a resumed run
continues with the coefficient it had reached, not the initial one.
"""

from __future__ import annotations

from typing import Any, Literal


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt: the coefficient stays where it was set."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """A KL coefficient that moves the measured KL towards `target` (Ziegler et al. 2019, section 2.2).

    proportional_error = clip(current / target - 1, -0.2, 0.2) and
    value *= 1 + proportional_error * n_steps / horizon: a KL above target
    raises the penalty, below lowers it, by at most 20% per `horizon` steps so
    one noisy batch cannot swing it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Scale the coefficient by the clipped proportional error after `n_steps` more samples."""
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        # Only the adapted value is state; target and horizon come from the config of the resumed run.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def make_kl_controller(
    kind: Literal["fixed", "adaptive"], init: float, target: float | None, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """The controller for `kind`; an adaptive one needs a positive target KL and horizon."""
    if init < 0:
        raise ValueError(f"make_kl_controller: init={init}; the KL coefficient must be >= 0")
    if kind == "fixed":
        return FixedKLController(init)
    if kind == "adaptive":
        if target is None or target <= 0:
            raise ValueError(
                f"make_kl_controller: kind 'adaptive' needs a target KL > 0 (got {target}); set the target or use 'fixed'"
            )
        if horizon <= 0:
            raise ValueError(f"make_kl_controller: horizon={horizon}; the adaptive controller needs a horizon > 0 steps")
        return AdaptiveKLController(init, target, horizon)
    raise ValueError(f"make_kl_controller: unknown kind {kind!r}; use 'fixed' or 'adaptive'")
