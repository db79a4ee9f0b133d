"""Load client, SLO metrics (attainment, goodput, SLO scale) and plots."""
