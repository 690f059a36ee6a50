"""Runs on the host, outside any container: the runtime wrapper's rewrite of what the
engine asks for, the payload, host facts, engines, install and doctor. Never imported
by the container side or the guest."""
