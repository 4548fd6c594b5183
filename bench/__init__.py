"""Side-by-side benchmark of ocp-agentd against supervisord (run: python -m bench.run)."""
