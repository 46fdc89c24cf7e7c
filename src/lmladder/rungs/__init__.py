"""One file per rung: its Config (on options.py's bases), its docstring and its steps
(prepare, fit, predict, close) in order. The registry of names is lmladder/registry.py."""
