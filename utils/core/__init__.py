"""The bottom layer: user errors, files (read, write atomically, lock), the command line. Imports nothing above."""
