"""The eval stage: base vs tuned on the run's held-out split through one vLLM server (generate), task metrics
and their table (metrics), and the stage that ties them together and writes RUN/eval.json (stage)."""
