"""paretoken.compress: the plan schema and the token reducers."""
from paretoken.compress.patch import applied_plan, apply, learn_thresholds, learned_plan, token_counts
from paretoken.compress.plan import OPS, SCORES, Plan, Stage, load_plan

__all__ = ["OPS", "SCORES", "Plan", "Stage", "apply", "applied_plan", "learn_thresholds", "learned_plan", "load_plan", "token_counts"]
