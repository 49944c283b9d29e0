"""The recipe: one typed object (schema) read from YAML with `--set` overrides and written back (loader).
"""
