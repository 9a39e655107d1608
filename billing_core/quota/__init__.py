"""The quota use cases and the one decision core behind them: requests and answers, the
core's rules applied per request, transactions of one request or a coalesced batch, usage
reports and sweeps. The database is reached through the ports in ports.py only."""
