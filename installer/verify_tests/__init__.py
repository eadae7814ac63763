"""The testinfra suite that `imcloud verify` runs against every host of a cloud."""
