"""The session agent (README "The session agent"): `protocol` (its files and wire format), `client` (the
driver's side), `fastpath` (a stage before the rest of the driver loads), `sessions` (one SSH connection per
job) and `server` (the agent process, `python -m fargate_ci_driver.agent`).

Empty on purpose: the stage fast path imports this package, and must load nothing it does not need."""
