"""Test helpers for pmmrec_hf (a local Hugging Face Hub-compatible server, see :mod:`.hub_server`)."""

from .hub_server import DEFAULT_TOKENS, HubError, LocalHubServer, hub_env, use_local_hub

__all__ = ["DEFAULT_TOKENS", "HubError", "LocalHubServer", "hub_env", "use_local_hub"]
