"""Human approval of held requests (policy-driven holds, waiting, deciding, notifying)."""
