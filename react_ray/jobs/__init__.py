"""The stages as jobs: each connects to Ray, runs its stage's wiring, reports and writes its
summary. The `react-ray` command and the demo call these; no stage imports them."""
