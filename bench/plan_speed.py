"""Time planning every registered model and schedule (issue: under 1 s in total on one CPU core).

Plans only (no layouts); writes bench/results/plan-speed.json. Run: .venv/bin/python bench/plan_speed.py
"""

import json
import platform
import time
from pathlib import Path

from sparvar_compiler.planner import get_model, list_models, make_plan


def main() -> None:
    specs = [(get_model(n), s) for n in list_models() for s in get_model(n).schedules]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for model, s in specs:
            make_plan(model, s.resolution, s.aspect)
        best = min(best, time.perf_counter() - t0)
    result = {"plans": len(specs), "seconds_best_of_5": best, "cpu": platform.processor() or platform.machine(),
              "python": platform.python_version()}
    out = Path(__file__).parent / "results" / "plan-speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"planned {len(specs)} schedules in {best * 1000:.1f} ms (best of 5)")


if __name__ == "__main__":
    main()
