from lowrank.allocation import Plan


def test_plan_reads_like_a_mapping_and_round_trips():
    plan = Plan(ratio=0.5, strategy="uniform", shapes={"a": (8, 8), "b": (4, 8)}, ranks={"a": 2}, predicted_error=0.1)
    assert plan["a"] == 2 and list(plan) == ["a"] and len(plan) == 1
    assert plan.dense_parameters == 96 and plan.planned_parameters == 2 * 16 + 32
    assert Plan.from_dict(plan.to_dict()) == plan
