"""The run directory: the layout every stage reads and writes (directory).
"""
