"""Small shared helpers: instantiation, figures, scheduling, the task wrapper."""
