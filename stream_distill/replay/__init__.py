"""Record live traffic into replay files and send them back (load tests, regression tests).

:mod:`.format` (the versioned JSONL file), :mod:`.record` (topics → file),
:mod:`.replay` (file → serve over HTTP, or → the topics), :mod:`.summary` (what a replay found).
"""
