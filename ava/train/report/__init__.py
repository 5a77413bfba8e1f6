"""What a run tells its user: the console, summary.json and its checks, the fit verdict, the expert-utilisation
report, plots, and W&B."""
