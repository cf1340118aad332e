"""The allocation plan: which layers get factored, at what rank."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..linalg import lowrank_parameters


@dataclass
class Plan:
    """Ranks for the targeted layers of one model under one budget.

    Attributes:
        ratio: fraction of the targeted layers' weight parameters to remove.
        strategy: allocation strategy that produced the plan.
        shapes: (out, in) of every targeted layer, compressed or not.
        ranks: rank of every layer that gets factored; targeted layers missing here stay dense
            (their factored form would not be smaller).
        predicted_error: the strategy's predicted total error, when it has one.

    A plan reads like the mapping ``{module name: rank}``: ``plan["model.layers.0.mlp.up_proj"]``.
    """

    ratio: float
    strategy: str
    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, int]
    predicted_error: float | None = None
    details: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return self.ranks[name]

    def __iter__(self):
        return iter(self.ranks)

    def __len__(self) -> int:
        return len(self.ranks)

    def items(self):
        return self.ranks.items()

    @property
    def dense_parameters(self) -> int:
        """Weight parameters of all targeted layers before compression."""
        return sum(out * inp for out, inp in self.shapes.values())

    @property
    def planned_parameters(self) -> int:
        """Weight parameters of all targeted layers after compression under this plan.

        A module method's plan (``modegpt``, ``basis-sharing``), whose ``ranks`` are not all ranks of
        single factored matrices, carries its own count in ``details["planned_parameters"]``.
        """
        if "planned_parameters" in self.details:
            return int(self.details["planned_parameters"])
        return sum(lowrank_parameters(out, inp, self.ranks[name]) if name in self.ranks else out * inp for name, (out, inp) in self.shapes.items())

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.planned_parameters / self.dense_parameters

    def to_dict(self) -> dict:
        return {
            "ratio": self.ratio,
            "strategy": self.strategy,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "ranks": dict(self.ranks),
            "predicted_error": self.predicted_error,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls(
            ratio=data["ratio"],
            strategy=data["strategy"],
            shapes={name: tuple(shape) for name, shape in data["shapes"].items()},
            ranks=dict(data["ranks"]),
            predicted_error=data.get("predicted_error"),
            details=data.get("details", {}),
        )
