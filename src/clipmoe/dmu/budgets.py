"""The budget rules the baselines train under (``baselines.budgets``); a report row names its rule.

Adding a rule = one ``Budget`` entry (how it changes a baseline phase's training config) + its test.
Torch-free: the config validates rule names against this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Budget:
    key: str  # named in baselines.budgets; run folders baselines/<baseline>-<key>/
    label: str  # in row names: "dense fine-tune (1 epoch)"
    rule: str  # one sentence for the report and the plan
    # (pipeline, a baseline phase's TrainConfig, which DMU phases it stands for: "all" | "mcl") -> its TrainConfig
    apply: Callable[[Any, Any, str], Any]
    needs_dmu: bool = False  # its budget is read from DMU's finished phases


BUDGETS: dict[str, Budget] = {
    b.key: b
    for b in (
        Budget(
            "epoch",
            "1 epoch",
            "every baseline phase sees the fine-tuning data once (the paper's rule: its official scripts run one "
            "epoch)",
            apply=lambda pipe, tcfg, phases: replace(tcfg, steps=0, epochs=1.0),
        ),
        Budget(
            "steps",
            "equal steps",
            "equal compute: as many optimizer steps as all DMU phases (MCL stages + routing) together",
            apply=lambda pipe, tcfg, phases: replace(tcfg, steps=pipe.budget_steps(phases)),
            needs_dmu=True,
        ),
    )
}
