"""safedpo: the library shared by the DVC stages in `stages/`."""
