"""See README.md next to this file."""
