"""The Flamingo family (`family.FAMILY`); see `family`."""
