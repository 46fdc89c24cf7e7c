"""lmladder: adapt a language model to a task across the adaptation ladder and
recommend the cheapest rung that meets the target, with measured evidence."""

__version__ = "0.1.0"
