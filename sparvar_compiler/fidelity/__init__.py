"""Fidelity of a plan and its calibration: how much of dense attention each plan mode keeps.

* :mod:`.captures` / :mod:`.hooks`: q/k/v captured from a real model (safetensors or npz, never pickle).
* :mod:`.synthetic`: a VAR-like synthetic workload with explicit knobs (sinks, locality, cross-scale
  similarity, content) per head; its figures describe a regime, not image quality.
* :mod:`.masks`, :mod:`.metrics`, :mod:`.evaluate`: each mode's token mask, float64 captured mass and output
  error against dense.
* :mod:`.report`: table, JSON, heat map and the calibration's Pareto chart; every report states its softmax
  scale, what the random baselines keep and which layers each row averages over. :mod:`.calibrate`: the
  cheapest plan config meeting a mass floor and an error cap (on by default), verified on every layer.

Names below are imported on first use, so that the command line starts without importing torch. The entry
points share their module's name: ``from sparvar_compiler.fidelity.evaluate import evaluate`` and
``from sparvar_compiler.fidelity.calibrate import calibrate``.
"""

from importlib import import_module

_EXPORTS = {
    "CalibrationResult": "calibrate", "Floor": "calibrate", "SearchSpace": "calibrate",
    "CaptureError": "captures", "CaptureSet": "captures",
    "EvalOptions": "evaluate", "Evaluation": "evaluate", "Record": "evaluate",
    "CaptureWriter": "hooks", "capture_sdpa": "hooks",
    "ALL_MODES": "modes", "DEFAULT_MAX_ERROR": "modes", "DEFAULT_MODES": "modes",
    "PRESETS": "synthetic", "HeadKnobs": "synthetic", "Preset": "synthetic", "SyntheticSource": "synthetic",
    "get_preset": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
