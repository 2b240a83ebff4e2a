"""The control plane: commands and config to devices, enrolment, broker credentials and ACLs."""
