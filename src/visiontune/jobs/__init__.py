"""Jobs that combine stages: building an ensemble of runs, and the teacher a distilled run learns from."""
