"""The teacher: a large classifier that labels served requests for the student to learn from."""
