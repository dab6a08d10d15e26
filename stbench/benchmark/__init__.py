"""Benchmark engine: jobs, runner, prediction writer, result rows, leaderboard."""
